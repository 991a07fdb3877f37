"""Background loading of this rank's micro-batches from a map-style dataset (prepared shards).

:func:`prepared_loader` wraps the same global batches as :func:`~vp_dist.data.sampler.iter_micro_batches`
in a ``torch.utils.data.DataLoader``: the sampler (in the training process) hands out, per
micro-batch, ``(epoch, step, example ids)`` of this rank's slice; ``num_workers`` processes read
the rows (a micro-batch at once with ``PreparedDataset.read_rows``) and collate them (masks included, keyed by ``(epoch, example id)`` as in the in-memory
path) ahead of the training loop; ``pin_memory`` for GPU copies. The loader yields
``(epoch, step, batch)``; the caller counts what it consumed, since the sampler runs ahead.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from vp_dist.data.sampler import Collator, GlobalBatchSampler, check_split


class RankMicroBatches:
    """This rank's micro-batches of every global batch: ``(epoch, step, ids)`` items."""

    def __init__(self, sampler: GlobalBatchSampler, *, rank: int, world_size: int, micro_batch_size: int) -> None:
        per_rank = check_split(sampler.global_batch_size, rank, world_size, micro_batch_size)
        self.sampler, self.micro_batch_size = sampler, micro_batch_size
        self.mine = slice(rank * per_rank, (rank + 1) * per_rank)

    def __iter__(self) -> Iterator[tuple[int, int, np.ndarray]]:
        for batch in self.sampler.iter_global_batches():
            ids = batch.example_ids[self.mine]
            for start in range(0, len(ids), self.micro_batch_size):
                yield batch.epoch, batch.step, ids[start : start + self.micro_batch_size]


class CollatedRows(Dataset):
    """``dataset[(epoch, step, ids)]`` -> ``(epoch, step, collator(rows, keys))``, in a worker."""

    def __init__(self, dataset: Any, collator: Collator) -> None:
        self.dataset, self.collator = dataset, collator

    def __getitem__(self, item: tuple[int, int, np.ndarray]) -> tuple[int, int, dict[str, torch.Tensor]]:
        epoch, step, ids = item
        keys = np.stack([np.full(len(ids), epoch, dtype=np.int64), np.asarray(ids, dtype=np.int64)], axis=1)
        if hasattr(self.dataset, "read_rows"):  # PreparedDataset: MLM rows as (rows, seq_len) columns at once
            return epoch, step, self.collator(self.dataset.read_rows(ids), keys)
        return epoch, step, self.collator([self.dataset[int(i)] for i in ids], keys)


def prepared_loader(
    dataset: Any,
    sampler: GlobalBatchSampler,
    collator: Collator,
    *,
    rank: int,
    world_size: int,
    micro_batch_size: int,
    num_workers: int = 2,
    pin_memory: bool = False,
    prefetch_factor: int = 4,
) -> DataLoader:
    """A DataLoader of ``(epoch, step, batch)`` for this rank, reading ``num_workers`` micro-batches ahead."""
    items = RankMicroBatches(sampler, rank=rank, world_size=world_size, micro_batch_size=micro_batch_size)
    return DataLoader(
        CollatedRows(dataset, collator),
        sampler=items,
        batch_size=None,
        num_workers=num_workers,
        pin_memory=pin_memory,
        prefetch_factor=prefetch_factor if num_workers else None,
        persistent_workers=False,
        generator=torch.Generator().manual_seed(0),  # worker seeds without drawing from the training RNG
    )
