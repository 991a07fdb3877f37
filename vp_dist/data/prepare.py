"""Offline preprocessing: corpus -> tokenised shards + manifest (the format is in shards.py).

:func:`prepare_corpus` loads the documents (any source :func:`load_documents` reads, cached as
Arrow under ``OUTPUT/cache``), loads or trains the tokenizer (saved in ``OUTPUT/tokenizer``,
reused by the next phase's call), cuts the documents into shards of ``documents_per_shard``
consecutive documents and tokenises the shards in ``num_proc`` processes:

* MLM: each document's ids followed by [SEP] (as :func:`~vp_dist.data.mlm.tokenize_documents`),
  flat; the reader cuts the rows, so no packing pass is needed and shards are independent;
* MLM + NSP: the pairs of :mod:`vp_dist.data.nsp`, built by the same function on the same
  batches of ``documents_per_batch`` documents with their global indices (shards are whole
  batches), so the pairs equal the in-memory path's for the same seed.

Resuming: ``plan.json`` (the settings and shard boundaries) is written first; each shard's
arrays are written under temporary names, renamed, then its marker ``shard-NNNNN.json``; a re-run
skips shards with a marker and refuses a plan made with other settings. ``manifest.json`` is
written last. Progress: a tqdm bar over shards.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
from tokenizers import Tokenizer
from tqdm.auto import tqdm
from transformers import PreTrainedTokenizerBase

from vp_dist.data.caching import tokenizer_fingerprint
from vp_dist.data.documents import DEFAULT_MAX_DOCUMENT_CHARS, load_documents
from vp_dist.data.nsp import pairs_batch
from vp_dist.data.shards import FORMAT, FORMAT_VERSION, MANIFEST, OBJECTIVES, TOKENIZER_DIR, shard_name, token_dtype
from vp_dist.data.tokenizer import load_or_train_tokenizer

logger = logging.getLogger(__name__)

PLAN = "plan.json"
ENCODE_BATCH = 1000  # documents per encode_batch call
_WORK: dict[str, Any] = {}  # what the shard workers read; set before the pool forks


def prepare_corpus(
    corpus: str | os.PathLike[str] | None,
    output: str | os.PathLike[str],
    *,
    seq_len: int,
    objective: str = "mlm",
    tokenizer: str | os.PathLike[str] | None = None,
    vocab_size: int = 30522,
    num_proc: int = 1,
    documents_per_shard: int = 8192,
    seed: int = 1234,
    short_seq_prob: float = 0.1,
    documents_per_batch: int = 256,
    config_name: str | None = None,
    split: str = "train",
    text_field: str = "text",
    max_document_chars: int = DEFAULT_MAX_DOCUMENT_CHARS,
    on_shard_done: Callable[[dict[str, Any]], None] | None = None,
) -> Path:
    """Prepare ``corpus`` for one phase in ``output/<objective>-<seq_len>``; returns that folder.

    ``seed``, ``short_seq_prob`` and ``documents_per_batch`` matter for NSP only (use the run's
    seed to get the in-memory path's pairs). ``on_shard_done(marker)`` is called after each shard.
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective={objective!r} must be one of {OBJECTIVES}")
    if seq_len < (5 if objective == "mlm+nsp" else 3):
        raise ValueError(f"seq_len={seq_len} is too short for objective={objective!r}")
    if num_proc < 1 or documents_per_shard < 1:
        raise ValueError(f"num_proc={num_proc} and documents_per_shard={documents_per_shard} must be >= 1")
    output = Path(output)
    documents, stats = load_documents(corpus, config_name=config_name, split=split, text_field=text_field,
                                      cache_dir=output / "cache", max_document_chars=max_document_chars)
    tok = load_or_train_tokenizer(tokenizer, documents, vocab_size, output / TOKENIZER_DIR)
    if objective == "mlm+nsp":  # shards hold whole NSP batches, so pairs do not depend on sharding
        documents_per_shard = -(-documents_per_shard // documents_per_batch) * documents_per_batch
    folder = output / f"{objective}-{seq_len}"
    settings = {
        "objective": objective,
        "seq_len": seq_len,
        "tokenizer_hash": tokenizer_fingerprint(tok),
        "vocab_size": len(tok),
        "token_dtype": token_dtype(len(tok)).name,
        "special_ids": {"cls": tok.cls_token_id, "sep": tok.sep_token_id, "pad": tok.pad_token_id},
        "source": {"corpus": str(corpus), "fingerprint": documents._fingerprint, "documents": len(documents)},
        "nsp": {"seed": seed, "short_seq_prob": short_seq_prob, "documents_per_batch": documents_per_batch}
        if objective == "mlm+nsp" else None,
        "documents_per_shard": documents_per_shard,
    }
    _write_or_check_plan(folder, settings)
    bounds = range(0, len(documents), documents_per_shard)
    tasks = [(i, start, min(start + documents_per_shard, len(documents))) for i, start in enumerate(bounds)]
    pending = [task for task in tasks if not (folder / f"{shard_name(task[0])}.json").is_file()]
    if len(pending) < len(tasks):
        logger.info("%s: %d of %d shards already done, resuming", folder, len(tasks) - len(pending), len(tasks))
    _WORK.update(documents=documents, tokenizer=tok, folder=folder, settings=settings)
    with tqdm(total=len(tasks), initial=len(tasks) - len(pending), unit="shard", desc=f"preparing {folder.name}") as bar:
        for marker in _run(pending, num_proc):
            bar.update(1)
            bar.set_postfix(tokens=marker["tokens"])
            if on_shard_done is not None:
                on_shard_done(marker)
    _WORK.clear()
    manifest = _write_manifest(folder, settings, len(tasks))
    logger.info("%s: %d rows, %d tokens from %d documents (%s)", folder, manifest["rows"], manifest["tokens"],
                len(documents), stats.summary())
    return folder


def _write_or_check_plan(folder: Path, settings: dict[str, Any]) -> None:
    path = folder / PLAN
    if path.is_file():
        saved = json.loads(path.read_text())
        changed = sorted(key for key in settings if saved.get(key) != settings[key])
        if changed:
            raise ValueError(
                f"{folder} was started with other settings ({', '.join(f'{k}={saved.get(k)!r}' for k in changed)}); "
                f"delete {folder} to prepare it again with the new ones"
            )
        return
    folder.mkdir(parents=True, exist_ok=True)
    _atomic_write_text(path, json.dumps(settings, indent=1))


def _run(tasks: list[tuple[int, int, int]], num_proc: int):
    if num_proc == 1 or len(tasks) <= 1:
        yield from map(_prepare_shard, tasks)
        return
    # Forked workers inherit _WORK (the Arrow documents are memory-mapped, nothing is copied); the
    # tokenizer's own thread pool stays off in them: num_proc processes already fill the cores.
    previous = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        with multiprocessing.get_context("fork").Pool(min(num_proc, len(tasks))) as pool:
            yield from pool.imap_unordered(_prepare_shard, tasks)
    finally:
        if previous is None:
            os.environ.pop("TOKENIZERS_PARALLELISM", None)
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = previous


def _prepare_shard(task: tuple[int, int, int]) -> dict[str, Any]:
    index, start, stop = task
    folder, settings, tok = _WORK["folder"], _WORK["settings"], _WORK["tokenizer"]
    texts = _WORK["documents"][start:stop]["text"]
    dtype = np.dtype(settings["token_dtype"])
    if settings["objective"] == "mlm":
        tokens, rows = _mlm_tokens(texts, tok, dtype), None
    else:
        tokens, rows = _nsp_rows(texts, start, tok, settings, dtype)
    name = shard_name(index)
    _atomic_save(folder / f"{name}.tokens.npy", tokens)
    if rows is not None:
        _atomic_save(folder / f"{name}.rows.npy", rows)
    marker = {"index": index, "documents": stop - start, "tokens": int(len(tokens)),
              "rows": 0 if rows is None else int(len(rows))}
    _atomic_write_text(folder / f"{name}.json", json.dumps(marker))
    return marker


def _mlm_tokens(texts: list[str], tok: PreTrainedTokenizerBase, dtype: np.dtype) -> np.ndarray:
    """Each document's ids (no special tokens) then [SEP], concatenated: tokenize_documents' stream."""
    backend = _WORK.get("backend")
    if backend is None:  # the raw Rust tokenizer, without the per-call set-up of the transformers wrapper
        backend = _WORK["backend"] = Tokenizer.from_str(tok.backend_tokenizer.to_str())
        backend.no_truncation()
        backend.no_padding()
    sep = np.array([tok.sep_token_id], dtype=dtype)
    pieces: list[np.ndarray] = []
    for start in range(0, len(texts), ENCODE_BATCH):
        for encoding in backend.encode_batch(texts[start : start + ENCODE_BATCH], add_special_tokens=False):
            pieces += [np.array(encoding.ids, dtype=dtype), sep]
    return np.concatenate(pieces) if pieces else np.empty(0, dtype=dtype)


def _nsp_rows(
    texts: list[str], first_document: int, tok: PreTrainedTokenizerBase, settings: dict[str, Any], dtype: np.dtype
) -> tuple[np.ndarray, np.ndarray]:
    nsp = settings["nsp"]
    per_batch = nsp["documents_per_batch"]
    token_rows: list[list[int]] = []
    rows: list[tuple[int, int, int, int]] = []
    offset = 0
    for start in range(0, len(texts), per_batch):
        batch_texts = texts[start : start + per_batch]
        indices = list(range(first_document + start, first_document + start + len(batch_texts)))
        pairs = pairs_batch({"text": batch_texts}, indices, tok, settings["seq_len"], nsp["seed"],
                             nsp["short_seq_prob"])
        for ids, types, label in zip(pairs["input_ids"], pairs["token_type_ids"], pairs["next_sentence_label"]):
            rows.append((offset, len(ids), types.index(1), label))
            token_rows.append(ids)
            offset += len(ids)
    tokens = np.fromiter((t for ids in token_rows for t in ids), dtype=dtype, count=offset)
    return tokens, np.array(rows, dtype=np.int64).reshape(-1, 4)


def _write_manifest(folder: Path, settings: dict[str, Any], num_shards: int) -> dict[str, Any]:
    shards = [json.loads((folder / f"{shard_name(i)}.json").read_text()) for i in range(num_shards)]
    tokens = sum(s["tokens"] for s in shards)
    if settings["objective"] == "mlm":
        rows = -(-tokens // (settings["seq_len"] - 2))
    else:
        rows = sum(s["rows"] for s in shards)
    manifest = {"format": FORMAT, "version": FORMAT_VERSION, **settings, "rows": rows, "tokens": tokens,
                "shards": shards}
    _atomic_write_text(folder / MANIFEST, json.dumps(manifest, indent=1))
    return manifest


def _atomic_save(path: Path, array: np.ndarray) -> None:
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as f:
        np.save(f, array)
    os.replace(partial, path)


def _atomic_write_text(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)
