"""Fingerprints and cache-file names for the ``Dataset.map`` stages.

``datasets`` would otherwise hash the mapped function, tokenizer included, on every call; an
explicit fingerprint built from the input's fingerprint and the stage's settings is cheaper and
says exactly what invalidates the cache. Streaming datasets are never cached.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Union

import datasets
from datasets.fingerprint import Hasher
from transformers import PreTrainedTokenizerBase

AnyDataset = Union[datasets.Dataset, datasets.IterableDataset]


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """Hash of the tokenizer's full definition (vocabulary, normaliser, special tokens)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return Hasher.hash(backend.to_str() if backend is not None else tokenizer)


def stage_fingerprint(dataset: datasets.Dataset, stage: str, *settings: Any) -> str:
    return Hasher.hash([dataset._fingerprint, stage, *settings])


def map_cache_kwargs(
    dataset: datasets.Dataset, cache_dir: str | os.PathLike[str] | None, stage: str, *settings: Any
) -> dict[str, Any]:
    """``new_fingerprint`` and, when ``cache_dir`` is given, ``cache_file_name`` for ``Dataset.map``."""
    fingerprint = stage_fingerprint(dataset, stage, *settings)
    kwargs: dict[str, Any] = {"new_fingerprint": fingerprint}
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        kwargs["cache_file_name"] = str(Path(cache_dir) / f"{stage}-{fingerprint}.arrow")
    return kwargs
