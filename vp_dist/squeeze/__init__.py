"""Squeezing (SPEC 5): pruned rows leave the matrices, plain dense GEMMs remain.

`SqueezedLinear` keeps the kept rows as a dense `[k, d_in]` weight and the full-width bias; its
output is the bias everywhere with the dense product added at the kept positions, which is the
masked layer's function exactly. Where a pruned output is a constant fed straight into the next
matrix (FFN-in -> activation -> FFN-out), the constant folds into FFN-out's bias and both matrices
shrink with no expand.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..adapters import FoldSite
from .layers import SqueezedLinear


@dataclass(frozen=True)
class ParamOrigin:
    """Where a squeezed parameter came from: `old[rows][:, cols]` (None = all), for moving
    optimizer state row by row into the rebuilt engine."""

    name: str
    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None


def kept_index(kept: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(kept, as_tuple=False).flatten()


def _linear(weight: torch.Tensor, bias: torch.Tensor) -> nn.Linear:
    layer = nn.Linear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


def _row_squeezed(weight: torch.Tensor, bias: torch.Tensor, kept: torch.Tensor) -> nn.Module:
    if bool(kept.all()):
        return _linear(weight, bias)
    rows = kept_index(kept).to(weight.device)
    return SqueezedLinear(weight[rows].clone(), bias.clone(), rows)


@torch.no_grad()
def squeeze_model(model: nn.Module, masks: dict[str, torch.Tensor], folds: list[FoldSite] = (),
                  ) -> dict[str, ParamOrigin]:
    """Replace every masked layer of `model` in place by its squeezed form.

    masks: module name -> bool kept [d_out]. Layers with no pruned row stay as they are.
    folds: FFN sites to fold (only those whose FFN-in lost rows are folded).
    Returns new parameter name -> ParamOrigin for every parameter that changed shape or value.
    """
    modules = dict(model.named_modules())
    replacements: dict[str, nn.Module] = {}
    origins: dict[str, ParamOrigin] = {}

    def record(name: str, module: nn.Module, rows=None, cols=None, bias_rows=None):
        replacements[name] = module
        origins[f"{name}.weight"] = ParamOrigin(f"{name}.weight", rows, cols)
        origins[f"{name}.bias"] = ParamOrigin(f"{name}.bias", bias_rows)

    folded = {site.ffn_in: site for site in folds if not bool(masks[site.ffn_in].all())}
    for site in folded.values():
        ffn_in, ffn_out = modules[site.ffn_in], modules[site.ffn_out]
        activation = operator.attrgetter(site.activation)(model)
        kept_in, kept_out = masks[site.ffn_in].to(ffn_in.weight.device), masks[site.ffn_out]
        inner = kept_index(kept_in)
        pruned = kept_index(~kept_in)
        # Pruned FFN-in rows output their (trained) bias; act(bias) enters FFN-out as a constant.
        constant = activation(ffn_in.bias[pruned].unsqueeze(0)).squeeze(0)
        out_bias = ffn_out.bias + ffn_out.weight[:, pruned] @ constant
        out_weight = ffn_out.weight[:, inner]
        record(site.ffn_in, _linear(ffn_in.weight[inner], ffn_in.bias[inner]), inner, None, inner)
        out_rows = None if bool(kept_out.all()) else kept_index(kept_out)
        record(site.ffn_out, _row_squeezed(out_weight, out_bias, kept_out), out_rows, inner)

    for name, kept in masks.items():
        if name in replacements or bool(kept.all()):
            continue
        layer = modules[name]
        record(name, _row_squeezed(layer.weight, layer.bias, kept), kept_index(kept))

    for name, module in replacements.items():
        hold_empty_tensors_as_buffers(module)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, module)
    return origins


def hold_empty_tensors_as_buffers(module: nn.Module) -> nn.Module:
    """Turn zero-size parameters (a layer that lost every row) into buffers.

    They hold nothing to train, and DeepSpeed ZeRO-3 can neither partition nor gather a
    zero-size parameter. As persistent buffers they stay in the state dict and in `forward`.
    """
    for name, param in list(module.named_parameters(recurse=False)):
        if param.numel() == 0:
            del module._parameters[name]
            module.register_buffer(name, param.detach(), persistent=True)
    return module


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
