"""The data of one pre-training phase, from the run config (the loop's only view of vp_dist.data).

Rank 0 builds every `datasets` cache first; the other ranks then read the same caches, so a
corpus is tokenised once per machine, not once per rank.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch.distributed as dist

from ..data import (GlobalBatchSampler, MLMCollator, StreamingGlobalBatchSampler, build_mlm_dataset,
                    build_nsp_dataset, iter_micro_batches, load_documents, load_or_train_tokenizer)
from .config import PhaseSpec, RunConfig

logger = logging.getLogger(__name__)


def _rank_zero_first(build):
    """Run `build()` on rank 0, then on the others (which hit rank 0's caches)."""
    if dist.get_rank() == 0:
        result = build()
        dist.barrier()
    else:
        dist.barrier()
        result = build()
    return result


def cache_dir(cfg: RunConfig) -> Path:
    return Path(cfg.data.cache_dir) if cfg.data.cache_dir else Path(cfg.output_dir) / "cache"


def load_corpus(cfg: RunConfig):
    corpus = None if cfg.data.corpus == "default" else cfg.data.corpus
    documents, stats = load_documents(corpus, config_name=cfg.data.hub_config, text_field=cfg.data.text_field,
                                      streaming=cfg.data.streaming, cache_dir=cache_dir(cfg),
                                      max_document_chars=cfg.data.max_document_chars)
    return documents, stats


def prepare_tokenizer(cfg: RunConfig, rank: int):
    """The run's tokenizer: given, or trained on the corpus by rank 0 and saved with the run."""
    save_dir = Path(cfg.output_dir) / "tokenizer"

    def build():
        documents, _ = load_corpus(cfg) if rank == 0 else ([], None)
        return load_or_train_tokenizer(cfg.data.tokenizer, documents, cfg.data.vocab_size, save_dir)
    return _rank_zero_first(build)


class PhaseData:
    """This rank's micro-batches of each optimizer step of one phase, resumable."""

    def __init__(self, cfg: RunConfig, phase: PhaseSpec, tokenizer, rank: int, world_size: int, output_dir):
        def build():
            documents, stats = load_corpus(cfg)
            if rank == 0 and stats is not None:
                logger.info("corpus: %s", stats.summary())
            if phase.objective == "mlm+nsp":
                return build_nsp_dataset(documents, tokenizer, seq_len=phase.seq_len, seed=cfg.seed,
                                         cache_dir=cache_dir(cfg))
            return build_mlm_dataset(documents, tokenizer, seq_len=phase.seq_len, cache_dir=cache_dir(cfg))
        self.dataset = _rank_zero_first(build)
        if cfg.data.streaming:
            self.sampler = StreamingGlobalBatchSampler(phase.global_batch, seed=cfg.seed)
        else:
            if len(self.dataset) < phase.global_batch:
                raise ValueError(f"phase {phase.name}: the corpus gives {len(self.dataset)} sequences of "
                                 f"{phase.seq_len} tokens, fewer than global_batch={phase.global_batch}")
            self.sampler = GlobalBatchSampler(len(self.dataset), phase.global_batch, seed=cfg.seed)
        self.collator = MLMCollator(tokenizer, seq_len=phase.seq_len, mlm_probability=phase.mlm_probability,
                                    seed=cfg.seed)
        self.rank, self.world_size, self.micro_batch = rank, world_size, phase.micro_batch
        self._steps = None

    def next_step(self) -> list:
        if self._steps is None:
            self._steps = iter_micro_batches(self.dataset, self.sampler, rank=self.rank,
                                             world_size=self.world_size, micro_batch_size=self.micro_batch,
                                             collator=self.collator)
        return next(self._steps)

    def state_dict(self) -> dict:
        return self.sampler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.sampler.load_state_dict(state)
        self._steps = None
