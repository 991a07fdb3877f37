"""Data pipeline for BERT pre-training: corpus -> tokenizer -> phase dataset -> global batches.

The pre-training entry point calls, in order::

    documents, stats = load_documents(corpus, cache_dir=cache)           # documents.py
    tokenizer = load_or_train_tokenizer(None, documents, 30522, run_dir / "tokenizer")
    dataset = build_mlm_dataset(documents, tokenizer, seq_len=128, cache_dir=cache)   # phase 1
    dataset = build_nsp_dataset(documents, tokenizer, seq_len=512, seed=0, cache_dir=cache)  # phase 2
    collator = MLMCollator(tokenizer, seq_len=128, seed=0)                # collator.py
    sampler = GlobalBatchSampler(len(dataset), global_batch_size, seed=0) # sampler.py
    for micro_batches in iter_micro_batches(dataset, sampler, rank=r, world_size=w,
                                            micro_batch_size=m, collator=collator): ...

With ``load_documents(..., streaming=True)`` the phase builders return ``IterableDataset``\\ s;
use :class:`StreamingGlobalBatchSampler` for them (every rank reads the whole stream, batches do
not depend on the world size), or :class:`~vp_dist.data.streaming.RankStream` after
:func:`~vp_dist.data.streaming.split_documents_by_rank` (each rank reads its part; what training uses).

At scale, tokenise offline instead (``launch/preprocess.py``)::

    folder = prepare_corpus(corpus, "data/wiki", seq_len=128, num_proc=16)   # prepare.py
    dataset = PreparedDataset(folder)                                        # shards.py: rows by index
    sampler = GlobalBatchSampler(len(dataset), global_batch_size, seed=0)
    for epoch, step, batch in prepared_loader(dataset, sampler, collator, rank=r, world_size=w,
                                              micro_batch_size=m, num_workers=2): ...   # loader.py

Each module's docstring states its contract.
"""

from vp_dist.data.collator import IGNORE_INDEX, MLMCollator
from vp_dist.data.documents import DataStats, default_corpus_path, hub_is_offline, load_documents
from vp_dist.data.loader import prepared_loader
from vp_dist.data.mlm import build_mlm_dataset, pack_sequences, tokenize_documents
from vp_dist.data.nsp import IS_NEXT, IS_RANDOM, build_nsp_dataset
from vp_dist.data.prepare import prepare_corpus
from vp_dist.data.sampler import GlobalBatch, GlobalBatchSampler, StreamingGlobalBatchSampler, iter_micro_batches
from vp_dist.data.shards import PreparedDataset
from vp_dist.data.tokenizer import SPECIAL_TOKENS, load_or_train_tokenizer, train_wordpiece_tokenizer

__all__ = [
    "IGNORE_INDEX",
    "IS_NEXT",
    "IS_RANDOM",
    "SPECIAL_TOKENS",
    "DataStats",
    "GlobalBatch",
    "GlobalBatchSampler",
    "MLMCollator",
    "PreparedDataset",
    "StreamingGlobalBatchSampler",
    "build_mlm_dataset",
    "build_nsp_dataset",
    "default_corpus_path",
    "hub_is_offline",
    "iter_micro_batches",
    "load_documents",
    "load_or_train_tokenizer",
    "pack_sequences",
    "prepare_corpus",
    "prepared_loader",
    "tokenize_documents",
    "train_wordpiece_tokenizer",
]
