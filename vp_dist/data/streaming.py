"""Streaming for corpora too large to preprocess: every rank reads and tokenises only its part.

:func:`split_documents_by_rank` gives rank ``r`` of ``W`` its documents before any tokenisation:
whole shards (``datasets.distributed.split_dataset_by_node``) when the stream's shard count is a
multiple of ``W``, else every ``W``-th document. :class:`RankStream` then packs / pairs them
(the phase builder given), shuffles through a buffer re-seeded per epoch, and yields this
rank's micro-batches; in a ``DataLoader`` worker it runs beside training (background prefetch).

Unlike prepared data, a step's global batch here depends on the number of ranks (each rank
reads its own part of the stream), so a streamed phase resumes on the same number of ranks
only, and resuming at step ``n`` re-reads and drops this rank's ``n * G / W`` rows (1/W of
the stream, not ``n * G`` rows on every rank). Masks are keyed by ``(epoch, row * W + rank)``.
"""

from __future__ import annotations

from collections.abc import Iterator

import datasets
import torch
from datasets.distributed import split_dataset_by_node

from vp_dist.data.sampler import Batch, Collator, check_split


def split_documents_by_rank(documents: datasets.IterableDataset, rank: int, world_size: int) -> datasets.IterableDataset:
    """This rank's documents: before the tokenising map, so no rank tokenises another's."""
    if documents.num_shards % world_size == 0:
        return split_dataset_by_node(documents, rank=rank, world_size=world_size)
    # split_dataset_by_node would keep every W-th *row of the final chain* (after tokenising all)
    return documents.filter(lambda _, index: index % world_size == rank, with_indices=True)


class RankStream(torch.utils.data.IterableDataset):
    """This rank's ``(step, batch)`` micro-batches, ``G / (W * micro_batch_size)`` per step, forever."""

    def __init__(
        self,
        rows: datasets.IterableDataset,
        collator: Collator,
        *,
        rank: int,
        world_size: int,
        global_batch_size: int,
        micro_batch_size: int,
        seed: int,
        shuffle_buffer_size: int = 10_000,
        start_step: int = 0,
    ) -> None:
        self.per_rank = check_split(global_batch_size, rank, world_size, micro_batch_size)
        self.rows, self.collator = rows, collator
        self.rank, self.world_size, self.micro_batch_size = rank, world_size, micro_batch_size
        self.seed, self.shuffle_buffer_size, self.start_step = seed, shuffle_buffer_size, start_step

    def __iter__(self) -> Iterator[tuple[int, Batch]]:
        rows = self.rows.shuffle(seed=self.seed, buffer_size=self.shuffle_buffer_size) if self.shuffle_buffer_size else self.rows
        step, epoch = 0, 0
        while True:
            rows.set_epoch(epoch)
            stream, index, steps_before = iter(rows), 0, step
            while True:
                examples = [example for _, example in zip(range(self.per_rank), stream)]
                if len(examples) < self.per_rank:
                    break  # the last partial share of an epoch is dropped
                keys = [(epoch, (index + i) * self.world_size + self.rank) for i in range(self.per_rank)]
                index += self.per_rank
                if step >= self.start_step:  # resuming: earlier steps are read and dropped, not collated
                    for start in range(0, self.per_rank, self.micro_batch_size):
                        part = slice(start, start + self.micro_batch_size)
                        yield step, self.collator(examples[part], keys[part])
                step += 1
            if step == steps_before:
                raise ValueError(
                    f"rank {self.rank}'s part of the stream holds fewer than {self.per_rank} rows "
                    "(global_batch / world_size): use a larger corpus or a smaller global batch"
                )
            epoch += 1
