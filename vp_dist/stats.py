"""Neuron meters (SPEC 1): window mean and EWMV of every prunable layer's outputs.

All layers share flat buffers, so one collective can reduce a whole step's sums and one update
touches every neuron at once. Layout of the per-step buffer (float64 by default):

    [ token counts m (L) | shifted sums A (D) | shifted sums of squares B (D) ]

with L layers and D = sum of their output widths. Nothing here calls torch.distributed: the
pruner hands the step buffer to a reducer before `update_meters`.

Shifted sums. Every row i has a shift c_i, the same on every rank during a step (the window mean
known when the step began; see `MeterState.shift`). The hooks add, per micro-batch, fp32 moments
of the outputs around c (`stats_kernels.shifted_moments`) into the float64 buffer:

    A = sum_j (y_j - c),    B = sum_j (y_j - c)^2,    over the m valid tokens j of the step.

Eq. 3 wants the step variance around mu, the window mean *including* this step. With
s1 = A + m c the step's plain sum, mu = (S1_window + s1) / (M_window + m), and d = mu - c:

    sum_j (y_j - mu)^2 = sum_j ((y_j - c) - d)^2 = B - 2 d A + m d^2,
    var_t = (B - 2 d A + m d^2) / (m - 1),

exactly SPEC 1's (s2 - 2 mu s1 + m mu^2) / (m - 1) with s2 = B + 2 c A + m c^2, but computed from
terms of the size of the variance instead of the size of mu^2 (no cancellation), so a
near-constant neuron with a large mean keeps its true variance. Until the first observation
gives a shift, the hooks centre each micro-batch on its own mean and merge (Chan et al.).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .stats_kernels import kernel_runs_on, shifted_moments, shifted_moments_into

WORKSPACE_ROW_BLOCKS = 16  # R: fp32 partial sums per row in the deferred workspace (see StepSums)


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


class MomentWorkspace:
    """fp32 partial sums [2, R, D] (first and second shifted moments, R row blocks), allocated on
    first use and shared by the pruner's two `StepSums` (only the one being filled uses it)."""

    def __init__(self, layout: MeterLayout, row_blocks: int = WORKSPACE_ROW_BLOCKS):
        self.layout, self.row_blocks = layout, row_blocks
        self.tensor: torch.Tensor | None = None
        self.views: list[tuple[torch.Tensor, torch.Tensor]] = []

    def layer_views(self, layer: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        if self.tensor is None:
            self.tensor = torch.zeros(2, self.row_blocks, self.layout.total_rows, dtype=torch.float32, device=device)
            self.views = [(self.tensor[0, :, o:o + d], self.tensor[1, :, o:o + d])
                          for o, d in zip(self.layout.offsets, self.layout.sizes)]
        return self.views[layer]


class StepSums:
    """Per-step shifted sums `(m, A, B)` of all layers in one flat buffer, filled by forward hooks.

    `shift` [D] float32 is the c of the module docstring for the step being filled; with
    `centre_each_batch` (no shift known yet) every micro-batch is centred on its own mean first.

    `deferred` (the pruner's mode) is the hot path for many layers on a GPU: `accumulate` then
    launches one Triton kernel per layer, which adds into `workspace`'s fp32 partials, and notes
    the token count; `end_forward()` adds the counts of one forward pass (one op when every layer
    fired once) and `flush()` folds the partials of every layer into the float64 sums (three ops
    per step). Without Triton, or while the first steps centre each micro-batch, the moments go
    straight into the sums as in the plain mode. The plain mode leaves the buffer complete after
    every `accumulate`.
    """

    def __init__(self, layout: MeterLayout, device, dtype=torch.float64, deferred: bool = False,
                 workspace: MomentWorkspace | None = None):
        self.layout = layout
        self.deferred = deferred
        self.workspace = workspace or MomentWorkspace(layout)
        self._workspace_dirty = False
        self._uncounted: list[tuple[int, torch.Tensor | int]] = []
        L, D = layout.num_layers, layout.total_rows
        self.buffer = torch.zeros(L + 2 * D, dtype=dtype, device=device)
        self.counts = self.buffer[:L]
        self.sum = self.buffer[L:L + D]
        self.sum_sq = self.buffer[L + D:]
        self.shift = torch.zeros(D, dtype=torch.float32, device=device)
        self.centre_each_batch = True
        self._sum_views = layout.split(self.sum)
        self._sum_sq_views = layout.split(self.sum_sq)
        self._shift_views = layout.split(self.shift)

    def accumulate(self, layer: int, outputs: torch.Tensor, valid: torch.Tensor | None,
                   num_valid: torch.Tensor | None) -> None:
        """Add one forward pass of `layer`: outputs [..., d_out] (any float dtype, read as is);
        valid [N] float32 0/1 or None; num_valid its sum (int64 scalar tensor).

        A masked mat-vec instead of boolean indexing keeps this free of host synchronisation.
        """
        width = outputs.shape[-1]
        rows = outputs.detach().reshape(-1, width)
        if valid is not None and valid.shape[0] != rows.shape[0]:
            raise ValueError(f"attention_mask covers {valid.shape[0]} tokens but layer {layer} "
                             f"produced {rows.shape[0]}; pass the mask of this forward pass")
        count = rows.shape[0] if valid is None else num_valid
        shift = self._shift_views[layer]
        if self.deferred and not self.centre_each_batch and kernel_runs_on(rows):
            shifted_moments_into(rows, valid, shift, *self.workspace.layer_views(layer, rows.device))
            self._workspace_dirty = True
        elif not self.centre_each_batch:
            first, second = shifted_moments(rows, valid, shift)
            self._sum_views[layer] += first
            self._sum_sq_views[layer] += second
        else:  # Chan's merge: moments around this batch's mean, moved to the common shift in float64
            plain = rows.float().sum(0) if valid is None else valid @ rows.float()
            batch_mean = plain / max(count, 1) if valid is None else plain / count.clamp_min(1)
            first, second = shifted_moments(rows, valid, batch_mean)
            delta = batch_mean.to(self.buffer.dtype) - shift.to(self.buffer.dtype)
            first, second = first.to(self.buffer.dtype), second.to(self.buffer.dtype)
            self._sum_views[layer] += first + count * delta
            self._sum_sq_views[layer] += second + 2.0 * delta * first + count * delta.square()
        if self.deferred and not torch.compiler.is_compiling():
            self._uncounted.append((layer, count))
        else:
            self.counts[layer] += count

    def end_forward(self) -> None:
        """Deferred mode: add the token counts of the forward pass just observed."""
        pending, self._uncounted = self._uncounted, []
        if not pending:
            return
        first = pending[0][1]
        if len(pending) == self.layout.num_layers and all(layer == i for i, (layer, _) in enumerate(pending)) \
                and all(count is first or (isinstance(count, int) and count == first) for _, count in pending):
            self.counts += first  # every layer once, one mask: the usual case
            return
        for layer, count in pending:
            self.counts[layer] += count

    def flush(self) -> None:
        """Deferred mode: fold the workspace's partial sums into the float64 sums; the buffer is
        then complete. Called before the buffer is reduced or read."""
        self.end_forward()
        if self._workspace_dirty:
            partials = self.workspace.tensor
            self.buffer[self.layout.num_layers:].view(2, -1).add_(partials.sum(1))
            partials.zero_()
            self._workspace_dirty = False

    def begin(self, shift: torch.Tensor, centre_each_batch: bool) -> None:
        """Start a new step: zero the sums, take the shift (float32 [D]) the hooks will use."""
        self.zero_()
        self.shift.copy_(shift)
        self.centre_each_batch = centre_each_batch

    def zero_(self) -> None:
        self.buffer.zero_()
        self._uncounted = []
        if self._workspace_dirty:
            self.workspace.tensor.zero_()
            self._workspace_dirty = False


@dataclass
class MeterState:
    """Window statistics since the last reset, per flat row (float64), and the collection shift."""

    window_count: torch.Tensor  # [L] valid tokens seen in the window
    window_sum: torch.Tensor    # [D] sum of outputs over the window (S1)
    ewmv: torch.Tensor          # [D] exponentially weighted moving variance (eq. 4)
    observed_steps: torch.Tensor  # [L] observations (steps with >= 2 valid tokens) in the window
    dropped_steps: torch.Tensor   # [] steps of this window dropped as non-finite
    shift: torch.Tensor         # [D] float32 last known window mean; kept across resets

    @classmethod
    def zeros(cls, layout: MeterLayout, device, dtype=torch.float64) -> "MeterState":
        L, D = layout.num_layers, layout.total_rows
        return cls(torch.zeros(L, dtype=dtype, device=device), torch.zeros(D, dtype=dtype, device=device),
                   torch.zeros(D, dtype=dtype, device=device), torch.zeros(L, dtype=torch.long, device=device),
                   torch.zeros((), dtype=torch.long, device=device),
                   torch.zeros(D, dtype=torch.float32, device=device))

    def reset_(self) -> None:
        """Start a new window (after a pruning). The shift stays: it is only a numerical device."""
        for tensor in (self.window_count, self.window_sum, self.ewmv, self.observed_steps, self.dropped_steps):
            tensor.zero_()

    def window_mean(self, row_layer: torch.Tensor) -> torch.Tensor:
        """mu = S1 / M (eq. 2); 0 for layers not yet observed in this window."""
        count = self.window_count[row_layer]
        return torch.where(count > 0, self.window_sum / count.clamp_min(1), torch.zeros_like(count))

    def as_dict(self) -> dict:
        return {"window_count": self.window_count, "window_sum": self.window_sum, "ewmv": self.ewmv,
                "observed_steps": self.observed_steps, "dropped_steps": self.dropped_steps,
                "shift": self.shift}


def update_meters(state: MeterState, sums: StepSums, row_layer: torch.Tensor, alpha: float) -> torch.Tensor:
    """Fold one observation (the global batch's reduced step sums) into the meters, in place.

    var_t from the shifted sums as derived in the module docstring, clamped at 0 where rounding
    takes it below; v_1 = var_1, v_t = alpha var_t + (1 - alpha) v_{t-1} (eq. 4). A layer with
    fewer than two valid tokens in the step has no variance to add and keeps its meters.
    Non-finite observations are dropped whole: if any count, sum or resulting variance of any
    layer is NaN or inf, no meter changes and `dropped_steps` counts one more. Everything stays on
    the device (torch.where, no host synchronisation). Returns bool [L]: the layers at fault.
    """
    counts, shifted_sum, shifted_sq = sums.counts, sums.sum, sums.sum_sq
    shift = sums.shift.to(shifted_sum.dtype)
    observed = counts >= 2                      # [L]
    row_observed = observed[row_layer]          # [D]
    step_count = counts[row_layer]
    window_count = state.window_count + torch.where(observed, counts, torch.zeros_like(counts))
    plain_sum = shifted_sum + step_count * shift
    window_sum = state.window_sum + torch.where(row_observed, plain_sum, torch.zeros_like(plain_sum))
    row_window_count = window_count[row_layer]
    mean = torch.where(row_window_count > 0, window_sum / row_window_count.clamp_min(1), shift)
    offset = mean - shift
    squares = shifted_sq - 2.0 * offset * shifted_sum + step_count * offset.square()
    step_var = (squares / (step_count - 1).clamp_min(1)).clamp_min(0.0)
    first = (state.observed_steps == 0)[row_layer]
    blended = torch.where(first, step_var, alpha * step_var + (1.0 - alpha) * state.ewmv)
    ewmv = torch.where(row_observed, blended, state.ewmv)

    row_bad = ~(torch.isfinite(window_sum) & torch.isfinite(ewmv))
    bad_layers = ~torch.isfinite(counts) | (torch.zeros_like(counts).index_add_(
        0, row_layer, row_bad.to(counts.dtype)) > 0)
    drop = bad_layers.any()                     # 0-dim bool: drop the whole step
    state.window_count.copy_(torch.where(drop, state.window_count, window_count))
    state.window_sum.copy_(torch.where(drop, state.window_sum, window_sum))
    state.ewmv.copy_(torch.where(drop, state.ewmv, ewmv))
    state.observed_steps += torch.where(drop, torch.zeros_like(observed), observed).long()
    state.dropped_steps += drop.long()
    new_shift = torch.where(row_window_count > 0, mean, shift).to(state.shift.dtype)
    state.shift.copy_(torch.where(drop, state.shift, new_shift))
    return bad_layers
