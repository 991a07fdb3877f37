"""Phase 1 data (MLM, seq_len 128): tokenise documents, then pack them into fixed blocks.

Packing (RoBERTa's "full sentences"): every document's tokens are followed by [SEP] and all
documents are concatenated into one stream in dataset order; the stream is cut into pieces of
``seq_len - 2`` tokens and each piece becomes ``[CLS] piece [SEP]``. Every block has exactly
``seq_len`` tokens except the very last one, which is padded with [PAD] (attention_mask 0).
No token is dropped. ``token_type_ids`` are all 0 (one segment).

Rows: ``input_ids`` (int32), ``token_type_ids`` and ``attention_mask`` (int8), each a list of
``seq_len`` values; :class:`~vp_dist.data.collator.MLMCollator` turns them into tensors and
adds the MLM labels. Tokenisation is a batched ``Dataset.map`` cached under ``cache_dir``;
packing carries the remainder across batches, so it is a generator written once to the cache
(or, for a streaming input, a streaming dataset).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from functools import partial
from typing import Any

import datasets
import numpy as np
import pyarrow as pa
from transformers import PreTrainedTokenizerBase

from vp_dist.data.caching import AnyDataset, map_cache_kwargs, stage_fingerprint, tokenizer_fingerprint

TOKENIZED_FEATURES = datasets.Features({"input_ids": datasets.Sequence(datasets.Value("int32"))})
PACKED_FEATURES = datasets.Features(
    {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "token_type_ids": datasets.Sequence(datasets.Value("int8")),
        "attention_mask": datasets.Sequence(datasets.Value("int8")),
    }
)
PACKING_VERSION = 1  # bump when the block layout changes, so cached blocks are rebuilt


def build_mlm_dataset(
    documents: AnyDataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seq_len: int = 128,
    cache_dir: str | os.PathLike[str] | None = None,
    num_proc: int | None = None,
) -> AnyDataset:
    """Documents (a ``text`` column) -> packed blocks of ``seq_len`` tokens: the phase-1 dataset."""
    tokenized = tokenize_documents(documents, tokenizer, cache_dir=cache_dir, num_proc=num_proc)
    return pack_sequences(
        tokenized,
        seq_len=seq_len,
        cls_token_id=tokenizer.cls_token_id,
        sep_token_id=tokenizer.sep_token_id,
        pad_token_id=tokenizer.pad_token_id,
        cache_dir=cache_dir,
    )


def tokenize_documents(
    documents: AnyDataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    num_proc: int | None = None,
    batch_size: int = 1000,
) -> AnyDataset:
    """One row per document: its token ids without special tokens, then one [SEP]."""
    encode = partial(_tokenize_batch, tokenizer=tokenizer, sep_token_id=tokenizer.sep_token_id)
    common: dict[str, Any] = dict(
        batched=True, batch_size=batch_size, remove_columns=["text"], features=TOKENIZED_FEATURES
    )
    if isinstance(documents, datasets.IterableDataset):
        return documents.map(encode, **common)
    cache = map_cache_kwargs(documents, cache_dir, "tokenized", tokenizer_fingerprint(tokenizer))
    return documents.map(encode, num_proc=num_proc, desc="tokenizing documents", **common, **cache)


def _tokenize_batch(
    batch: dict[str, list[str]], tokenizer: PreTrainedTokenizerBase, sep_token_id: int
) -> dict[str, list[list[int]]]:
    encoded = tokenizer(
        batch["text"], add_special_tokens=False, return_attention_mask=False, return_token_type_ids=False, verbose=False
    )
    return {"input_ids": [ids + [sep_token_id] for ids in encoded["input_ids"]]}


def pack_sequences(
    tokenized: AnyDataset,
    *,
    seq_len: int,
    cls_token_id: int,
    sep_token_id: int,
    pad_token_id: int,
    cache_dir: str | os.PathLike[str] | None = None,
) -> AnyDataset:
    """Concatenate the ``input_ids`` rows of ``tokenized`` and cut them into [CLS] ... [SEP] blocks."""
    if seq_len < 3:
        raise ValueError(f"seq_len={seq_len} must be >= 3 to hold [CLS], a token and [SEP]")
    special_ids = dict(cls_token_id=cls_token_id, sep_token_id=sep_token_id, pad_token_id=pad_token_id)
    gen_kwargs = dict(tokenized=tokenized, seq_len=seq_len, **special_ids)
    if isinstance(tokenized, datasets.IterableDataset):
        return datasets.IterableDataset.from_generator(_packed_rows, features=PACKED_FEATURES, gen_kwargs=gen_kwargs)
    fingerprint = stage_fingerprint(tokenized, "packed", seq_len, *special_ids.values(), PACKING_VERSION)
    return datasets.Dataset.from_generator(
        _packed_rows,
        features=PACKED_FEATURES,
        gen_kwargs=gen_kwargs,
        cache_dir=None if cache_dir is None else str(cache_dir),
        fingerprint=fingerprint,
    )


def _packed_rows(
    tokenized: AnyDataset, seq_len: int, cls_token_id: int, sep_token_id: int, pad_token_id: int
) -> Iterator[dict[str, np.ndarray]]:
    piece_len = seq_len - 2
    carry = np.empty(0, dtype=np.int32)
    for table in tokenized.with_format("arrow").iter(batch_size=1000):
        stream = np.concatenate([carry, _flat_token_ids(table)])
        full_pieces = len(stream) // piece_len
        for piece in stream[: full_pieces * piece_len].reshape(full_pieces, piece_len):
            yield _block(piece, seq_len, cls_token_id, sep_token_id, pad_token_id)
        carry = stream[full_pieces * piece_len :]
    if len(carry):
        yield _block(carry, seq_len, cls_token_id, sep_token_id, pad_token_id)


def _flat_token_ids(table: pa.Table) -> np.ndarray:
    column = table["input_ids"]
    if column.num_chunks == 0:
        return np.empty(0, dtype=np.int32)
    return column.combine_chunks().flatten().to_numpy(zero_copy_only=False).astype(np.int32, copy=False)


def _block(
    piece: np.ndarray, seq_len: int, cls_token_id: int, sep_token_id: int, pad_token_id: int
) -> dict[str, np.ndarray]:
    input_ids = np.full(seq_len, pad_token_id, dtype=np.int32)
    input_ids[0] = cls_token_id
    input_ids[1 : len(piece) + 1] = piece
    input_ids[len(piece) + 1] = sep_token_id
    attention_mask = np.zeros(seq_len, dtype=np.int8)
    attention_mask[: len(piece) + 2] = 1
    token_type_ids = np.zeros(seq_len, dtype=np.int8)
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}
