"""Bad data refused before training starts: an empty corpus, a binary file, a tokenizer that does not fit.

The loader (`documents.py`) repairs what it can and counts it; these checks stop a run whose input
cannot be right, each naming the file or the numbers and the fix. Every rank runs them (they read a
sample of each file), so all ranks stop together.
"""
from __future__ import annotations

import gzip
import hashlib
import os
from pathlib import Path

from vp_dist.data.documents import JSON_SUFFIXES, TEXT_SUFFIXES, default_corpus_path

SAMPLE_BYTES = 64 * 1024
MAX_UNDECODABLE_FRACTION = 0.05  # of a sample's characters; text in a wrong encoding stays far below


def corpus_files(corpus: str | os.PathLike[str] | None) -> list[Path]:
    """The local text and JSON files of a corpus (a file or a folder of them); [] for other sources."""
    path = default_corpus_path() if corpus is None else Path(corpus).expanduser()
    suffixes = TEXT_SUFFIXES + JSON_SUFFIXES
    if path.is_file():
        return [path] if path.name.endswith(suffixes) else []
    if path.is_dir() and not (path / "dataset_info.json").exists() and not (path / "dataset_dict.json").exists():
        return sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(suffixes))
    return []


def _open(path: Path):
    return gzip.open(path, "rb") if path.name.endswith(".gz") else path.open("rb")


def check_corpus_files(corpus: str | os.PathLike[str] | None) -> None:
    """ValueError if a corpus file looks binary, or if the corpus's files hold no text at all."""
    files = corpus_files(corpus)
    for path in files:
        with _open(path) as handle:
            sample = handle.read(SAMPLE_BYTES)
        if b"\x00" in sample:
            raise ValueError(f"corpus file {path} looks binary (it holds NUL bytes): data.corpus must name text, "
                             "JSON lines or parquet files")
        text = sample.decode("utf-8", errors="replace")
        undecodable = text.count("\ufffd") / max(len(text), 1)
        if undecodable > MAX_UNDECODABLE_FRACTION:
            raise ValueError(f"corpus file {path} looks binary: {undecodable:.0%} of its first {len(sample)} bytes "
                             "are not UTF-8. Convert it to UTF-8 text, or point data.corpus elsewhere")
    if files and not any(_holds_text(path) for path in files):
        raise ValueError(f"corpus {corpus} is empty: its {len(files)} file(s) hold no text. Point data.corpus at "
                         "a corpus with documents")


def _holds_text(path: Path) -> bool:
    with _open(path) as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            if block.strip():
                return True
    return False


def vocabulary_sha256(tokenizer) -> str:
    """A fingerprint of the token -> id map (the same tokenizer, the same ids)."""
    items = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
    return hashlib.sha256("\n".join(f"{token}\t{index}" for token, index in items).encode()).hexdigest()


def check_tokenizer_fits_model(tokenizer, model) -> None:
    """ValueError unless every token id has a row in the model's input embedding and the MLM/NSP
    special tokens exist."""
    rows = model.get_input_embeddings().num_embeddings
    largest = max(tokenizer.get_vocab().values())
    if largest >= rows:
        raise ValueError(f"the tokenizer has ids up to {largest} but the model's embedding has {rows} rows: "
                         "build the model with vocab_size >= len(tokenizer) (do not set model.overrides.vocab_size), "
                         "or use the tokenizer the model was made for")
    missing = [name for name in ("pad_token", "cls_token", "sep_token", "mask_token")
               if getattr(tokenizer, f"{name}_id", None) is None]
    if missing:
        raise ValueError(f"the tokenizer lacks {missing}, which MLM/NSP pre-training needs: use a BERT-style "
                         "tokenizer, or leave data.tokenizer unset to train one")


def check_same_tokenizer(saved_sha256: str | None, tokenizer, where: str) -> None:
    """ValueError if a checkpoint was trained with another vocabulary than `tokenizer`'s."""
    if saved_sha256 is not None and saved_sha256 != vocabulary_sha256(tokenizer):
        raise ValueError(f"the checkpoint in {where} was trained with another tokenizer vocabulary than this run's "
                         f"({len(tokenizer)} tokens): resume with the run's own tokenizer (leave data.tokenizer "
                         "unset, or set it to OUTPUT_DIR/tokenizer) or start a new output_dir")
