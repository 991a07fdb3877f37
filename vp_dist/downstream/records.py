"""Local dataset files for the GLUE and SQuAD loaders: finding split files, TSV and JSON rows."""

from __future__ import annotations

import csv
import json
from pathlib import Path
from typing import Any, Iterator, Sequence


def find_split_file(data_dir: str | Path, split: str, candidates: Sequence[str]) -> Path:
    """The one file in `data_dir` among `candidates` (names tried for `split`).

    Raises FileNotFoundError naming the directory and every name tried, or ValueError when more
    than one candidate exists (the loader would otherwise pick one silently).
    """
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data_dir={str(data_dir)!r} is not a directory")
    found = [data_dir / name for name in candidates if (data_dir / name).is_file()]
    if not found:
        raise FileNotFoundError(
            f"no file for split {split!r} in {str(data_dir)!r}; expected one of {list(candidates)}"
        )
    if len(found) > 1:
        raise ValueError(
            f"several files for split {split!r} in {str(data_dir)!r}: {[p.name for p in found]}; "
            "keep only one"
        )
    return found[0]


def read_tsv_rows(
    path: Path, fixed_columns: Sequence[str] | None = None
) -> Iterator[tuple[int, dict[str, str]]]:
    """Yield (line number, row as {column: text}) for a GLUE-style TSV file.

    The header line names the columns unless `fixed_columns` is given (header-less files such as
    CoLA's). Quote characters are plain text, as in the GLUE files (`csv.QUOTE_NONE`).
    """
    with open(path, encoding="utf-8-sig", newline="") as tsv_file:
        reader = csv.reader(tsv_file, delimiter="\t", quoting=csv.QUOTE_NONE)
        columns = list(fixed_columns) if fixed_columns is not None else next(reader, None)
        if columns is None:
            raise ValueError(f"{path} is empty: expected a header line")
        for fields in reader:
            if not fields:  # trailing blank line
                continue
            if len(fields) != len(columns):
                raise ValueError(
                    f"{path}:{reader.line_num} has {len(fields)} tab-separated fields, "
                    f"expected {len(columns)} ({columns})"
                )
            yield reader.line_num, dict(zip(columns, fields))


def tsv_header(path: Path) -> list[str]:
    """The column names on the first line of a TSV file."""
    with open(path, encoding="utf-8-sig", newline="") as tsv_file:
        return next(csv.reader(tsv_file, delimiter="\t", quoting=csv.QUOTE_NONE), [])


def read_json_records(path: Path) -> list[dict[str, Any]]:
    """Rows from JSON lines (one object per line, `Dataset.to_json`'s default) or a JSON list."""
    with open(path, encoding="utf-8") as json_file:
        text = json_file.read()
    try:
        document = json.loads(text)
    except json.JSONDecodeError:
        document = None  # not one JSON document: read it as JSON lines below
    if isinstance(document, list):
        records = document
    elif document is not None and not isinstance(document, dict):
        raise ValueError(f"{path} holds a JSON {type(document).__name__}; expected rows")
    else:
        records = []
        # Split on "\n" only: str.splitlines would also cut at U+2028 inside unescaped strings.
        for line_number, line in enumerate(text.split("\n"), start=1):
            if not line.strip():
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as error:
                raise ValueError(f"{path}:{line_number} is not valid JSON: {error}") from error
    for index, record in enumerate(records):
        if not isinstance(record, dict):
            raise ValueError(
                f"{path}: row {index} is a {type(record).__name__}, expected an object"
            )
    return records


def require_columns(source: str, present: Sequence[str], required: Sequence[str]) -> None:
    """Raise ValueError naming the columns of `required` missing from `present`."""
    missing = [column for column in required if column not in present]
    if missing:
        raise ValueError(
            f"{source} lacks column(s) {missing}; it has {list(present)}, needs {list(required)}"
        )
