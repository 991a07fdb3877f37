"""MLM collator for both phases: pad rows to ``seq_len``, mask tokens, return tensors.

Masking follows BERT: of the maskable tokens of a row (real tokens, ``attention_mask`` 1, that
are not special tokens) exactly ``round(mlm_probability * n)`` (at least 1) are chosen; each
chosen token is replaced by [MASK] with probability ``mask_replace_prob`` (0.8), by a random
non-special token with ``random_replace_prob`` (0.1), and kept otherwise. ``labels`` hold the
original id at chosen positions and -100 everywhere else.

Determinism: the masks of a row come from ``numpy.random.default_rng([seed, *key])`` where
``key`` is given per row by the caller. :func:`~vp_dist.data.sampler.iter_micro_batches` passes
``(epoch, example_index)``, so an example is masked the same way whichever rank, micro-batch
or resumed run collates it; global-batch statistics then do not depend on the world size.
Without keys the collator numbers its own calls, which is deterministic for a fixed call order.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # the label torch's cross-entropy ignores


@dataclass
class MLMCollator:
    """Collates rows with ``input_ids``, ``token_type_ids``, ``attention_mask`` (and optionally
    ``next_sentence_label``) into ``LongTensor``s of shape ``(batch, seq_len)`` plus ``labels``."""

    tokenizer: PreTrainedTokenizerBase
    seq_len: int
    mlm_probability: float = 0.15
    mask_replace_prob: float = 0.8
    random_replace_prob: float = 0.1
    seed: int = 0
    pad_token_id: int = field(init=False)
    mask_token_id: int = field(init=False)
    special_token_ids: np.ndarray = field(init=False, repr=False)
    random_token_ids: np.ndarray = field(init=False, repr=False)  # what "replace by a random token" draws from
    _calls: int = field(default=0, init=False, repr=False)

    def __post_init__(self) -> None:
        if self.seq_len < 1:
            raise ValueError(f"seq_len={self.seq_len} must be >= 1")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ValueError(f"mlm_probability={self.mlm_probability} must be in (0, 1)")
        replace_probs = (self.mask_replace_prob, self.random_replace_prob)
        if min(replace_probs) < 0 or sum(replace_probs) > 1:
            raise ValueError(
                f"mask_replace_prob={self.mask_replace_prob} and random_replace_prob={self.random_replace_prob} "
                "must be >= 0 and sum to at most 1"
            )
        if self.tokenizer.mask_token_id is None or self.tokenizer.pad_token_id is None:
            raise ValueError("the tokenizer needs a [MASK] and a [PAD] token for MLM")
        self.pad_token_id = int(self.tokenizer.pad_token_id)
        self.mask_token_id = int(self.tokenizer.mask_token_id)
        self.special_token_ids = np.array(sorted(set(self.tokenizer.all_special_ids)), dtype=np.int64)
        vocab = np.arange(len(self.tokenizer), dtype=np.int64)
        self.random_token_ids = vocab[~np.isin(vocab, self.special_token_ids)]

    def __call__(
        self, examples: Sequence[Mapping[str, Any]], keys: Sequence[Sequence[int]] | None = None
    ) -> dict[str, torch.Tensor]:
        if keys is None:
            keys = [(self._calls, row) for row in range(len(examples))]
            self._calls += 1
        if len(keys) != len(examples):
            raise ValueError(f"got {len(keys)} keys for {len(examples)} examples")
        input_ids, token_type_ids, attention_mask = self._pad(examples)
        labels = np.full_like(input_ids, IGNORE_INDEX)
        maskable = (attention_mask == 1) & ~np.isin(input_ids, self.special_token_ids)
        for row, key in enumerate(keys):
            rng = np.random.default_rng([self.seed, *key])
            self._mask_row(input_ids[row], labels[row], np.flatnonzero(maskable[row]), rng)
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "token_type_ids": torch.from_numpy(token_type_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(labels),
        }
        if "next_sentence_label" in examples[0]:
            nsp_labels = [int(example["next_sentence_label"]) for example in examples]
            batch["next_sentence_label"] = torch.tensor(nsp_labels, dtype=torch.long)
        return batch

    def _pad(self, examples: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(batch, seq_len)`` int64 input ids, token types and attention mask, padded."""
        keys = ("input_ids", "token_type_ids", "attention_mask")
        if all(isinstance(example["input_ids"], np.ndarray) and len(example["input_ids"]) == self.seq_len
               for example in examples):  # full rows as arrays (prepared MLM data): one stack per column
            return tuple(np.stack([example[key] for example in examples]).astype(np.int64, copy=False) for key in keys)
        input_ids = np.full((len(examples), self.seq_len), self.pad_token_id, dtype=np.int64)
        token_type_ids = np.zeros_like(input_ids)
        attention_mask = np.zeros_like(input_ids)
        for row, example in enumerate(examples):
            length = len(example["input_ids"])
            if length > self.seq_len:
                raise ValueError(
                    f"example of {length} tokens is longer than seq_len={self.seq_len}; "
                    "build the dataset with this seq_len"
                )
            input_ids[row, :length] = example["input_ids"]
            token_type_ids[row, :length] = example["token_type_ids"]
            attention_mask[row, :length] = example["attention_mask"]
        return input_ids, token_type_ids, attention_mask

    def _mask_row(
        self, input_ids: np.ndarray, labels: np.ndarray, candidates: np.ndarray, rng: np.random.Generator
    ) -> None:
        """Mask one row in place; ``candidates`` are the positions that may be chosen."""
        if len(candidates) == 0:
            return
        count = min(len(candidates), max(1, round(self.mlm_probability * len(candidates))))
        chosen = rng.choice(candidates, size=count, replace=False)
        labels[chosen] = input_ids[chosen]
        draw = rng.random(count)
        input_ids[chosen[draw < self.mask_replace_prob]] = self.mask_token_id
        random_end = self.mask_replace_prob + self.random_replace_prob
        to_random = chosen[(draw >= self.mask_replace_prob) & (draw < random_end)]
        input_ids[to_random] = rng.choice(self.random_token_ids, size=len(to_random))
