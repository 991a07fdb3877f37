"""Applying masks (SPEC 4): zero rows, mean into the bias, keep pruned rows at exactly zero.

Where the values live depends on who owns the parameters. A *parameter store* writes rows
everywhere a parameter's value lives: for a plain model that is the module tensor and the torch
optimizer's state; under DeepSpeed ZeRO it is the partitioned fp32 master, the partitioned
optimizer state and the low-precision copy (see `vp_dist.distributed.zero`). The pruner only
talks to the store interface below.
"""
from __future__ import annotations

from typing import Protocol

import torch
import torch.nn as nn


class ParameterStore(Protocol):
    def write_rows(self, param: nn.Parameter, rows: torch.Tensor, values: torch.Tensor | float,
                   zero_optimizer_state: bool) -> None:
        """Set `param[rows] = values` (rows: bool [d_out]) wherever the value lives; with
        `zero_optimizer_state`, also zero those rows of every optimizer state tensor of `param`."""


class TorchParameterStore:
    """Parameters owned by the module and (optionally) a torch optimizer such as AdamW."""

    def __init__(self, optimizer: torch.optim.Optimizer | None = None):
        self.optimizer = optimizer

    @torch.no_grad()
    def write_rows(self, param, rows, values, zero_optimizer_state):
        rows = rows.to(param.device)
        if isinstance(values, torch.Tensor):
            values = values.to(device=param.device, dtype=param.dtype)
        param[rows] = values
        if zero_optimizer_state and self.optimizer is not None:
            for state in self.optimizer.state.get(param, {}).values():
                if isinstance(state, torch.Tensor) and state.shape == param.shape:
                    state[rows] = 0


def ensure_bias(linear: nn.Module) -> nn.Parameter:
    """Give a bias-free linear layer a zero bias (same function), so pruned rows can hold a mean."""
    if getattr(linear, "bias", None) is None:
        weight = linear.weight
        linear.bias = nn.Parameter(torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device))
    return linear.bias


class GradientMask:
    """Multiplies a weight's gradient by its kept-row mask, so pruned rows never move again.

    One tensor hook per weight, registered once; `update` changes the mask in place.
    """

    def __init__(self, weight: nn.Parameter):
        rows = getattr(weight, "ds_shape", weight.shape)[0]  # ZeRO-3: logical shape of a partitioned weight
        self.row_scale = torch.ones(rows, 1, dtype=weight.dtype, device=weight.device)
        self.handle = weight.register_hook(self._mask)

    def _mask(self, grad: torch.Tensor) -> torch.Tensor:
        # The hook runs before gradient accumulation and, at every ZeRO stage (3 included: the weight
        # is gathered for backward), sees the full gradient; anything else would let pruned rows move.
        if grad.shape[0] != self.row_scale.shape[0]:
            raise RuntimeError(f"gradient of shape {tuple(grad.shape)} does not match the row mask of "
                               f"{self.row_scale.shape[0]} rows")
        return grad * self.row_scale.to(grad.dtype)

    def update(self, kept: torch.Tensor) -> None:
        self.row_scale.copy_(kept.to(self.row_scale.device, self.row_scale.dtype)[:, None])

    def remove(self) -> None:
        self.handle.remove()
