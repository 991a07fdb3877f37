"""Tensor-parallel squeezed layers, Megatron style (SPEC 5 under tensor parallelism, issue 15 item 4).

AutoTP cannot shard vp-dist's squeezed layers (a `SqueezedLinear` keeps only its kept rows and
expands them back; the FFN fold leaves FFN-in and FFN-out with a shrunk inner width), so after the
squeeze each TP rank holds its share of every layer in one of two layers written here:

- `ColumnParallelSqueezedLinear` (Q, K, V, FFN-in): this rank's output positions of the layer
  (whole heads for Q/K/V, a balanced group of the inner rows for FFN-in), only the kept ones as
  weight rows, the others filled from the bias as in `SqueezedLinear`. Its input enters through
  `copy_to_tensor_parallel_region` (identity forward, all-reduce of the gradient backward).
- `RowParallelSqueezedLinear` (attn-out, FFN-out): the input columns matching the column-parallel
  producer's positions on this rank, all kept output rows. The partial products are all-reduced
  (`reduce_from_tensor_parallel_region`), then the replicated bias is added once, after the
  reduce, and the kept rows are expanded to the full width.

Exact by construction: any permutation of a producer's output rows together with its consumer's
input columns leaves the product unchanged, and attention heads are independent, so assigning
whole heads (Q, K, V rows and attn-out's columns of a head move together) or any group of FFN
inner rows to a rank keeps the global selection and the function; only float summation order
differs (the row-parallel all-reduce).

Which rows go where (`balanced_assignment`, `split_evenly`): FFN inner rows are split into N
groups whose sizes differ by at most one row; attention heads are dealt H/N per rank, heaviest
first in snake order (0..N-1, N-1..0, ...), by their kept Q+K+V rows, so the ranks' loads differ
by at most one head's weight.

Torch and torch.distributed only (no DeepSpeed). Parameters that are sharded carry
`tensor_model_parallel = True` (Megatron's attribute, which DeepSpeed's gradient-norm code also
reads): their squared norms are summed over the TP group, replicated ones counted once.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from . import hold_empty_tensors_as_buffers
from .layers import expand_kept_rows


# ---------------------------------------------------------------------- TP region boundaries
class _CopyToTensorParallelRegion(torch.autograd.Function):
    """Identity forward; all-reduce of the gradient backward (the input is replicated)."""

    @staticmethod
    def forward(ctx, input, group):
        ctx.group = group
        return input

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTensorParallelRegion(torch.autograd.Function):
    """All-reduce forward (partial products become the full one); identity backward."""

    @staticmethod
    def forward(ctx, input, group):
        output = input.contiguous().clone()
        dist.all_reduce(output, group=group)
        return output

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def copy_to_tensor_parallel_region(input: torch.Tensor, group) -> torch.Tensor:
    return _CopyToTensorParallelRegion.apply(input, group)


def reduce_from_tensor_parallel_region(input: torch.Tensor, group) -> torch.Tensor:
    return _ReduceFromTensorParallelRegion.apply(input, group)


# ---------------------------------------------------------------------- balanced shares
def split_evenly(indices: torch.Tensor, parts: int) -> list[torch.Tensor]:
    """`indices` in `parts` contiguous groups whose sizes differ by at most one."""
    return list(torch.tensor_split(indices, parts))


def balanced_assignment(weights, parts: int) -> list[list[int]]:
    """Items (e.g. attention heads) dealt to `parts` ranks, `len(weights) / parts` each, balancing
    the summed weights: items sorted by weight (descending, ties by index) are dealt in snake order
    0..N-1, N-1..0, ..., so any two ranks' sums differ by at most max(weights) - min(weights).
    Deterministic; every item exactly once; each rank's items sorted ascending."""
    weights = [int(w) for w in weights]
    if parts < 1 or len(weights) % parts:
        raise ValueError(f"{len(weights)} items cannot be dealt equally to {parts} ranks: "
                         f"the tensor-parallel size must divide the number of heads")
    order = sorted(range(len(weights)), key=lambda i: (-weights[i], i))
    assignment: list[list[int]] = [[] for _ in range(parts)]
    for position, item in enumerate(order):
        round_, offset = divmod(position, parts)
        assignment[offset if round_ % 2 == 0 else parts - 1 - offset].append(item)
    return [sorted(items) for items in assignment]


# ---------------------------------------------------------------------- the layers
def _mark_tensor_parallel(module: nn.Module, names) -> None:
    for name in names:
        param = module._parameters.get(name)
        if param is not None:
            param.tensor_model_parallel = True


class _ParallelSqueezedLinear(nn.Module):
    """What both parallel layers hold: weight [k, in_features], bias, kept_rows int64 [k] or None
    (every row kept), the TP group; `sharded` names the parameters that differ between TP ranks
    (marked for DeepSpeed's gradient norm)."""

    sharded: tuple[str, ...] = ()

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, kept_rows: torch.Tensor | None, group):
        super().__init__()
        self.group = group
        self.in_features, self.out_features = weight.shape[1], bias.shape[0]
        self.weight = nn.Parameter(weight)
        self.bias = nn.Parameter(bias)
        self.register_buffer("kept_rows", None if kept_rows is None else kept_rows.to(torch.long), persistent=True)
        _mark_tensor_parallel(self, self.sharded)
        hold_empty_tensors_as_buffers(self)  # no kept row, or no column, on this rank


class ColumnParallelSqueezedLinear(_ParallelSqueezedLinear):
    """Column-parallel linear layer holding this TP rank's output positions, kept rows only.

    weight [k, in_features] (the kept rows among this rank's positions), bias [local_out] (this
    rank's positions), kept_rows int64 [k] (positions in the local output) or None when every local
    position is kept. forward(x [..., in_features], replicated over the TP group) -> [..., local_out].
    """

    sharded = ("weight", "bias")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = copy_to_tensor_parallel_region(x, self.group)
        if self.kept_rows is None:
            return F.linear(x, self.weight, self.bias)
        return expand_kept_rows(self.bias, F.linear(x, self.weight), self.kept_rows)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, local_out={self.out_features}, kept={self.weight.shape[0]}"


class RowParallelSqueezedLinear(_ParallelSqueezedLinear):
    """Row-parallel linear layer: this TP rank's input columns, every kept output row.

    weight [k, local_in], bias [out_features] (replicated, added once after the all-reduce),
    kept_rows int64 [k] (output positions) or None when every row is kept.
    forward(x [..., local_in], this rank's share of the input) -> [..., out_features], the same on
    every rank of the TP group.
    """

    sharded = ("weight",)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kept = reduce_from_tensor_parallel_region(F.linear(x, self.weight), self.group)
        if self.kept_rows is None:
            return kept + self.bias.to(kept.dtype)
        return expand_kept_rows(self.bias, kept, self.kept_rows)

    def extra_repr(self) -> str:
        return f"local_in={self.in_features}, out_features={self.out_features}, kept={self.weight.shape[0]}"


# ---------------------------------------------------------------------- sharding a squeezed layer
@dataclass(frozen=True)
class LocalSlice:
    """This rank's parameter is `squeezed[rows][:, cols]` of the squeezed full layer's parameter
    (None = all), for carrying fp32 masters and optimizer state."""

    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None


def computed_positions(layer: nn.Module) -> torch.Tensor:
    """Output positions that `layer` (nn.Linear or SqueezedLinear) computes, in weight-row order."""
    kept = getattr(layer, "kept_rows", None)
    return torch.arange(layer.weight.shape[0]) if kept is None else kept.cpu()


@torch.no_grad()
def shard_column(layer: nn.Module, positions: torch.Tensor, group):
    """`layer` (squeezed, full) restricted to output `positions` (this rank's, in local order).
    Returns (ColumnParallelSqueezedLinear, {"weight": LocalSlice, "bias": LocalSlice})."""
    computed = computed_positions(layer)
    row_of = torch.full((layer.bias.shape[0],), -1, dtype=torch.long)
    row_of[computed] = torch.arange(computed.numel())
    rows = row_of[positions]
    local_kept = torch.nonzero(rows >= 0).flatten()
    weight_rows = rows[local_kept]
    kept_rows = None if local_kept.numel() == positions.numel() else local_kept
    device = layer.weight.device
    new = ColumnParallelSqueezedLinear(layer.weight[weight_rows.to(device)].clone(),
                                       layer.bias[positions.to(device)].clone(),
                                       None if kept_rows is None else kept_rows.to(device), group)
    return new, {"weight": LocalSlice(weight_rows), "bias": LocalSlice(positions)}


@torch.no_grad()
def shard_row(layer: nn.Module, columns: torch.Tensor, group):
    """`layer` (squeezed, full) restricted to input `columns` (matching the producer's positions
    on this rank). Returns (RowParallelSqueezedLinear, {"weight": LocalSlice, "bias": LocalSlice})."""
    kept = getattr(layer, "kept_rows", None)
    device = layer.weight.device
    new = RowParallelSqueezedLinear(layer.weight[:, columns.to(device)].clone(), layer.bias.clone(),
                                    None if kept is None else kept.clone(), group)
    return new, {"weight": LocalSlice(None, columns), "bias": LocalSlice()}


def head_positions(heads: list[int], head_size: int) -> torch.Tensor:
    """Output positions of whole heads, in the given head order."""
    return torch.cat([torch.arange(h * head_size, (h + 1) * head_size) for h in heads]) if heads else \
        torch.zeros(0, dtype=torch.long)


def attention_heads_per_rank(masks: list[torch.Tensor], num_heads: int, tp_size: int) -> list[list[int]]:
    """Heads per TP rank, balancing the kept rows of the given projections' masks (Q, K, V)."""
    kept_per_head = sum(mask.cpu().reshape(num_heads, -1).sum(dim=1) for mask in masks)
    return balanced_assignment(kept_per_head.tolist(), tp_size)


def inner_positions_per_rank(kept: torch.Tensor, tp_size: int) -> list[torch.Tensor]:
    """FFN inner positions per TP rank: the kept ones and the pruned ones, each split into groups
    whose sizes differ by at most one (kept rows balanced within one row)."""
    kept = kept.cpu().bool()
    kept_groups = split_evenly(torch.nonzero(kept).flatten(), tp_size)
    pruned_groups = split_evenly(torch.nonzero(~kept).flatten(), tp_size)
    return [torch.sort(torch.cat([k, p])).values for k, p in zip(kept_groups, pruned_groups)]
