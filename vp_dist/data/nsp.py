"""Phase 2 data (MLM + NSP, seq_len 512): sentence pairs A/B, half of them with a random B.

Follows BERT's ``create_instances_from_document``, in a batched ``Dataset.map`` over documents:

* each paragraph is split into sentences (a regex on sentence-ending punctuation), and the
  sentences are tokenised; a document is its list of tokenised sentences (segments);
* segments are gathered into a chunk until it reaches a target length (``seq_len - 3``, or with
  probability ``short_seq_prob`` a random shorter one); A = the first 1..n-1 segments;
* a fair coin, drawn first so the labels stay balanced, picks the pair's label:
  ``next_sentence_label`` 0 = B is the text that follows A (the rest of the chunk, or the second
  part of a lone long segment cut at a random token), 1 = B is taken from a random other
  document of the same map batch (segments of the chunk that B did not use are put back);
* the pair is truncated to ``seq_len - 3`` tokens, A from its front and B from its back, so a
  "next" pair stays adjacent at the A|B boundary; rows are ``[CLS] A [SEP] B [SEP]`` with
  ``token_type_ids`` 0 for ``[CLS] A [SEP]`` and 1 for ``B [SEP]``, not padded (the collator
  pads to ``seq_len``).

Randomness comes from ``numpy.random.default_rng([seed, first document index of the batch])``:
the rows depend only on (corpus, tokenizer, seed, seq_len, short_seq_prob, documents_per_batch)
and, with ``num_proc > 1``, on ``num_proc`` (it moves batch boundaries). A batch holding a single
document has no other document to draw B from, so its pairs are all "next".
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from functools import partial
from typing import Any

import datasets
import numpy as np
from transformers import PreTrainedTokenizerBase

from vp_dist.data.caching import AnyDataset, map_cache_kwargs, tokenizer_fingerprint

NSP_FEATURES = datasets.Features(
    {
        "input_ids": datasets.Sequence(datasets.Value("int32")),
        "token_type_ids": datasets.Sequence(datasets.Value("int8")),
        "attention_mask": datasets.Sequence(datasets.Value("int8")),
        "next_sentence_label": datasets.Value("int8"),
    }
)
IS_NEXT, IS_RANDOM = 0, 1  # as HF BertForPreTraining's next_sentence_label
NSP_VERSION = 1  # bump when the pairing rules change, so cached pairs are rebuilt
SENTENCE_BREAK = re.compile(r"(?:(?<=[.!?])|(?<=[.!?][\"'”’)\]]))\s+(?=[\"'“‘(\[]?[A-Z0-9])")


def build_nsp_dataset(
    documents: AnyDataset,
    tokenizer: PreTrainedTokenizerBase,
    *,
    seq_len: int = 512,
    seed: int = 0,
    short_seq_prob: float = 0.1,
    documents_per_batch: int = 256,
    cache_dir: str | os.PathLike[str] | None = None,
    num_proc: int | None = None,
) -> AnyDataset:
    """Documents (a ``text`` column) -> NSP sentence-pair rows: the phase-2 dataset."""
    if seq_len < 5:
        raise ValueError(f"seq_len={seq_len} must be >= 5 to hold [CLS] A [SEP] B [SEP]")
    if not 0.0 <= short_seq_prob <= 1.0:
        raise ValueError(f"short_seq_prob={short_seq_prob} must be in [0, 1]")
    make_pairs = partial(
        pairs_batch, tokenizer=tokenizer, seq_len=seq_len, seed=seed, short_seq_prob=short_seq_prob
    )
    common: dict[str, Any] = dict(
        batched=True, batch_size=documents_per_batch, with_indices=True, remove_columns=["text"], features=NSP_FEATURES
    )
    if isinstance(documents, datasets.IterableDataset):
        return documents.map(make_pairs, **common)
    settings = (tokenizer_fingerprint(tokenizer), seq_len, seed, short_seq_prob, documents_per_batch, NSP_VERSION)
    cache = map_cache_kwargs(documents, cache_dir, "nsp", *settings)
    return documents.map(make_pairs, num_proc=num_proc, desc="building NSP pairs", **common, **cache)


def split_sentences(text: str) -> list[str]:
    """Sentences of a document: each paragraph (line) split after . ! ? before a capital or digit."""
    return [s for paragraph in text.split("\n") for s in SENTENCE_BREAK.split(paragraph.strip()) if s]


def pairs_batch(
    batch: dict[str, list[str]],
    indices: list[int],
    tokenizer: PreTrainedTokenizerBase,
    seq_len: int,
    seed: int,
    short_seq_prob: float,
) -> dict[str, list[Any]]:
    """The NSP rows of one batch of documents (``indices``: their positions in the corpus); the map
    function of :func:`build_nsp_dataset`, also called by offline preprocessing (prepare.py)."""
    rng = np.random.default_rng([seed, indices[0]])
    sentences = [split_sentences(text) for text in batch["text"]]
    encoded = tokenizer(
        [s for doc in sentences for s in doc],
        add_special_tokens=False,
        return_attention_mask=False,
        return_token_type_ids=False,
        verbose=False,
    )["input_ids"]
    documents: list[list[list[int]]] = []
    start = 0
    for doc in sentences:
        documents.append([ids for ids in encoded[start : start + len(doc)] if ids])
        start += len(doc)

    rows: dict[str, list[Any]] = {name: [] for name in NSP_FEATURES}
    cls_id, sep_id = tokenizer.cls_token_id, tokenizer.sep_token_id
    for doc_index in range(len(documents)):
        for tokens_a, tokens_b, label in document_pairs(doc_index, documents, rng, seq_len - 3, short_seq_prob):
            rows["input_ids"].append([cls_id, *tokens_a, sep_id, *tokens_b, sep_id])
            rows["token_type_ids"].append([0] * (len(tokens_a) + 2) + [1] * (len(tokens_b) + 1))
            rows["attention_mask"].append([1] * (len(tokens_a) + len(tokens_b) + 3))
            rows["next_sentence_label"].append(label)
    return rows


def document_pairs(
    doc_index: int,
    documents: list[list[list[int]]],
    rng: np.random.Generator,
    max_tokens: int,
    short_seq_prob: float,
) -> Iterator[tuple[list[int], list[int], int]]:
    """(tokens_a, tokens_b, next_sentence_label) pairs of one document; ``documents`` are segment lists."""
    segments = documents[doc_index]
    others = [i for i, doc in enumerate(documents) if i != doc_index and doc]
    target = _target_length(rng, max_tokens, short_seq_prob)
    chunk: list[list[int]] = []
    chunk_tokens = 0
    i = 0
    while i < len(segments):
        chunk.append(segments[i])
        chunk_tokens += len(segments[i])
        i += 1
        if i < len(segments) and chunk_tokens < target:
            continue
        if chunk_tokens >= 2:
            label = IS_RANDOM if others and rng.random() < 0.5 else IS_NEXT
            a_end = int(rng.integers(1, len(chunk))) if len(chunk) > 1 else 1
            tokens_a = [t for segment in chunk[:a_end] for t in segment]
            if label == IS_RANDOM:
                other = documents[int(rng.choice(others))]
                tokens_b = _tokens_from(other, int(rng.integers(len(other))), max(1, target - len(tokens_a)))
                i -= len(chunk) - a_end  # B did not use them: they start the next chunk
            elif len(chunk) > 1:
                tokens_b = [t for segment in chunk[a_end:] for t in segment]
            else:  # one long segment: its continuation is the next text
                cut = int(rng.integers(1, len(tokens_a)))
                tokens_a, tokens_b = tokens_a[:cut], tokens_a[cut:]
            yield (*truncate_pair(tokens_a, tokens_b, max_tokens), label)
        chunk, chunk_tokens = [], 0
        target = _target_length(rng, max_tokens, short_seq_prob)


def _target_length(rng: np.random.Generator, max_tokens: int, short_seq_prob: float) -> int:
    return int(rng.integers(2, max_tokens + 1)) if rng.random() < short_seq_prob else max_tokens


def _tokens_from(segments: list[list[int]], start: int, min_tokens: int) -> list[int]:
    tokens: list[int] = []
    for segment in segments[start:]:
        tokens.extend(segment)
        if len(tokens) >= min_tokens:
            break
    return tokens


def truncate_pair(tokens_a: list[int], tokens_b: list[int], max_tokens: int) -> tuple[list[int], list[int]]:
    """Shorten the longer side until ``len(a) + len(b) <= max_tokens``; A loses its front, B its back."""
    excess = len(tokens_a) + len(tokens_b) - max_tokens
    if excess <= 0:
        return tokens_a, tokens_b
    longer, shorter = max(len(tokens_a), len(tokens_b)), min(len(tokens_a), len(tokens_b))
    from_longer = min(excess, longer - shorter)
    rest = excess - from_longer  # shared evenly once both sides are equally long
    cut_a = (from_longer if len(tokens_a) >= len(tokens_b) else 0) + (rest + 1) // 2
    cut_b = (from_longer if len(tokens_a) < len(tokens_b) else 0) + rest // 2
    return tokens_a[cut_a:], tokens_b[: len(tokens_b) - cut_b]
