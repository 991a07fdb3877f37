"""The Markdown summary of a run: shape, schedule, prune events, kept rows, memory, speed, size.

Every section renders from whatever the report holds; a section whose data a mid-run report does
not have yet says so in one italic line instead of disappearing.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Sequence

from . import summary


def _table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def _not_yet(what: str) -> str:
    return f"_Not in this report yet: {what}._"


def _value(value: object) -> str:
    return "n/a" if value is None else str(value)


def _count(value: int | None) -> str:
    return "n/a" if value is None else f"{int(value):,}"


def _decimal(value: float | None) -> str:
    return "n/a" if value is None else f"{float(value):,.1f}"


def _run_section(report: dict) -> str:
    model = report.get("model") or {}
    layers = summary.layer_rows(report)
    rows = [(f"model.{key}", _value(value)) for key, value in model.items()]
    rows += [
        ("world size", _value(report.get("world_size"))),
        ("ZeRO stage", _value(report.get("zero_stage"))),
        ("dtype", _value(report.get("dtype"))),
        ("prunable layers", f"{len(layers)} ({_count(sum(layer.rows for layer in layers))} rows)"),
        ("last logged step", _value(summary.last_step(report))),
        ("squeezed", "yes" if report.get("squeezed") else "no"),
    ]
    return "## Run\n\n" + _table(("", "value"), rows)


def _schedule_section(report: dict) -> str:
    schedule = report.get("schedule")
    if not schedule:
        return "## Schedule\n\n" + _not_yet("pruning schedule")
    planned = [(int(step), float(target)) for step, target in schedule.get("pruning_steps") or []]
    done = {event.get("step") for event in report.get("prune_events") or []}
    lines = [
        "## Schedule\n",
        f"First pruning at step {_value(schedule.get('start'))}, then every {_value(schedule.get('interval'))} "
        f"steps, +{summary.percent(schedule.get('increment'), 0)} each, "
        f"up to {summary.percent(schedule.get('target'), 0)}.",
    ]
    if planned:
        steps = ", ".join(f"{step} ({summary.percent(target, 0)}{'' if step in done else ', pending'})"
                          for step, target in planned)
        done_count = sum(step in done for step, _ in planned)
        lines.append(f"Pruning steps: {steps}. Done: {done_count} of {len(planned)}.")
    return "\n".join(lines)


def _prune_events_section(report: dict, types: list[str]) -> str:
    events = sorted(report.get("prune_events") or [], key=lambda event: event.get("step", -1))
    if not events:
        return "## Prune events\n\n" + _not_yet("no pruning step has run")
    rows = [(event["step"], summary.percent(event.get("target_sparsity")),
             *(summary.percent((event.get("sparsity") or {}).get(t)) for t in types),
             _count(event.get("newly_pruned"))) for event in events]
    return ("## Prune events\n\nFraction of each projection type's rows pruned after the step.\n\n"
            + _table(("step", "target", *types, "newly pruned"), rows))


def _kept_rows_section(report: dict) -> str:
    layers = summary.layer_rows(report)
    if not layers:
        return "## Kept rows per layer\n\n" + _not_yet("list of prunable layers")
    event = summary.last_prune_event(report)
    intro = ("No pruning yet: every row is kept." if event is None
             else f"After the last prune event (step {event['step']}).")
    rows = [(f"`{layer.name}`", layer.block, layer.projection_type, _count(layer.rows), _count(layer.kept),
             summary.percent(layer.pruned_fraction)) for layer in layers]
    header = ("layer", "block", "type", "rows", "kept", "pruned")
    return f"## Kept rows per layer\n\n{intro}\n\n" + _table(header, rows)


def _memory_section(report: dict) -> str:
    ranks = summary.memory_by_rank(report)
    if not ranks:
        return "## Memory per rank\n\n" + _not_yet("memory measurements")
    squeezed = any(rank.after is not None for rank in ranks)

    def cell(rank: summary.RankMemory, read) -> str:
        before = None if rank.before is None else read(rank.before)
        if not squeezed:
            return summary.mib(before)
        after = None if rank.after is None else read(rank.after)
        if before is None and after is None:
            return "n/a"  # e.g. max_memory_allocated on CPU
        return f"{summary.mib(before)} → {summary.mib(after)}"

    header = ["rank", *(f"{kind} (MiB)" for kind in summary.STATE_KINDS), "P+G+O (MiB)"]
    header += ["P+G+O reduction"] if squeezed else []
    header += ["peak allocated (MiB)"]
    rows = []
    for rank in ranks:
        row = [rank.rank, *(cell(rank, lambda entry, kind=kind: summary.kind_bytes(entry, kind))
                            for kind in summary.STATE_KINDS),
               cell(rank, summary.state_bytes)]
        if squeezed:
            reduction = rank.reduction_percent
            row.append("n/a" if reduction is None else f"{reduction:.1f}%")
        row.append(cell(rank, lambda entry: entry.get("max_memory_allocated")))
        rows.append(row)
    lines = ["## Memory per rank\n"]
    if squeezed:
        lines.append("Before → after squeezing. P+G+O: parameter + gradient + optimizer-state bytes.\n")
    else:
        missing = _not_yet("memory after squeezing (the model is not squeezed yet)")
        lines.append(f"Before squeezing. {missing}\n")
    lines.append(_table(header, rows))
    paired = [rank for rank in ranks if rank.before is not None and rank.after is not None]
    if paired:
        before_total = sum(summary.state_bytes(rank.before) for rank in paired)
        after_total = sum(summary.state_bytes(rank.after) for rank in paired)
        total_reduction = summary.reduction_percent(before_total, after_total)
        lines.append(f"\nAll ranks: P+G+O {summary.mib(before_total)} MiB → {summary.mib(after_total)} MiB, "
                     f"a {'n/a' if total_reduction is None else f'{total_reduction:.1f}%'} reduction.")
    return "\n".join(lines)


def _throughput_section(report: dict) -> str:
    lines = ["## Throughput\n"]
    throughput = report.get("throughput")
    if throughput:
        # The schema names steps; the training loop writes the token count instead. Show what is there.
        measured = [f"{_count(throughput[key])} {key}" for key in ("steps", "tokens") if throughput.get(key) is not None]
        lines.append(f"{_decimal(throughput.get('tokens_per_s'))} tokens/s: {' and '.join(measured) or 'n/a'} "
                     f"in {_decimal(throughput.get('seconds'))} s.")
    else:
        lines.append(_not_yet("run throughput (written at the end of the run)"))
    spans = summary.phase_spans(summary.history(report))
    if spans:
        rows = []
        for span in spans:
            losses = [entry["loss"] for entry in span.entries if entry.get("loss") is not None]
            speeds = [entry["tokens_per_s"] for entry in span.entries if entry.get("tokens_per_s") is not None]
            first_loss, last_loss = (f"{losses[0]:.4f}", f"{losses[-1]:.4f}") if losses else ("n/a", "n/a")
            mean_speed = _decimal(sum(speeds) / len(speeds)) if speeds else "n/a"
            rows.append((span.phase, f"{span.first_step}–{span.last_step}", first_loss, last_loss, mean_speed))
        lines.append("\nBy phase, from the logged history:\n")
        lines.append(_table(("phase", "steps", "first loss", "last loss", "mean tokens/s"), rows))
    return "\n".join(lines)


def _parameters_section(report: dict) -> str:
    parameters = report.get("parameters") or {}
    before, after = parameters.get("before"), parameters.get("after")
    if before is None:
        return "## Parameters\n\n" + _not_yet("parameter count")
    if after is None:
        return f"## Parameters\n\n{_count(before)} parameters. " + _not_yet("parameter count after squeezing")
    reduction = summary.reduction_percent(before, after)
    return (f"## Parameters\n\n{_count(before)} before squeezing → {_count(after)} after "
            f"({'n/a' if reduction is None else f'{reduction:.1f}%'} fewer).")


def markdown_report(report: dict, figures: dict[str, Path], source: Path | None = None) -> str:
    """The report as Markdown; `figures` maps a caption to a PNG path relative to the .md file."""
    types = summary.projection_types(report)
    title = "# Variance Pruning run report"
    header = f"{title}\n\nFrom `{source}`." if source is not None else title
    sections = [
        header,
        _run_section(report),
        _schedule_section(report),
        _prune_events_section(report, types),
        _kept_rows_section(report),
        _memory_section(report),
        _throughput_section(report),
        _parameters_section(report),
        "## Figures\n\n" + "\n\n".join(f"![{caption}]({path.as_posix()})" for caption, path in figures.items()),
    ]
    return "\n\n".join(sections) + "\n"
