"""Collectives of the pruner over the data-parallel group (SPEC 1, 3).

One observation is the global batch, so the per-step sums of every rank are added together with
one all-reduce of the pruner's whole flat step buffer `[counts | sums | sums_sq]` (float64) per
optimizer step, never one per layer. The pruner issues it with `sum_async` right after the
optimizer step and waits on the returned work handle only where the sums are first needed (the
next `pruner.step()`, a pruning, or a read of the statistics), so the reduction runs while the next
step's forward and backward do: NCCL and gloo both run async collectives on their own streams or
threads, and `wait()` on CUDA orders the current stream after the collective without stalling the
host. The masks that follow are then computed identically on every
rank; `check_identical` proves it with one more small all-reduce at each pruning step.
Tensors go to `collective_device()` first (NCCL takes CUDA tensors only): the buffer normally lives
on the model's device already and no copy is made.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from .devices import on_collective_device


class _CopiedBack:
    """The work handle of a reduction made on a copy (`flat` was not on the collective device):
    `wait()` also writes the reduced values back into `flat`."""

    def __init__(self, work, communicated: torch.Tensor, flat: torch.Tensor):
        self.work, self.communicated, self.flat = work, communicated, flat

    def wait(self) -> bool:
        self.work.wait()
        self.flat.copy_(self.communicated.to(self.flat.device))
        return True


class DataParallelReducer:
    """Sum-reduces over `group` (None: the default group). The pruner's `reducer`."""

    def __init__(self, group=None):
        self.group = group

    @classmethod
    def for_engine(cls, engine) -> "DataParallelReducer":
        """The engine's data-parallel group, widened by sequence parallelism where it is on
        (ranks of one sequence-parallel group see different tokens of the same sequences)."""
        group = getattr(engine, "seq_data_parallel_group", None) or engine.data_parallel_group
        return cls(group)

    @property
    def world_size(self) -> int:
        return dist.get_world_size(group=self.group) if dist.is_initialized() else 1

    def sum_(self, flat: torch.Tensor) -> None:
        """In place: flat <- sum of flat over the group's ranks (`sum_async`, waited)."""
        work = self.sum_async(flat)
        if work is not None:
            work.wait()

    def sum_async(self, flat: torch.Tensor):
        """Start flat <- sum over the group's ranks, in place. Returns the work handle, whose
        `wait()` must come before `flat` is read or written again, or None when there is nothing
        to wait for (one rank)."""
        if self.world_size == 1:
            return None
        communicated = on_collective_device(flat, self.group)
        work = dist.all_reduce(communicated, op=dist.ReduceOp.SUM, group=self.group, async_op=True)
        return work if communicated is flat else _CopiedBack(work, communicated, flat)

    def check_identical(self, kept: torch.Tensor) -> None:
        """Raise RuntimeError, on every rank, unless all ranks hold the same bool mask `kept` [D].

        max(kept) and max(-kept) in one all-reduce give max and min over ranks; only on a mismatch
        are the masks gathered to name the ranks and rows that differ.
        """
        if self.world_size == 1:
            return
        as_int = on_collective_device(kept, self.group).to(torch.int32)
        extremes = torch.stack([as_int, -as_int])
        dist.all_reduce(extremes, op=dist.ReduceOp.MAX, group=self.group)
        differs = extremes[0] != -extremes[1]
        if not bool(differs.any()):
            return
        gathered = [torch.empty_like(as_int) for _ in range(self.world_size)]
        dist.all_gather(gathered, as_int, group=self.group)
        rows = torch.nonzero(differs).flatten()
        rows, gathered = rows.cpu(), [mask.cpu() for mask in gathered]
        reference = gathered[0]
        ranks = [rank for rank, mask in enumerate(gathered) if not torch.equal(mask, reference)]
        raise RuntimeError(
            f"Variance Pruning masks differ across data-parallel ranks: ranks {ranks} disagree with "
            f"rank 0 on {rows.numel()} of {kept.numel()} rows (first rows {rows[:8].tolist()}). The "
            "statistics must be all-reduced identically on every rank; check that every rank runs the "
            "same number of `pruner.step()` calls and forward passes inside `pruner.observe`.")
