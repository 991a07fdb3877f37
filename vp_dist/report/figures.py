"""The report's two figures, drawn on Agg canvases (no pyplot, no global backend state).

`sparsity_heatmap` is the paper's Fig. 3: fraction of rows pruned per transformer block and
projection type. `training_curves` shows loss and mean sparsity over optimizer steps with the
prune steps marked and the training phases shaded.
"""
from __future__ import annotations

import math
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from . import summary

DPI = 120
PHASE_COLOURS = ("#dbe9f6", "#fde6cf", "#dcefd9", "#eadcf0", "#f6f3c9")


def _save(figure: Figure, path: Path) -> Path:
    FigureCanvasAgg(figure)
    figure.savefig(path, dpi=DPI)
    return path


def _message_figure(title: str, message: str) -> Figure:
    figure = Figure(figsize=(6, 2.5), layout="constrained")
    axes = figure.add_subplot()
    axes.set_axis_off()
    axes.set_title(title)
    axes.text(0.5, 0.5, message, ha="center", va="center", wrap=True, color="0.3")
    return figure


def sparsity_heatmap(report: dict, path: Path) -> Path:
    """Blocks as rows, projection types as columns, each cell the share of the layer's rows pruned."""
    grid = summary.sparsity_grid(report)
    if grid is None:
        return _save(_message_figure("Per-layer sparsity", "The report lists no prunable layers yet."), path)
    event = summary.last_prune_event(report)
    if event is None:
        step = summary.last_step(report)
        title = f"Per-layer sparsity: no pruning yet{'' if step is None else f' (step {step})'}"
    else:
        title = (f"Per-layer sparsity after step {event.get('step', '?')}: "
                 f"{summary.percent(grid.overall)} of rows pruned "
                 f"(target {summary.percent(event.get('target_sparsity'), 0)})")

    n_blocks, n_types = grid.pruned_fraction.shape
    figure = Figure(figsize=(1.15 * n_types + 2.6, 0.42 * n_blocks + 1.8), layout="constrained")
    axes = figure.add_subplot()
    image = axes.imshow(np.ma.masked_invalid(grid.pruned_fraction), cmap=_colour_map(), vmin=0.0, vmax=1.0,
                        aspect="auto", interpolation="nearest")
    axes.set_xticks(range(n_types), grid.types)
    axes.set_yticks(range(n_blocks), [f"block {block}" for block in grid.blocks])
    axes.tick_params(length=0)
    axes.xaxis.tick_top()
    axes.set_xticks(np.arange(-0.5, n_types), minor=True)
    axes.set_yticks(np.arange(-0.5, n_blocks), minor=True)
    axes.grid(which="minor", color="white", linewidth=1.5)
    axes.tick_params(which="minor", length=0)
    for spine in axes.spines.values():
        spine.set_visible(False)
    font_size = 9 if n_blocks <= 16 else 7
    for row in range(n_blocks):
        for column in range(n_types):
            value = grid.pruned_fraction[row, column]
            if math.isnan(value):
                text, colour = ("n/a" if grid.rows[row, column] else "–"), "0.35"
            else:
                text = f"{summary.percent(value, 0)}\n{grid.kept[row, column]}/{grid.rows[row, column]}"
                colour = "white" if value > 0.55 else "black"
            axes.text(column, row, text, ha="center", va="center", color=colour, fontsize=font_size, linespacing=1.1)
    colour_bar = figure.colorbar(image, ax=axes, fraction=0.05, pad=0.02)
    colour_bar.set_label("fraction of rows pruned")
    colour_bar.ax.yaxis.set_major_formatter(lambda value, _: f"{value:.0%}")
    axes.set_title(title, fontsize=10)
    axes.set_xlabel("cell: % pruned, kept rows / rows", fontsize=8, color="0.35")
    return _save(figure, path)


def _colour_map():
    return matplotlib.colormaps["magma_r"].with_extremes(bad="0.9")


def training_curves(report: dict, path: Path) -> Path:
    """Loss (top) and mean sparsity over types (bottom) against optimizer step."""
    entries = summary.history(report)
    if not entries:
        return _save(_message_figure("Training curves", "The report has no training history yet."), path)
    steps = np.array([entry["step"] for entry in entries], dtype=np.float64)
    loss = np.array([_number(entry.get("loss")) for entry in entries])
    sparsity = np.array([_number(entry.get("sparsity")) for entry in entries])

    figure = Figure(figsize=(9, 5.5), layout="constrained")
    loss_axes, sparsity_axes = figure.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    loss_axes.plot(steps, loss, color="tab:blue", linewidth=1.2, label="loss")
    loss_axes.set_ylabel("loss")
    sparsity_axes.step(steps, 100 * sparsity, where="post", color="tab:red", linewidth=1.5,
                       label="mean sparsity over types")
    sparsity_axes.set_ylabel("mean sparsity (%)")
    sparsity_axes.set_xlabel("optimizer step")
    target = (report.get("schedule") or {}).get("target")
    if target is not None:
        sparsity_axes.axhline(100 * target, color="tab:red", linestyle=":", linewidth=1,
                              label=f"target {target:.0%}")
    sparsity_axes.set_ylim(0, 100 * max(1.1 * (target or 0), np.nanmax(sparsity, initial=0) * 1.1, 0.1))

    colours = {}
    spans = summary.phase_spans(entries)
    # Shade each phase up to halfway to the next one, so a sparsely logged history leaves no gaps.
    edges = ([spans[0].first_step - 0.5]
             + [(span.last_step + after.first_step) / 2 for span, after in zip(spans, spans[1:])]
             + [spans[-1].last_step + 0.5])
    for span, left, right in zip(spans, edges, edges[1:]):
        colour = colours.setdefault(span.phase, PHASE_COLOURS[len(colours) % len(PHASE_COLOURS)])
        for axes in (loss_axes, sparsity_axes):
            axes.axvspan(left, right, color=colour, zorder=0, linewidth=0)
        loss_axes.text((span.first_step + span.last_step) / 2, 1.01, span.phase, ha="center", va="bottom",
                       transform=loss_axes.get_xaxis_transform(), fontsize=9, color="0.25")

    prune_steps = [event["step"] for event in report.get("prune_events") or [] if "step" in event]
    for index, step in enumerate(prune_steps):
        for axes in (loss_axes, sparsity_axes):
            axes.axvline(step, color="0.45", linestyle="--", linewidth=0.8,
                         label="prune step" if index == 0 and axes is sparsity_axes else None)
    loss_axes.legend(loc="upper right", fontsize=8)
    sparsity_axes.legend(loc="center left", fontsize=8)  # empty there: pruning starts later
    loss_axes.set_title("Loss and sparsity by step", pad=16)
    for axes in (loss_axes, sparsity_axes):
        axes.grid(alpha=0.3)
    return _save(figure, path)


def _number(value) -> float:
    return math.nan if value is None else float(value)
