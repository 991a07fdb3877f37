"""`render_report`: a report dict in, the heat map, the training curves and `report.md` out."""
from __future__ import annotations

from pathlib import Path

from .figures import sparsity_heatmap, training_curves
from .markdown import markdown_report
from .schema import validate_report

HEATMAP_FILE = "sparsity_heatmap.png"
CURVES_FILE = "training_curves.png"
MARKDOWN_FILE = "report.md"


def render_report(report: dict, out_dir: str | Path, *, source: str | Path | None = None) -> dict[str, Path]:
    """Write the run report into `out_dir` (created if needed).

    Returns {"sparsity_heatmap": png, "training_curves": png, "report": md}. Every file is written
    even for a mid-run report: figures and sections without data yet say so. `source` (the JSON it
    came from) is named at the top of report.md. Raises ReportFormatError (naming each field) for a
    report that breaks the schema, before writing anything.
    """
    validate_report(report, source=source or "report")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    heatmap = sparsity_heatmap(report, out_dir / HEATMAP_FILE)
    curves = training_curves(report, out_dir / CURVES_FILE)
    figures = {"Per-layer sparsity": Path(HEATMAP_FILE), "Loss and sparsity by step": Path(CURVES_FILE)}
    markdown = out_dir / MARKDOWN_FILE
    markdown.write_text(markdown_report(report, figures, None if source is None else Path(source)),
                        encoding="utf-8")
    return {"sparsity_heatmap": heatmap, "training_curves": curves, "report": markdown}
