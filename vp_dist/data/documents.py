"""Corpus loading: every source becomes a dataset of cleaned documents with one ``text`` column.

A document is a string of paragraphs separated by ``"\\n"``; every later stage (tokenizer
training, MLM packing, NSP pairs) reads that one column. Sources, picked from ``corpus``:

* ``None``: the shipped corpus, :func:`default_corpus_path`;
* ``*.txt`` / ``*.txt.gz``: one line = one paragraph, a blank line ends a document;
* ``*.jsonl`` / ``*.json`` (also ``.gz``): one JSON record per line, or one JSON array, with the
  text in ``text_field``;
* ``*.parquet``: read by ``datasets``' parquet builder, text in ``text_field``;
* a folder written by ``save_to_disk``: ``datasets.load_from_disk`` (``split`` picks from a
  ``DatasetDict``);
* a folder of the files above: all of them, in sorted path order;
* any other name: a hub dataset, ``datasets.load_dataset(corpus, config_name, split=split)``;
  with HF_HUB_OFFLINE / HF_DATASETS_OFFLINE set this fails at once with a clear error.

Bad input is counted in :class:`DataStats`, logged, and never raises: blank lines, records with
no text, JSON that does not parse, undecodable bytes (replaced by U+FFFD) and documents longer
than ``max_document_chars`` (split at paragraph boundaries; a paragraph longer than the limit
is cut at a space). With ``streaming=False`` the documents are written once to an Arrow cache
under ``cache_dir`` and reloaded on later runs (their stats from a JSON file beside it); with
``streaming=True`` nothing is written and the stats count the most recent pass over the stream.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import logging
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Callable, Union

import datasets
from datasets.fingerprint import Hasher

logger = logging.getLogger(__name__)

Documents = Union[datasets.Dataset, datasets.IterableDataset]

TEXT_SUFFIXES = (".txt", ".txt.gz")
JSON_SUFFIXES = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
PARQUET_SUFFIXES = (".parquet",)
FILE_SUFFIXES = TEXT_SUFFIXES + JSON_SUFFIXES + PARQUET_SUFFIXES
DEFAULT_MAX_DOCUMENT_CHARS = 100_000
# Bump when the cleaning rules change, so cached documents are rebuilt.
CLEANING_VERSION = 1
STATS_FILE_NAME = "vp_dist_data_stats.json"
FEATURES = datasets.Features({"text": datasets.Value("string")})


@dataclass
class DataStats:
    """What the loader read, kept and repaired. Logged after loading; never a reason to stop."""

    source: str = ""
    documents: int = 0  # documents written (after splitting long ones)
    paragraphs: int = 0
    characters: int = 0
    blank_lines: int = 0  # in text and JSON-lines files
    empty_documents: int = 0  # records whose text is missing, null or blank: skipped
    bad_records: int = 0  # JSON that does not parse, or a text field that is not a string
    invalid_utf8_lines: int = 0
    replaced_characters: int = 0  # U+FFFD put in place of undecodable bytes
    split_documents: int = 0  # documents longer than max_document_chars, split into pieces
    split_paragraphs: int = 0  # paragraphs longer than max_document_chars, cut into pieces

    def reset(self) -> None:
        for field in dataclasses.fields(self):
            if field.name != "source":
                setattr(self, field.name, 0)

    def summary(self) -> str:
        counts = ", ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)[1:])
        return f"corpus {self.source}: {counts}"


def default_corpus_path() -> Path:
    """The shipped English corpus (CPython docs and docstrings, PSF licence): see corpus/README.md."""
    return Path(__file__).with_name("corpus") / "python_docs.txt"


def load_documents(
    corpus: str | os.PathLike[str] | None = None,
    *,
    config_name: str | None = None,
    split: str = "train",
    text_field: str = "text",
    streaming: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
    max_document_chars: int = DEFAULT_MAX_DOCUMENT_CHARS,
) -> tuple[Documents, DataStats]:
    """Load ``corpus`` (see the module docstring) as cleaned documents and the stats of the load.

    Returns a ``Dataset`` (or an ``IterableDataset`` when ``streaming``) with one string column
    ``text``. ``config_name`` and ``split`` are used for hub datasets and ``DatasetDict`` folders.
    """
    if max_document_chars < 1:
        raise ValueError(f"max_document_chars={max_document_chars} must be >= 1")
    corpus = default_corpus_path() if corpus is None else corpus
    cache_dir = None if cache_dir is None else str(cache_dir)
    records, fingerprint_parts = _open_source(str(corpus), config_name, split, text_field, streaming, cache_dir)
    stats = DataStats(source=str(corpus))
    gen_kwargs = {"records": records, "stats": stats, "max_document_chars": max_document_chars}
    if streaming:
        return datasets.IterableDataset.from_generator(_document_rows, features=FEATURES, gen_kwargs=gen_kwargs), stats

    fingerprint = Hasher.hash([*fingerprint_parts, max_document_chars, CLEANING_VERSION])
    try:
        documents = datasets.Dataset.from_generator(
            _document_rows, features=FEATURES, gen_kwargs=gen_kwargs, cache_dir=cache_dir, fingerprint=fingerprint
        )
    except ValueError as error:
        if "corresponds to no data" not in str(error):  # `datasets`' words for a generator that yielded nothing
            raise
        raise ValueError(f"no document with text: {stats.summary()}; JSON, parquet and hub records are read "
                         f"from the field text_field={text_field!r}") from None
    _save_or_restore_stats(documents, stats)
    return documents, stats


# --- sources: each yields raw texts (str) or None for a record with no text -------------------


class _Records:
    """A re-iterable source of raw document texts; counts its own read errors into ``stats``."""

    def __init__(self, read: Callable[..., Iterator[str | None]], *args: Any) -> None:
        self._read, self._args = read, args

    def __call__(self, stats: DataStats) -> Iterator[str | None]:
        return self._read(*self._args, stats)


def _open_source(
    corpus: str, config_name: str | None, split: str, text_field: str, streaming: bool, cache_dir: str | None
) -> tuple[_Records, list[Any]]:
    path = Path(corpus).expanduser()
    if path.is_file():
        return _file_records([path], text_field, streaming, cache_dir), _file_fingerprint([path], text_field)
    if path.is_dir():
        if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
            dataset = _load_saved(path, split, streaming)
            return _dataset_records(dataset, text_field, str(path)), [_fingerprint_of(dataset, path), text_field]
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(FILE_SUFFIXES))
        if not files:
            suffixes = "/".join(FILE_SUFFIXES)
            raise ValueError(f"corpus folder {path} holds no {suffixes} file and no save_to_disk dataset")
        return _file_records(files, text_field, streaming, cache_dir), _file_fingerprint(files, text_field)
    if corpus.endswith(FILE_SUFFIXES) or (os.sep in corpus and not _looks_like_hub_name(corpus)):
        raise FileNotFoundError(f"corpus file {corpus} does not exist")
    dataset = _load_hub(corpus, config_name, split, streaming, cache_dir)
    return _dataset_records(dataset, text_field, corpus), [_fingerprint_of(dataset, corpus), text_field]


def _looks_like_hub_name(corpus: str) -> bool:
    return corpus.count("/") == 1 and not corpus.startswith((".", "/", "~"))


def _file_records(files: list[Path], text_field: str, streaming: bool, cache_dir: str | None) -> _Records:
    parquet = [f for f in files if f.name.endswith(PARQUET_SUFFIXES)]
    if parquet and len(parquet) != len(files):
        raise ValueError(f"cannot mix parquet and text/JSON files in one corpus: {[str(f) for f in files]}")
    if parquet:
        dataset = datasets.load_dataset(
            "parquet", data_files=[str(f) for f in parquet], split="train", streaming=streaming, cache_dir=cache_dir
        )
        return _dataset_records(dataset, text_field, str(parquet[0]))
    return _Records(_read_files, tuple(files), text_field)


def _file_fingerprint(files: list[Path], text_field: str) -> list[Any]:
    return [[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files] + [text_field]


def _fingerprint_of(dataset: Documents, fallback: Path | str) -> str:
    return getattr(dataset, "_fingerprint", None) or str(fallback)


def _load_saved(path: Path, split: str, streaming: bool) -> Documents:
    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise ValueError(f"split={split!r} is not in the saved dataset {path}; it has {sorted(loaded)}")
        loaded = loaded[split]
    return loaded.to_iterable_dataset() if streaming else loaded


OFFLINE_VARIABLES = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE")


def offline_variables() -> list[str]:
    """Which of OFFLINE_VARIABLES are set, read at call time (the libraries read them at import)."""
    return [name for name in OFFLINE_VARIABLES if os.environ.get(name, "").upper() in {"1", "ON", "YES", "TRUE"}]


def hub_is_offline() -> bool:
    return bool(offline_variables())


def _load_hub(name: str, config_name: str | None, split: str, streaming: bool, cache_dir: str | None) -> Documents:
    if hub_is_offline():
        raise RuntimeError(
            f"corpus={name!r} is not a local file or folder, and {'/'.join(offline_variables())} is set, "
            "so it cannot come from the Hugging Face hub. Pass a local .txt/.jsonl/.parquet file or a "
            "save_to_disk folder, or unset the variable on a machine with network access."
        )
    logger.info("loading hub dataset %s (config=%s, split=%s, streaming=%s)", name, config_name, split, streaming)
    try:
        return datasets.load_dataset(name, config_name, split=split, streaming=streaming, cache_dir=cache_dir)
    except Exception as error:  # the hub raises many types; all mean "this corpus name did not load"
        raise RuntimeError(
            f"corpus={name!r} is not a local file or folder and the hub could not load it "
            f"(config={config_name!r}, split={split!r}): {error}"
        ) from error


def _dataset_records(dataset: Documents, text_field: str, source: str) -> _Records:
    columns = dataset.column_names
    if columns is not None and text_field not in columns:
        raise ValueError(f"text_field={text_field!r} is not a column of {source}; its columns are {columns}")
    return _Records(_read_dataset, dataset, text_field)


def _read_dataset(dataset: Documents, text_field: str, stats: DataStats) -> Iterator[str | None]:
    for batch in dataset.iter(batch_size=1000):
        for text in batch[text_field]:
            if text is not None and not isinstance(text, str):
                stats.bad_records += 1
                continue
            yield text


def _read_files(files: tuple[Path, ...], text_field: str, stats: DataStats) -> Iterator[str | None]:
    for path in files:
        if path.name.endswith(TEXT_SUFFIXES):
            yield from _read_text_file(path, stats)
        else:
            yield from _read_json_file(path, text_field, stats)


def _open_binary(path: Path) -> IO[bytes]:
    return gzip.open(path, "rb") if path.name.endswith(".gz") else path.open("rb")


def _decode(raw: bytes, stats: DataStats) -> str:
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        text = raw.decode("utf-8", errors="replace")
        stats.invalid_utf8_lines += 1
        stats.replaced_characters += text.count("\ufffd")
        return text


def _read_text_file(path: Path, stats: DataStats) -> Iterator[str]:
    paragraphs: list[str] = []
    with _open_binary(path) as f:
        for raw in f:
            line = _decode(raw, stats).strip().lstrip("\ufeff")
            if line:
                paragraphs.append(line)
                continue
            stats.blank_lines += 1
            if paragraphs:
                yield "\n".join(paragraphs)
                paragraphs = []
    if paragraphs:
        yield "\n".join(paragraphs)


def _read_json_file(path: Path, text_field: str, stats: DataStats) -> Iterator[str | None]:
    with _open_binary(path) as f:
        head = f.read(4096).lstrip()
    if head.startswith(b"["):  # one JSON array: parsed whole, so meant for small files
        with _open_binary(path) as f:
            try:
                records = json.loads(_decode(f.read(), stats))
            except json.JSONDecodeError:
                stats.bad_records += 1
                return
        yield from _record_texts(records if isinstance(records, list) else [records], text_field, stats)
    else:
        yield from _record_texts(_json_lines(path, stats), text_field, stats)


def _json_lines(path: Path, stats: DataStats) -> Iterator[Any]:
    with _open_binary(path) as f:
        for raw in f:
            line = _decode(raw, stats).strip()
            if not line:
                stats.blank_lines += 1
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                stats.bad_records += 1


def _record_texts(records: Iterable[Any], text_field: str, stats: DataStats) -> Iterator[str | None]:
    """The text of each record; None where it is missing or null, bad records counted and dropped."""
    for record in records:
        text = record.get(text_field) if isinstance(record, dict) else None
        if not isinstance(record, dict) or (text is not None and not isinstance(text, str)):
            stats.bad_records += 1
            continue
        yield text


# --- cleaning -------------------------------------------------------------------------------


def _document_rows(records: _Records, stats: DataStats, max_document_chars: int) -> Iterator[dict[str, str]]:
    """The generator behind both the cached and the streaming dataset; stats restart each pass."""
    stats.reset()
    for text in records(stats):
        paragraphs = [p for p in (p.strip() for p in (text or "").split("\n")) if p]
        if not paragraphs:
            stats.empty_documents += 1
            continue
        pieces = split_long_document(paragraphs, max_document_chars, stats)
        stats.split_documents += len(pieces) > 1
        for piece in pieces:
            stats.documents += 1
            stats.paragraphs += len(piece)
            document = "\n".join(piece)
            stats.characters += len(document)
            yield {"text": document}
    log = logger.warning if stats.documents == 0 else logger.info
    log("%s", stats.summary())


def split_long_document(paragraphs: list[str], max_chars: int, stats: DataStats) -> list[list[str]]:
    """Group paragraphs into pieces of at most ``max_chars`` characters (joined by newlines)."""
    pieces: list[list[str]] = [[]]
    piece_chars = 0
    for paragraph in _cut_long_paragraphs(paragraphs, max_chars, stats):
        if pieces[-1] and piece_chars + 1 + len(paragraph) > max_chars:
            pieces.append([])
            piece_chars = -1
        pieces[-1].append(paragraph)
        piece_chars += 1 + len(paragraph)
    return pieces


def _cut_long_paragraphs(paragraphs: Iterable[str], max_chars: int, stats: DataStats) -> Iterator[str]:
    for paragraph in paragraphs:
        if len(paragraph) <= max_chars:
            yield paragraph
            continue
        stats.split_paragraphs += 1
        while len(paragraph) > max_chars:
            cut = paragraph.rfind(" ", 0, max_chars + 1)
            cut = cut if cut > 0 else max_chars  # no space: cut inside the word
            yield paragraph[:cut].rstrip()
            paragraph = paragraph[cut:].lstrip()
        if paragraph:
            yield paragraph


def _save_or_restore_stats(documents: datasets.Dataset, stats: DataStats) -> None:
    """The generator only runs on a cache miss; keep its stats beside the Arrow file for hits."""
    if not documents.cache_files:
        return
    path = Path(documents.cache_files[0]["filename"]).parent / STATS_FILE_NAME
    generator_ran = stats != DataStats(source=stats.source)
    if generator_ran or not path.exists():
        path.write_text(json.dumps(dataclasses.asdict(stats), indent=1))
        return
    saved = json.loads(path.read_text())
    for field in dataclasses.fields(stats):
        if field.name != "source" and field.name in saved:
            setattr(stats, field.name, saved[field.name])
    logger.info("%s (documents reused from the cache)", stats.summary())
