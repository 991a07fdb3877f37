#!/usr/bin/env python
"""Render a Variance Pruning run report: per-layer sparsity heat map, training curves, report.md.

PATH is a run directory, a vp_report.json, a checkpoint folder (DIR/checkpoints/<tag>) or the
checkpoints folder itself (its latest tag). Without --out the files go to DIR/report (or
DIR/report/<tag> for a checkpoint). Example:

    python launch/report.py runs/bert-base --out /tmp/bert-report
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from vp_dist.report import (ReportFormatError, ReportNotFoundError, default_out_dir, find_report,  # noqa: E402
                            load_report, render_report)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("path", help="run directory, vp_report.json, or checkpoint folder")
    parser.add_argument("--out", help="folder to write into (default: DIR/report[/<tag>])")
    args = parser.parse_args(argv)
    try:
        source = find_report(args.path)
        report = load_report(source)
    except (ReportNotFoundError, ReportFormatError) as error:
        parser.exit(2, f"{parser.prog}: error: {error}\n")
    out = Path(args.out or default_out_dir(source))
    if out.exists() and not out.is_dir():
        parser.exit(2, f"{parser.prog}: error: --out {out} is a file, not a folder\n")
    written = render_report(report, out, source=source)
    for path in written.values():
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
