"""Global batches, split over data-parallel ranks and micro-batches, resumable.

A training step consumes one *global batch* of ``global_batch_size`` examples. The sampler
chooses it from ``(seed, epoch, step)`` alone; :func:`iter_micro_batches` then gives rank ``r``
of ``world_size`` the contiguous slice ``[r * G / W, (r + 1) * G / W)`` of it, cut into
``G / (W * micro_batch_size)`` micro-batches (the gradient-accumulation steps). The union of
one step's micro-batches over all ranks is therefore the same global batch, masks included,
for every ``(world_size, micro_batch_size)``: the statistics of a step depend only on the
global batch.

Resuming: ``state_dict()`` is ``{epoch, position, ...}`` where ``position`` counts the global
batches of ``epoch`` already handed out (a batch counts once it is yielded, so a checkpoint taken
after training on it records it as consumed). ``load_state_dict`` continues with the next one,
also on a different number of ranks, since the global batch does not depend on the split.

Two samplers, one protocol (``iter_global_batches(dataset)``, ``state_dict``, ``load_state_dict``):

* :class:`GlobalBatchSampler` for map-style ``Dataset``\\ s: a permutation per epoch from
  ``numpy.random.default_rng([seed, epoch])``; the last partial global batch is dropped.
* :class:`StreamingGlobalBatchSampler` for ``IterableDataset``\\ s: a buffered shuffle seeded by
  ``seed`` and re-drawn per epoch (``set_epoch``); every rank reads the whole stream and keeps
  its slice, and resuming re-reads and discards ``position`` global batches.

Both iterate forever, epoch after epoch; stop after the number of steps you want.

Typical loop (DeepSpeed: one ``engine.backward``/``engine.step`` per micro-batch)::

    sampler = GlobalBatchSampler(len(dataset), global_batch_size=256, seed=0)
    collator = MLMCollator(tokenizer, seq_len=128, seed=0)
    steps = iter_micro_batches(dataset, sampler, rank=rank, world_size=world,
                               micro_batch_size=32, collator=collator)
    for step, micro_batches in zip(range(start_step, total_steps), steps):
        for batch in micro_batches: ...
        checkpoint["data"] = sampler.state_dict()
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, Callable, Protocol, Union

import datasets
import numpy as np
import torch

logger = logging.getLogger(__name__)

Batch = dict[str, torch.Tensor]
Collator = Callable[..., Batch]


@dataclass(frozen=True)
class GlobalBatch:
    """One step's examples: ``example_ids`` are dataset indices (map-style) or positions in the
    epoch's shuffled stream (streaming); ``examples`` holds the rows when they were read already."""

    epoch: int
    step: int  # index of this global batch within its epoch
    example_ids: np.ndarray
    examples: list[dict[str, Any]] | None = None


class Sampler(Protocol):
    global_batch_size: int

    def iter_global_batches(self, dataset: Any) -> Iterator[GlobalBatch]: ...

    def state_dict(self) -> dict[str, int]: ...

    def load_state_dict(self, state: dict[str, int]) -> None: ...


class _ResumableSampler:
    def __init__(self, global_batch_size: int, seed: int) -> None:
        if global_batch_size < 1:
            raise ValueError(f"global_batch_size={global_batch_size} must be >= 1")
        self.global_batch_size = global_batch_size
        self.seed = seed
        self.epoch = 0
        self.position = 0  # global batches of `epoch` already yielded

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self.epoch,
            "position": self.position,
            "seed": self.seed,
            "global_batch_size": self.global_batch_size,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        for name in ("seed", "global_batch_size"):
            if state[name] != getattr(self, name):
                raise ValueError(
                    f"the data state was saved with {name}={state[name]} but this sampler has "
                    f"{name}={getattr(self, name)}; resume with the same value"
                )
        self.epoch, self.position = int(state["epoch"]), int(state["position"])

    def _next_epoch(self) -> None:
        self.epoch += 1
        self.position = 0
        logger.info("data: epoch %d begins", self.epoch)


class GlobalBatchSampler(_ResumableSampler):
    """Global batches of indices into a map-style dataset of ``num_samples`` rows."""

    def __init__(self, num_samples: int, global_batch_size: int, seed: int, *, shuffle: bool = True) -> None:
        super().__init__(global_batch_size, seed)
        if num_samples < global_batch_size:
            raise ValueError(
                f"num_samples={num_samples} is smaller than global_batch_size={global_batch_size}: "
                "not even one global batch; use a larger corpus or a smaller batch"
            )
        self.num_samples = num_samples
        self.shuffle = shuffle

    @property
    def batches_per_epoch(self) -> int:
        return self.num_samples // self.global_batch_size

    def state_dict(self) -> dict[str, int]:
        return {**super().state_dict(), "num_samples": self.num_samples}

    def load_state_dict(self, state: dict[str, int]) -> None:
        if state.get("num_samples", self.num_samples) != self.num_samples:
            raise ValueError(
                f"the data state was saved for num_samples={state['num_samples']} but the dataset has "
                f"{self.num_samples} rows; resume on the same dataset"
            )
        super().load_state_dict(state)

    def epoch_order(self, epoch: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_samples)
        return np.random.default_rng([self.seed, epoch]).permutation(self.num_samples)

    def iter_global_batches(self, dataset: Any = None) -> Iterator[GlobalBatch]:
        if dataset is not None and len(dataset) != self.num_samples:
            raise ValueError(
                f"the dataset has {len(dataset)} rows but the sampler was built for num_samples={self.num_samples}"
            )
        while True:
            if self.position >= self.batches_per_epoch:
                self._next_epoch()
            order = self.epoch_order(self.epoch)
            while self.position < self.batches_per_epoch:
                step = self.position
                ids = order[step * self.global_batch_size : (step + 1) * self.global_batch_size]
                self.position += 1
                yield GlobalBatch(self.epoch, step, ids)


class StreamingGlobalBatchSampler(_ResumableSampler):
    """Global batches read from an ``IterableDataset``, shuffled through a buffer per epoch."""

    def __init__(self, global_batch_size: int, seed: int, *, shuffle_buffer_size: int = 10_000) -> None:
        super().__init__(global_batch_size, seed)
        if shuffle_buffer_size < 0:
            raise ValueError(f"shuffle_buffer_size={shuffle_buffer_size} must be >= 0 (0 turns shuffling off)")
        self.shuffle_buffer_size = shuffle_buffer_size

    def iter_global_batches(self, dataset: datasets.IterableDataset) -> Iterator[GlobalBatch]:
        if not isinstance(dataset, datasets.IterableDataset):
            raise TypeError(f"StreamingGlobalBatchSampler reads an IterableDataset, got {type(dataset).__name__}")
        if self.shuffle_buffer_size:
            dataset = dataset.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer_size)
        while True:
            dataset.set_epoch(self.epoch)
            rows = iter(dataset)
            skipped = self.position
            for _ in range(skipped * self.global_batch_size):  # resume: re-read what was consumed
                next(rows, None)
            yielded = 0
            while True:
                examples = list(itertools.islice(rows, self.global_batch_size))
                if len(examples) < self.global_batch_size:
                    break  # the last partial global batch is dropped
                step = self.position
                first = step * self.global_batch_size
                self.position += 1
                yielded += 1
                yield GlobalBatch(self.epoch, step, np.arange(first, first + self.global_batch_size), examples)
            if yielded == 0 and skipped == 0:
                raise ValueError(f"the stream holds fewer than global_batch_size={self.global_batch_size} examples")
            self._next_epoch()


def iter_micro_batches(
    dataset: Union[datasets.Dataset, datasets.IterableDataset],
    sampler: Sampler,
    *,
    rank: int,
    world_size: int,
    micro_batch_size: int,
    collator: Collator,
) -> Iterator[list[Batch]]:
    """Per global step, this rank's ``G / (world_size * micro_batch_size)`` collated micro-batches.

    Checks the split at once (not at the first ``next``); the collator is called as
    ``collator(examples, keys)`` with ``keys[i] = (epoch, example_id)``.
    """
    per_rank = check_split(sampler.global_batch_size, rank, world_size, micro_batch_size)
    return _micro_batches(dataset, sampler, slice(rank * per_rank, (rank + 1) * per_rank), micro_batch_size, collator)


def check_split(global_batch_size: int, rank: int, world_size: int, micro_batch_size: int) -> int:
    """Examples per rank and step; refuses a global batch that does not split evenly."""
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"rank={rank} must be in [0, world_size={world_size})")
    if micro_batch_size < 1 or global_batch_size % (world_size * micro_batch_size):
        raise ValueError(
            f"global_batch_size={global_batch_size} must be a multiple of world_size * micro_batch_size = "
            f"{world_size} * {micro_batch_size} = {world_size * micro_batch_size}"
        )
    return global_batch_size // world_size


def _micro_batches(
    dataset: Any, sampler: Sampler, mine: slice, micro_batch_size: int, collator: Collator
) -> Iterator[list[Batch]]:
    for batch in sampler.iter_global_batches(dataset):
        ids = batch.example_ids[mine]
        examples = batch.examples[mine] if batch.examples is not None else _rows(dataset, ids)
        micro_batches = []
        for start in range(0, len(ids), micro_batch_size):
            part = slice(start, start + micro_batch_size)
            keys = [(batch.epoch, int(i)) for i in ids[part]]
            micro_batches.append(collator(examples[part], keys))
        yield micro_batches


def _rows(dataset: datasets.Dataset, ids: np.ndarray) -> list[dict[str, Any]]:
    columns = dataset[ids.tolist()]
    return [dict(zip(columns, values)) for values in zip(*columns.values())]
