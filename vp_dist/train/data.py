"""The data of one pre-training phase, from the run config (the loop's only view of vp_dist.data).

Three sources, one interface (``next_step()``, ``state_dict()``, ``load_state_dict()``):

* ``data.prepared``: shards written by ``launch/preprocess.py``; each rank reads only its slice
  of the global batch, in ``data.num_workers`` DataLoader processes; resuming costs one
  permutation, no read. The manifests are checked against the run before training starts.
* ``data.streaming``: every rank streams and tokenises only its part of the corpus, in one
  background DataLoader worker (:mod:`vp_dist.data.streaming`).
* otherwise in memory: rank 0 tokenises into the ``datasets`` caches, the other ranks then read
  them. They wait in a barrier of a gloo group with a 24-hour timeout, not in the training
  process group, whose timeout (``dist_timeout_minutes``) a long tokenisation would exceed.
"""
from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader

from ..data import (GlobalBatchSampler, MLMCollator, build_mlm_dataset, build_nsp_dataset, iter_micro_batches,
                    load_documents, load_or_train_tokenizer)
from ..data.loader import prepared_loader
from ..data.shards import TOKENIZER_DIR, PreparedDataset, check_manifest, dataset_dir, read_manifest
from ..data.streaming import RankStream, split_documents_by_rank
from .config import PhaseSpec, RunConfig

logger = logging.getLogger(__name__)
_wait_group = None  # gloo group for waiting on rank 0's tokenisation; created on first use


def _rank_zero_first(build):
    """Run `build()` on rank 0, then on the others (which hit rank 0's caches)."""
    global _wait_group
    if _wait_group is None:
        _wait_group = dist.new_group(backend="gloo", timeout=timedelta(hours=24))
    if dist.get_rank() == 0:
        result = build()
        dist.barrier(group=_wait_group)
    else:
        dist.barrier(group=_wait_group)
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
    """The run's tokenizer: given, the prepared data's, or trained on the corpus by rank 0; saved with
    the run. With prepared data, every phase's manifest is checked against it here, before training."""
    save_dir = Path(cfg.output_dir) / "tokenizer"
    given = cfg.data.tokenizer
    if cfg.data.prepared and given is None:
        given = str(Path(cfg.data.prepared) / TOKENIZER_DIR)
        if not Path(given).is_dir():
            raise FileNotFoundError(f"data.prepared={cfg.data.prepared!r} holds no {TOKENIZER_DIR}/ folder; "
                                    "set data.tokenizer to the tokenizer the data was prepared with")

    def build():
        documents, _ = load_corpus(cfg) if rank == 0 and given is None else ([], None)
        return load_or_train_tokenizer(given, documents, cfg.data.vocab_size, save_dir)
    tokenizer = _rank_zero_first(build)
    if cfg.data.prepared:
        check_prepared(cfg, tokenizer)
    return tokenizer


def check_prepared(cfg: RunConfig, tokenizer) -> None:
    """Refuse, before training, prepared data that is missing or does not match a phase."""
    for index, phase in enumerate(cfg.phases):
        folder = dataset_dir(cfg.data.prepared, phase.objective, phase.seq_len)
        manifest = read_manifest(folder)
        where = f"phases[{index}] ({phase.name}), data.prepared {folder}"
        check_manifest(manifest, objective=phase.objective, seq_len=phase.seq_len, tokenizer=tokenizer, where=where)
        nsp_seed = (manifest.get("nsp") or {}).get("seed", cfg.seed)
        if nsp_seed != cfg.seed:
            logger.warning("%s: NSP pairs were drawn with seed %d, the run's seed is %d", where, nsp_seed, cfg.seed)
        if manifest["rows"] < phase.global_batch:
            raise ValueError(f"{where}: {manifest['rows']} rows, fewer than global_batch={phase.global_batch}")


class PhaseData:
    """This rank's micro-batches of each optimizer step of one phase, resumable."""

    def __init__(self, cfg: RunConfig, phase: PhaseSpec, tokenizer, rank: int, world_size: int, output_dir):
        self.cfg, self.phase, self.rank, self.world_size = cfg, phase, rank, world_size
        self.collator = MLMCollator(tokenizer, seq_len=phase.seq_len, mlm_probability=phase.mlm_probability,
                                    seed=cfg.seed)
        self.micro_batches_per_step = phase.global_batch // (world_size * phase.micro_batch)
        self.pin_memory = torch.cuda.is_available()
        self._steps = None
        self._consumed: dict | None = None  # prepared / streaming: what the loop has taken so far
        if cfg.data.prepared:
            self.dataset = PreparedDataset(dataset_dir(cfg.data.prepared, phase.objective, phase.seq_len))
            self.sampler = GlobalBatchSampler(len(self.dataset), phase.global_batch, seed=cfg.seed)
        elif cfg.data.streaming:
            self.dataset = self._stream(tokenizer)
            self._consumed = {"steps": 0, "world_size": world_size, "global_batch": phase.global_batch}
        else:
            self.dataset = _rank_zero_first(lambda: self._in_memory(tokenizer))
            if len(self.dataset) < phase.global_batch:
                raise ValueError(f"phase {phase.name}: the corpus gives {len(self.dataset)} sequences of "
                                 f"{phase.seq_len} tokens, fewer than global_batch={phase.global_batch}")
            self.sampler = GlobalBatchSampler(len(self.dataset), phase.global_batch, seed=cfg.seed)

    def _in_memory(self, tokenizer):
        documents, stats = load_corpus(self.cfg)
        if self.rank == 0 and stats is not None:
            logger.info("corpus: %s", stats.summary())
        phase, num_proc = self.phase, self.cfg.data.num_proc
        if phase.objective == "mlm+nsp":
            return build_nsp_dataset(documents, tokenizer, seq_len=phase.seq_len, seed=self.cfg.seed,
                                     cache_dir=cache_dir(self.cfg), num_proc=num_proc)
        return build_mlm_dataset(documents, tokenizer, seq_len=phase.seq_len, cache_dir=cache_dir(self.cfg),
                                 num_proc=num_proc)

    def _stream(self, tokenizer):
        documents, _ = load_corpus(self.cfg)
        documents = split_documents_by_rank(documents, self.rank, self.world_size)
        if self.phase.objective == "mlm+nsp":
            return build_nsp_dataset(documents, tokenizer, seq_len=self.phase.seq_len, seed=self.cfg.seed)
        return build_mlm_dataset(documents, tokenizer, seq_len=self.phase.seq_len)

    def _open(self):
        data, phase = self.cfg.data, self.phase
        if data.prepared:
            return iter(prepared_loader(self.dataset, self.sampler, self.collator, rank=self.rank,
                                        world_size=self.world_size, micro_batch_size=phase.micro_batch,
                                        num_workers=data.num_workers, pin_memory=self.pin_memory))
        if data.streaming:  # one worker: a generator-backed stream has a single shard to read
            stream = RankStream(self.dataset, self.collator, rank=self.rank, world_size=self.world_size,
                                global_batch_size=phase.global_batch, micro_batch_size=phase.micro_batch,
                                seed=self.cfg.seed, start_step=self._consumed["steps"])
            return iter(DataLoader(stream, batch_size=None, num_workers=min(data.num_workers, 1),
                                   pin_memory=self.pin_memory, generator=torch.Generator().manual_seed(0)))
        return iter_micro_batches(self.dataset, self.sampler, rank=self.rank, world_size=self.world_size,
                                  micro_batch_size=phase.micro_batch, collator=self.collator)

    def next_step(self) -> list:
        if self._steps is None:
            self._steps = self._open()
        if not (self.cfg.data.prepared or self.cfg.data.streaming):
            return next(self._steps)
        items = [next(self._steps) for _ in range(self.micro_batches_per_step)]
        if self.cfg.data.prepared:  # the loader's sampler runs ahead: record what was consumed
            epoch, step, _ = items[-1]
            self._consumed = {"epoch": epoch, "position": step + 1}
        else:
            self._consumed["steps"] = items[-1][0] + 1
        return [item[-1] for item in items]

    def state_dict(self) -> dict:
        if self.cfg.data.streaming and not self.cfg.data.prepared:
            return dict(self._consumed)
        return {**self.sampler.state_dict(), **(self._consumed or {})}

    def load_state_dict(self, state: dict) -> None:
        if self.cfg.data.streaming and not self.cfg.data.prepared:
            for key in ("world_size", "global_batch"):
                if state.get(key) != self._consumed[key]:
                    raise ValueError(
                        f"phase {self.phase.name}: the streamed data was checkpointed with {key}={state.get(key)} but "
                        f"this run has {key}={self._consumed[key]}; a stream resumes with the same value (every rank "
                        "reads its own part of it): prepare the corpus (data.prepared) to change the number of ranks")
            self._consumed = dict(state)
        else:
            self.sampler.load_state_dict(state)
            self._consumed = None
        self._steps = None
