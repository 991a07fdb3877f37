"""Finding and reading a run's `vp_report.json` (schema: `vp_dist.report` docstring).

The training loop writes the report to `DIR/vp_report.json` at the end of a run and a copy into
every checkpoint folder, `DIR/checkpoints/<tag>/vp_report.json`. `find_report` accepts any of
those places: the JSON file, the run directory, the `checkpoints` folder or one tag's folder.
"""
from __future__ import annotations

import json
import logging
import re
from pathlib import Path

from .schema import ReportFormatError, validate_report

logger = logging.getLogger(__name__)

REPORT_FILE = "vp_report.json"
CHECKPOINTS_DIR = "checkpoints"
LATEST_FILE = "latest"  # DeepSpeed's save_checkpoint writes the newest tag's name here
SCHEMA_VERSION = 1


class ReportNotFoundError(FileNotFoundError):
    """No `vp_report.json` where the caller pointed."""


def find_report(path: str | Path) -> Path:
    """The `vp_report.json` that `path` designates.

    - a file: itself;
    - a folder holding `vp_report.json` (a run directory or one checkpoint tag): that file;
    - a run directory without one (mid-run): the latest checkpoint in `DIR/checkpoints`;
    - a checkpoints folder: its latest tag, named by DeepSpeed's `latest` file when there is one,
      else the tag whose `vp_report.json` was written last (ties: the higher tag in natural order,
      so `global_step100` beats `global_step20`).
    """
    path = Path(path)
    if path.is_file():
        return path
    if not path.exists():
        raise ReportNotFoundError(f"{str(path)!r} does not exist; pass a run directory, a "
                                  f"checkpoint folder or a {REPORT_FILE} file")
    if (path / REPORT_FILE).is_file():
        return path / REPORT_FILE
    checkpoints = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
    return _latest_checkpoint_report(checkpoints, asked=path)


def _latest_checkpoint_report(checkpoints: Path, asked: Path) -> Path:
    candidates = [tag / REPORT_FILE for tag in checkpoints.iterdir() if (tag / REPORT_FILE).is_file()]
    newest = max(candidates, key=lambda report: (report.stat().st_mtime, _natural_key(report.parent.name)),
                 default=None)
    latest = checkpoints / LATEST_FILE
    if latest.is_file():
        tag = latest.read_text(encoding="utf-8").strip()
        report = checkpoints / tag / REPORT_FILE
        if not report.is_file():
            # The loop saves the engine (and `latest`) before the report: a run stopped in between
            # leaves this. No older tag is picked silently: it would be a report of another step.
            earlier = f"; the newest report is in {newest.parent}, pass that folder" if newest else ""
            raise ReportNotFoundError(f"{latest} names tag {tag!r} but {report} does not exist (the run "
                                      f"may have stopped while saving that checkpoint){earlier}")
        return report
    if newest is None:
        raise ReportNotFoundError(
            f"no {REPORT_FILE} in {str(asked)!r}, nor in a checkpoint folder under "
            f"{str(checkpoints)!r}; pass a run directory, a checkpoint folder or the JSON file")
    return newest


def _natural_key(name: str) -> tuple:
    return tuple(int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name))


def load_report(path: str | Path) -> dict:
    """The report dict found at `path` (see `find_report` for what `path` may be).

    Raises ReportNotFoundError when there is none and ReportFormatError when the file is truncated,
    not JSON, or breaks the schema (`validate_report`). Missing sections are fine: a mid-run report
    lacks some.
    """
    report_path = find_report(path)
    text = report_path.read_text(encoding="utf-8")
    if not text.strip():
        raise ReportFormatError(f"{report_path} is empty; the run may have been stopped while writing it")
    try:
        report = json.loads(text)
    except json.JSONDecodeError as error:
        # A file cut short mid-write fails at its end, or (inside a string) does not end in '}'.
        if error.pos >= len(text.rstrip()) or not text.rstrip().endswith("}"):
            raise ReportFormatError(
                f"{report_path} is truncated: the JSON ends after {len(text)} characters "
                f"({error.msg}); the run may have been stopped while writing it. Use an earlier "
                "checkpoint's report") from None
        raise ReportFormatError(f"{report_path} is not valid JSON: {error.msg} at line {error.lineno}, "
                                f"column {error.colno}") from None
    if not isinstance(report, dict):
        raise ReportFormatError(f"{report_path} holds a JSON {type(report).__name__}, expected an object")
    validate_report(report, source=report_path)
    version = report.get("version")
    if version != SCHEMA_VERSION:
        logger.warning("%s has version=%r, this reader knows version %d; rendering what it recognises",
                       report_path, version, SCHEMA_VERSION)
    return report


def default_out_dir(report_path: Path) -> Path:
    """Where to render a report found at `report_path` when the caller names no folder.

    `DIR/vp_report.json` -> `DIR/report`; a checkpoint's `DIR/checkpoints/<tag>/vp_report.json` ->
    `DIR/report/<tag>` (the checkpoint folder itself stays as DeepSpeed wrote it).
    """
    folder = report_path.parent
    if folder.parent.name == CHECKPOINTS_DIR:
        return folder.parent.parent / "report" / folder.name
    return folder / "report"
