"""Prepared (pre-tokenised) corpora: the on-disk format, its manifest, and O(1) row access.

``launch/preprocess.py`` (:mod:`vp_dist.data.prepare`) writes a folder per phase dataset,
``DIR/<objective>-<seq_len>/`` (``mlm-128``, ``mlm+nsp-512``), beside the tokenizer it used in
``DIR/tokenizer/``. A dataset folder holds:

* ``manifest.json``: format version, ``objective``, ``seq_len``, ``tokenizer_hash``,
  ``token_dtype``, the special ids, the source (corpus, its fingerprint, document count), the
  NSP settings, and per shard its document, token and row counts; written last, so a folder
  with a manifest is complete;
* ``shard-NNNNN.tokens.npy``: the shard's token ids, one flat array, memory-mapped on read;
* NSP only, ``shard-NNNNN.rows.npy``: int64 ``[rows, 4]`` = (start in the shard's tokens,
  length, first token of segment B, next_sentence_label); the tokens are ``[CLS] A [SEP] B [SEP]``.

MLM shards hold each document's tokens followed by [SEP]: the shards in order are exactly the
stream that :func:`~vp_dist.data.mlm.pack_sequences` cuts, so row ``i`` is ``[CLS]`` + stream
tokens ``[i * (seq_len - 2), (i + 1) * (seq_len - 2))`` + ``[SEP]``, padded only in the last row:
the same rows, in the same order, as the in-memory path. A row is found from the cumulative
token (MLM) or row (NSP) counts of the shards: no scan, nothing read but the row itself.
:meth:`PreparedDataset.read_rows` reads a micro-batch's rows at once (the loader's path).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from transformers import PreTrainedTokenizerBase

from vp_dist.data.caching import tokenizer_fingerprint

FORMAT = "vp-dist-prepared"
FORMAT_VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
OBJECTIVES = ("mlm", "mlm+nsp")


def dataset_dir(prepared: str | os.PathLike[str], objective: str, seq_len: int) -> Path:
    """Where the ``objective`` / ``seq_len`` dataset of a prepared folder lives (or the folder itself,
    when it is one dataset with a manifest of its own)."""
    root = Path(prepared)
    return root if (root / MANIFEST).is_file() else root / f"{objective}-{seq_len}"


def shard_name(index: int) -> str:
    return f"shard-{index:05d}"


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= np.iinfo(np.uint16).max + 1 else np.int32)


def read_manifest(folder: str | os.PathLike[str]) -> dict[str, Any]:
    path = Path(folder) / MANIFEST
    if not path.is_file():
        raise FileNotFoundError(
            f"{folder} holds no {MANIFEST}: it is not a prepared dataset, or its preprocessing did not finish; "
            "run (or re-run, it resumes) launch/preprocess.py --output with this folder's parent"
        )
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT or manifest.get("version") != FORMAT_VERSION:
        raise ValueError(
            f"{path}: format {manifest.get('format')!r} version {manifest.get('version')!r} is not "
            f"{FORMAT!r} version {FORMAT_VERSION}; prepare the corpus again with this vp-dist"
        )
    return manifest


def check_manifest(
    manifest: dict[str, Any], *, objective: str, seq_len: int, tokenizer: PreTrainedTokenizerBase, where: str
) -> None:
    """Refuse a prepared dataset built for another objective, sequence length or tokenizer."""
    expected = {"objective": objective, "seq_len": seq_len, "tokenizer_hash": tokenizer_fingerprint(tokenizer)}
    for key, value in expected.items():
        if manifest[key] != value:
            raise ValueError(
                f"{where}: the prepared data has {key}={manifest[key]!r} but the run needs {key}={value!r}; "
                "run launch/preprocess.py for this phase (same tokenizer, --objective and --seq_len) "
                "or point data.prepared at the matching folder"
            )


class PreparedDataset:
    """Rows of a prepared dataset by index, as the dicts the MLM collator reads.

    Shards are memory-mapped lazily in each process that reads (a pickled dataset carries only
    paths, so DataLoader workers open their own maps). ``rows_read`` counts rows returned by this
    process (tests use it to show that a resumed run reads nothing before its step).
    """

    def __init__(self, folder: str | os.PathLike[str]) -> None:
        self.folder = Path(folder)
        self.manifest = read_manifest(self.folder)
        self.objective: str = self.manifest["objective"]
        self.seq_len: int = self.manifest["seq_len"]
        special = self.manifest["special_ids"]
        self.cls_id, self.sep_id, self.pad_id = special["cls"], special["sep"], special["pad"]
        shards = self.manifest["shards"]
        self._token_starts = np.cumsum([0] + [s["tokens"] for s in shards])
        self._row_starts = np.cumsum([0] + [s["rows"] for s in shards])
        self.num_rows = int(self.manifest["rows"])
        self.rows_read = 0
        self._tokens: list[np.ndarray] | None = None
        self._rows: list[np.ndarray] | None = None
        self._plain_tokens: list[np.ndarray] | None = None

    def __len__(self) -> int:
        return self.num_rows

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tokens": None, "_plain_tokens": None, "_rows": None}

    def _open(self) -> None:
        names = [shard_name(s["index"]) for s in self.manifest["shards"]]
        self._tokens = [np.load(self.folder / f"{name}.tokens.npy", mmap_mode="r") for name in names]
        self._plain_tokens = [tokens.view(np.ndarray) for tokens in self._tokens]  # slicing without memmap's overhead
        if self.objective == "mlm+nsp":
            self._rows = [np.load(self.folder / f"{name}.rows.npy", mmap_mode="r") for name in names]

    def __getitem__(self, index: int) -> dict[str, Any]:
        if not 0 <= index < self.num_rows:
            raise IndexError(f"row {index} is outside the {self.num_rows} rows of {self.folder}")
        if self._tokens is None:
            self._open()
        self.rows_read += 1
        return self._nsp_row(index) if self.objective == "mlm+nsp" else self._mlm_row(index)

    def read_rows(self, indices: Sequence[int] | np.ndarray) -> dict[str, np.ndarray] | list[dict[str, Any]]:
        """Rows ``indices`` at once: for MLM the ``(len(indices), seq_len)`` int64 columns the collator
        takes as they are (equal to stacking ``self[i]``); for NSP the list ``[self[i] for i in indices]``."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        if len(indices) and not (0 <= indices.min() and indices.max() < self.num_rows):
            bad = indices[(indices < 0) | (indices >= self.num_rows)][0]
            raise IndexError(f"row {bad} is outside the {self.num_rows} rows of {self.folder}")
        if self._tokens is None:
            self._open()
        self.rows_read += len(indices)
        if self.objective == "mlm+nsp":
            return [self._nsp_row(int(i)) for i in indices]
        piece_len, total = self.seq_len - 2, int(self._token_starts[-1])
        starts = indices * piece_len
        stops = np.minimum(starts + piece_len, total)
        shards = np.searchsorted(self._token_starts, starts, side="right") - 1
        input_ids = np.full((len(indices), self.seq_len), self.pad_id, dtype=np.int64)
        input_ids[:, 0] = self.cls_id
        token_starts = self._token_starts.tolist()
        for row, start, stop, shard in zip(input_ids, starts.tolist(), stops.tolist(), shards.tolist()):
            filled = 1
            while start < stop:  # a row may span the end of one shard and the start of the next
                local = start - token_starts[shard]
                part = self._plain_tokens[shard][local : local + stop - start]
                row[filled : filled + len(part)] = part
                filled, start, shard = filled + len(part), start + len(part), shard + 1
        lengths = stops - starts + 2  # [CLS] + tokens + [SEP]
        input_ids[np.arange(len(indices)), lengths - 1] = self.sep_id
        attention_mask = (np.arange(self.seq_len) < lengths[:, None]).astype(np.int64)
        return {"input_ids": input_ids, "token_type_ids": np.zeros_like(input_ids), "attention_mask": attention_mask}

    def _mlm_row(self, index: int) -> dict[str, Any]:
        piece_len = self.seq_len - 2
        start = index * piece_len
        stop = min(start + piece_len, int(self._token_starts[-1]))
        input_ids = np.full(self.seq_len, self.pad_id, dtype=np.int64)
        input_ids[0] = self.cls_id
        filled, shard = 1, int(np.searchsorted(self._token_starts, start, side="right")) - 1
        while start < stop:  # a row may span the end of one shard and the start of the next
            local = start - int(self._token_starts[shard])
            part = self._tokens[shard][local : local + stop - start]
            input_ids[filled : filled + len(part)] = part
            filled, start, shard = filled + len(part), start + len(part), shard + 1
        input_ids[filled] = self.sep_id
        attention_mask = np.zeros(self.seq_len, dtype=np.int64)
        attention_mask[: filled + 1] = 1
        return {"input_ids": input_ids, "token_type_ids": np.zeros_like(input_ids), "attention_mask": attention_mask}

    def _nsp_row(self, index: int) -> dict[str, Any]:
        shard = int(np.searchsorted(self._row_starts, index, side="right")) - 1
        start, length, b_start, label = (int(v) for v in self._rows[shard][index - int(self._row_starts[shard])])
        input_ids = np.asarray(self._tokens[shard][start : start + length], dtype=np.int64)
        token_type_ids = np.zeros(length, dtype=np.int64)
        token_type_ids[b_start:] = 1
        return {
            "input_ids": input_ids,
            "token_type_ids": token_type_ids,
            "attention_mask": np.ones(length, dtype=np.int64),
            "next_sentence_label": label,
        }
