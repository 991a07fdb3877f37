"""Neuron meters (SPEC 1): window mean and EWMV of every prunable layer's outputs.

All layers share flat buffers, so one collective can reduce a whole step's sums and one update
touches every neuron at once. Layout of the per-step buffer (dtype float64 by default):

    [ token counts (L) | sum of outputs (D) | sum of squared outputs (D) ]

with L layers and D = sum of their output widths. Nothing here calls torch.distributed: the
pruner hands the step buffer to a reducer before `update_meters`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class MeterLayout:
    """Where each layer's rows sit in the flat buffers."""

    sizes: tuple[int, ...]

    @property
    def num_layers(self) -> int:
        return len(self.sizes)

    @property
    def total_rows(self) -> int:
        return sum(self.sizes)

    @property
    def offsets(self) -> tuple[int, ...]:
        out, position = [], 0
        for size in self.sizes:
            out.append(position)
            position += size
        return tuple(out)

    def row_layer(self, device=None) -> torch.Tensor:
        """Layer index of every flat row, shape [D], int64."""
        sizes = torch.tensor(self.sizes, dtype=torch.long, device=device)
        return torch.repeat_interleave(torch.arange(self.num_layers, device=device), sizes)

    def split(self, flat: torch.Tensor) -> list[torch.Tensor]:
        return list(torch.split(flat, list(self.sizes)))


class StepSums:
    """Per-step sums `(m_t, s1_t, s2_t)` of all layers in one flat buffer, filled by forward hooks."""

    def __init__(self, layout: MeterLayout, device, dtype=torch.float64):
        self.layout = layout
        L, D = layout.num_layers, layout.total_rows
        self.buffer = torch.zeros(L + 2 * D, dtype=dtype, device=device)
        self.counts = self.buffer[:L]
        self.sum = self.buffer[L:L + D]
        self.sum_sq = self.buffer[L + D:]
        self._sum_views = layout.split(self.sum)
        self._sum_sq_views = layout.split(self.sum_sq)

    def accumulate(self, layer: int, outputs: torch.Tensor, valid: torch.Tensor | None,
                   num_valid: torch.Tensor | None) -> None:
        """Add one forward pass of `layer`: outputs [..., d_out]; valid [N] 0/1 in the buffer dtype.

        A masked mat-vec instead of boolean indexing keeps this free of host synchronisation.
        """
        width = outputs.shape[-1]
        rows = outputs.detach().reshape(-1, width).to(self.buffer.dtype)
        if valid is None:
            self._sum_views[layer] += rows.sum(0)
            self._sum_sq_views[layer] += rows.square().sum(0)
            self.counts[layer] += rows.shape[0]
            return
        if valid.shape[0] != rows.shape[0]:
            raise ValueError(f"attention_mask covers {valid.shape[0]} tokens but layer {layer} "
                             f"produced {rows.shape[0]}; pass the mask of this forward pass")
        self._sum_views[layer] += valid @ rows
        self._sum_sq_views[layer] += valid @ rows.square()
        self.counts[layer] += num_valid

    def zero_(self) -> None:
        self.buffer.zero_()


@dataclass
class MeterState:
    """Window statistics since the last reset, per flat row (float64)."""

    window_count: torch.Tensor  # [L] valid tokens seen in the window
    window_sum: torch.Tensor    # [D] sum of outputs over the window (S1)
    ewmv: torch.Tensor          # [D] exponentially weighted moving variance (eq. 4)
    observed_steps: torch.Tensor  # [L] observations (steps with >= 2 valid tokens) in the window

    @classmethod
    def zeros(cls, layout: MeterLayout, device, dtype=torch.float64) -> "MeterState":
        L, D = layout.num_layers, layout.total_rows
        return cls(torch.zeros(L, dtype=dtype, device=device), torch.zeros(D, dtype=dtype, device=device),
                   torch.zeros(D, dtype=dtype, device=device), torch.zeros(L, dtype=torch.long, device=device))

    def reset_(self) -> None:
        for tensor in (self.window_count, self.window_sum, self.ewmv, self.observed_steps):
            tensor.zero_()

    def window_mean(self, row_layer: torch.Tensor) -> torch.Tensor:
        """mu = S1 / M (eq. 2); 0 for layers not yet observed in this window."""
        count = self.window_count[row_layer]
        return torch.where(count > 0, self.window_sum / count.clamp_min(1), torch.zeros_like(count))

    def as_dict(self) -> dict:
        return {"window_count": self.window_count, "window_sum": self.window_sum,
                "ewmv": self.ewmv, "observed_steps": self.observed_steps}


def update_meters(state: MeterState, counts: torch.Tensor, sums: torch.Tensor, sums_sq: torch.Tensor,
                  row_layer: torch.Tensor, alpha: float) -> None:
    """Fold one observation (the global batch's reduced step sums) into the meters, in place.

    var_t = (s2 - 2 mu s1 + m mu^2) / (m - 1), mu the window mean including this step (eq. 3);
    v_1 = var_1, v_t = alpha var_t + (1 - alpha) v_{t-1} (eq. 4). A layer with fewer than two valid
    tokens in the step has no variance to add and keeps its meters unchanged.
    """
    observed = counts >= 2                      # [L]
    row_observed = observed[row_layer]          # [D]
    state.window_count += torch.where(observed, counts, torch.zeros_like(counts))
    state.window_sum += torch.where(row_observed, sums, torch.zeros_like(sums))
    mean = state.window_mean(row_layer)
    step_count = counts[row_layer]
    step_var = (sums_sq - 2.0 * mean * sums + step_count * mean.square()) / (step_count - 1).clamp_min(1)
    first = (state.observed_steps == 0)[row_layer]
    blended = torch.where(first, step_var, alpha * step_var + (1.0 - alpha) * state.ewmv)
    state.ewmv.copy_(torch.where(row_observed, blended, state.ewmv))
    state.observed_steps += observed.long()
