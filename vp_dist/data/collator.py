"""MLM collator for both phases: pad rows to ``seq_len``, mask tokens, return tensors.

Masking follows BERT: of the maskable tokens of a row (real tokens, ``attention_mask`` 1, that
are not special tokens) exactly ``min(n, max(1, round(mlm_probability * n)))`` are chosen,
uniformly at random without replacement (``n`` maskable tokens; none when ``n`` is 0); each
chosen token is replaced by [MASK] with probability ``mask_replace_prob`` (0.8), by a random
non-special token with ``random_replace_prob`` (0.1), and kept otherwise. ``labels`` hold the
original id at chosen positions and -100 everywhere else.

Determinism: the masks of a row are a function of ``(seed, key, the row)`` alone, where ``key``
is given per row by the caller. :func:`~vp_dist.data.sampler.iter_micro_batches` passes
``(epoch, example_index)``, so an example is masked the same way whichever rank, micro-batch
or resumed run collates it; global-batch statistics then do not depend on the world size.
Without keys the collator numbers its own calls, ``(call, row)``, which is deterministic for a
fixed call order.

The random numbers are counter-based, for the whole batch at once (no per-row generator): a
row's state is splitmix64's finaliser :func:`mix64` chained over ``seed`` and the key's integers,
and the number of stream ``s`` at position ``j`` is ``mix64(row_state ^ c[s, j])`` with the
constants ``c[s, j] = mix64(((s << 32) | j) + golden)``. Stream 0 chooses: a row's chosen
positions are its ``count`` maskable positions with the smallest stream-0 numbers (a uniform
random subset; the position breaks ties, so the count is exact). Stream 1 gives each chosen
position a uniform ``[0, 1)`` draw from its top 53 bits (< 0.8 [MASK], < 0.9 random token, else
kept); stream 2 the random token (multiply-high by the number of non-special ids). Pure uint64
integer arithmetic: the same masks on every platform and numpy version. (Masks before this scheme came from ``numpy.random.default_rng([seed, *key])`` per row,
with the same distribution but other draws.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100  # the label torch's cross-entropy ignores

_GOLDEN = 0x9E3779B97F4A7C15  # 2^64 / golden ratio, splitmix64's increment
_MASK64 = (1 << 64) - 1
_POSITION_BITS = 16  # low bits of a choice key hold the position: keys within a row are distinct
MAX_SEQ_LEN = 1 << _POSITION_BITS
STREAM_CHOOSE, STREAM_REPLACE, STREAM_TOKEN = 0, 1, 2


def mix64(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, a bijection of uint64 with full avalanche, on a new array (wraps mod 2^64)."""
    x = x ^ (x >> np.uint64(30))
    x *= np.uint64(0xBF58476D1CE4E5B9)
    x ^= x >> np.uint64(27)
    x *= np.uint64(0x94D049BB133111EB)
    x ^= x >> np.uint64(31)
    return x


def row_states(seed: int, keys: np.ndarray) -> np.ndarray:
    """uint64 state per row from ``seed`` and the ``(rows, k)`` int64 keys (the key length is hashed too)."""
    keys = np.asarray(keys, dtype=np.int64)
    rows, length = keys.shape
    start = (int(seed) + _GOLDEN * (length + 1)) & _MASK64
    state = mix64(np.full(rows, start, dtype=np.uint64))
    for column in keys.T:
        state = mix64(state ^ mix64(column.astype(np.uint64) + np.uint64(_GOLDEN)))
    return state


def position_constants(stream: int, length: int) -> np.ndarray:
    """uint64 ``mix64((stream << 32 | j) + golden)`` for positions ``j < length``: what a row state is mixed with."""
    counters = (np.uint64(stream) << np.uint64(32)) | np.arange(length, dtype=np.uint64)
    return mix64(counters + np.uint64(_GOLDEN))


def uniform_bits(states: np.ndarray, positions: np.ndarray, constants: np.ndarray) -> np.ndarray:
    """The uint64 random number of each ``(row state, position)`` pair for one stream's ``constants``."""
    return mix64(states ^ constants[positions])


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
    _special_lookup: np.ndarray = field(init=False, repr=False)  # bool per id below len(tokenizer)
    _constants: np.ndarray = field(init=False, repr=False)  # (3 streams, seq_len) uint64

    def __post_init__(self) -> None:
        if not 1 <= self.seq_len <= MAX_SEQ_LEN:
            raise ValueError(f"seq_len={self.seq_len} must be in [1, {MAX_SEQ_LEN}]")
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
        if not 0 < len(self.random_token_ids) < 1 << 32:
            raise ValueError(f"{len(self.random_token_ids)} non-special tokens: need 1 to 2^32 - 1 for MLM")
        self._special_lookup = np.zeros(max(len(vocab), int(self.special_token_ids.max(initial=-1)) + 1), dtype=bool)
        self._special_lookup[self.special_token_ids] = True
        self._constants = np.stack([position_constants(stream, self.seq_len)
                                    for stream in (STREAM_CHOOSE, STREAM_REPLACE, STREAM_TOKEN)])

    def __call__(
        self,
        examples: Sequence[Mapping[str, Any]] | Mapping[str, np.ndarray],
        keys: Sequence[Sequence[int]] | np.ndarray | None = None,
    ) -> dict[str, torch.Tensor]:
        """Collate ``examples``: rows (dicts), or columns ``{"input_ids": (rows, seq_len) array, ...}`` as
        :meth:`~vp_dist.data.shards.PreparedDataset.read_rows` gives them. ``keys``: one integer sequence
        per row (``(rows, k)`` array or nested sequences), the same length for every row."""
        if isinstance(examples, Mapping):
            rows = len(examples["input_ids"])
            input_ids, token_type_ids, attention_mask = self._columns(examples)
            nsp_labels = examples.get("next_sentence_label")
        else:
            rows = len(examples)
            input_ids, token_type_ids, attention_mask = self._pad(examples)
            nsp_labels = ([int(example["next_sentence_label"]) for example in examples]
                          if rows and "next_sentence_label" in examples[0] else None)
        if keys is None:
            key_array = np.stack([np.full(rows, self._calls), np.arange(rows)], axis=1).astype(np.int64)
            self._calls += 1
        else:
            if len(keys) != rows:
                raise ValueError(f"got {len(keys)} keys for {rows} examples")
            try:
                key_array = np.asarray(keys, dtype=np.int64).reshape(rows, -1)
            except (ValueError, OverflowError) as error:
                raise ValueError("keys must be int64 integers, the same number per row") from error
        labels = np.full_like(input_ids, IGNORE_INDEX)
        self._mask(input_ids, labels, attention_mask, row_states(self.seed, key_array))
        batch = {
            "input_ids": torch.from_numpy(input_ids),
            "token_type_ids": torch.from_numpy(token_type_ids),
            "attention_mask": torch.from_numpy(attention_mask),
            "labels": torch.from_numpy(labels),
        }
        if nsp_labels is not None:
            batch["next_sentence_label"] = torch.as_tensor(np.asarray(nsp_labels), dtype=torch.long)
        return batch

    def _columns(self, columns: Mapping[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        arrays = tuple(np.array(columns[key], dtype=np.int64)  # a copy: masking writes into input_ids
                       for key in ("input_ids", "token_type_ids", "attention_mask"))
        if any(array.ndim != 2 or array.shape[1] != self.seq_len or len(array) != len(arrays[0]) for array in arrays):
            raise ValueError(f"columns must be (rows, seq_len={self.seq_len}) arrays, got "
                             f"{[array.shape for array in arrays]}")
        return arrays

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

    def _is_special(self, input_ids: np.ndarray) -> np.ndarray:
        if input_ids.size and 0 <= input_ids.min() and input_ids.max() < len(self._special_lookup):
            return self._special_lookup[input_ids]
        return np.isin(input_ids, self.special_token_ids)

    def _mask(self, input_ids: np.ndarray, labels: np.ndarray, attention_mask: np.ndarray, states: np.ndarray) -> None:
        """Mask the ``(rows, seq_len)`` batch in place; ``states`` from :func:`row_states`, one per row."""
        rows, length = input_ids.shape
        maskable = (attention_mask == 1) & ~self._is_special(input_ids)
        n = np.count_nonzero(maskable, axis=1)
        # round() of Python and np.rint both round half to even, on the same float64 product
        count = np.minimum(n, np.maximum(1, np.rint(self.mlm_probability * n).astype(np.int64)))
        # choice keys: 47 random bits above the position (distinct within a row); maskable keys < 2^63 <= others
        positions = np.arange(length, dtype=np.uint64)
        choice = mix64(states[:, None] ^ self._constants[STREAM_CHOOSE, None, :length])
        choice >>= np.uint64(_POSITION_BITS + 1)
        choice <<= np.uint64(_POSITION_BITS)
        choice |= positions
        choice = np.where(maskable, choice, np.uint64(1 << 63) | positions)
        threshold = np.sort(choice, axis=1)[np.arange(rows), np.maximum(count - 1, 0)]
        chosen = (choice <= threshold[:, None]) & (count > 0)[:, None]

        row, column = np.nonzero(chosen)
        labels[row, column] = input_ids[row, column]
        draw = (uniform_bits(states[row], column, self._constants[STREAM_REPLACE]) >> np.uint64(11)).astype(np.float64)
        draw *= 2.0**-53  # exact: a uniform multiple of 2^-53 in [0, 1)
        to_mask = draw < self.mask_replace_prob
        input_ids[row[to_mask], column[to_mask]] = self.mask_token_id
        to_random = ~to_mask & (draw < self.mask_replace_prob + self.random_replace_prob)
        row, column = row[to_random], column[to_random]
        bits = uniform_bits(states[row], column, self._constants[STREAM_TOKEN]) >> np.uint64(32)
        index = (bits * np.uint64(len(self.random_token_ids))) >> np.uint64(32)  # < len: multiply-high
        input_ids[row, column] = self.random_token_ids[index.astype(np.int64)]
