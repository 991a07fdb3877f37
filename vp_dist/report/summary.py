"""The numbers a report shows, computed once from the report dict and shared by figures and text.

Pure functions on the dict; every one tolerates the sections a mid-run report does not have yet
(it returns None or an empty list, and the caller says so).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import numpy as np

from ..adapters import PROJECTION_TYPES

MIB = 1024 ** 2
# A memory entry names its bytes either as in the report schema or as
# `vp_dist.distributed.zero.partition_bytes` does (what the training loop records):
# parameters = params_lp (module copy) + params_fp32 (master partition).
STATE_KINDS = ("parameters", "gradients", "optimizer states")
_SCHEMA_KEYS = {"parameters": "parameter_bytes", "gradients": "gradient_bytes", "optimizer states": "optimizer_bytes"}
_PARTITION_KEYS = {"parameters": ("params_lp", "params_fp32"), "gradients": ("gradients",),
                   "optimizer states": ("optimizer_states",)}


def projection_types(report: dict) -> list[str]:
    """The report's projection types in its order; types seen only in `layers` come after."""
    types = list(report.get("projection_types") or PROJECTION_TYPES)
    for layer in report.get("layers") or []:
        if layer.get("type") not in types:
            types.append(layer.get("type"))
    return types


def last_prune_event(report: dict) -> dict | None:
    events = report.get("prune_events") or []
    return max(events, key=lambda event: event.get("step", -1)) if events else None


def last_step(report: dict) -> int | None:
    steps = [entry["step"] for entry in report.get("history") or [] if "step" in entry]
    return max(steps) if steps else None


@dataclass(frozen=True)
class LayerRows:
    name: str
    block: int
    projection_type: str
    rows: int
    kept: int | None  # None: the last prune event does not name this layer

    @property
    def pruned_fraction(self) -> float:
        if self.kept is None or self.rows <= 0:
            return math.nan
        return 1.0 - self.kept / self.rows


def layer_rows(report: dict) -> list[LayerRows]:
    """Every prunable layer with its rows kept after the last prune event (all, before the first)."""
    event = last_prune_event(report)
    kept_rows = (event.get("kept_rows") or {}) if event is not None else None
    layers = []
    for layer in report.get("layers") or []:
        rows = int(layer.get("rows", 0))
        kept = rows if kept_rows is None else kept_rows.get(layer.get("name"))
        layers.append(LayerRows(layer.get("name", "?"), int(layer.get("block", -1)),
                                layer.get("type", "?"), rows, None if kept is None else int(kept)))
    return layers


@dataclass(frozen=True)
class SparsityGrid:
    """Fraction of rows pruned per (block, projection type): the paper's Fig. 3.

    pruned_fraction[b, t] sums over all layers of block b and type t (a gated FFN has two ffn_in
    layers per block); NaN where the block has no such layer or its kept rows are unknown.
    """

    blocks: list[int]
    types: list[str]
    pruned_fraction: np.ndarray  # [len(blocks), len(types)] float64
    kept: np.ndarray             # [len(blocks), len(types)] int64, -1 where unknown
    rows: np.ndarray             # [len(blocks), len(types)] int64
    overall: float               # fraction of all prunable rows pruned (rows of known layers)


def sparsity_grid(report: dict) -> SparsityGrid | None:
    """The heat map's values, or None when the report lists no layers."""
    layers = layer_rows(report)
    if not layers:
        return None
    blocks = sorted({layer.block for layer in layers})
    types = projection_types(report)
    kept = np.zeros((len(blocks), len(types)), dtype=np.int64)
    rows = np.zeros_like(kept)
    unknown = np.zeros(kept.shape, dtype=bool)
    for layer in layers:
        cell = blocks.index(layer.block), types.index(layer.projection_type)
        rows[cell] += layer.rows
        if layer.kept is None:
            unknown[cell] = True
        else:
            kept[cell] += layer.kept
    known = (rows > 0) & ~unknown
    with np.errstate(divide="ignore", invalid="ignore"):
        pruned_fraction = np.where(known, 1.0 - kept / np.maximum(rows, 1), np.nan)
    total_rows = int(rows[known].sum())
    overall = 1.0 - int(kept[known].sum()) / total_rows if total_rows else math.nan
    return SparsityGrid(blocks, types, pruned_fraction, np.where(known, kept, -1), rows, overall)


def history(report: dict) -> list[dict]:
    """History entries sorted by step; a step logged twice (a resumed run) keeps its last entry."""
    by_step = {}
    for entry in report.get("history") or []:
        if "step" in entry:
            by_step[int(entry["step"])] = entry
    return [by_step[step] for step in sorted(by_step)]


@dataclass(frozen=True)
class PhaseSpan:
    phase: str
    first_step: int
    last_step: int
    entries: list[dict]


def phase_spans(entries: list[dict]) -> list[PhaseSpan]:
    """Consecutive runs of history entries with the same phase, in step order."""
    spans = []
    for phase, group in itertools.groupby(entries, key=lambda entry: str(entry.get("phase") or "unnamed phase")):
        group = list(group)
        spans.append(PhaseSpan(phase, group[0]["step"], group[-1]["step"], group))
    return spans


def kind_bytes(rank_memory: dict, kind: str) -> int | None:
    """Bytes of one of STATE_KINDS in one rank's memory entry, None when the entry lacks it."""
    if rank_memory.get(_SCHEMA_KEYS[kind]) is not None:
        return int(rank_memory[_SCHEMA_KEYS[kind]])
    parts = [rank_memory.get(key) for key in _PARTITION_KEYS[kind]]
    return None if all(part is None for part in parts) else sum(int(part or 0) for part in parts)


def state_bytes(rank_memory: dict) -> int:
    """Parameter + gradient + optimizer-state bytes of one rank's memory entry (missing count 0)."""
    return sum(kind_bytes(rank_memory, kind) or 0 for kind in STATE_KINDS)


def reduction_percent(before: float | None, after: float | None) -> float | None:
    """How much smaller `after` is than `before`, in percent; None when either is unknown."""
    if before is None or after is None or before <= 0:
        return None
    return 100.0 * (before - after) / before


@dataclass(frozen=True)
class RankMemory:
    rank: int
    before: dict | None
    after: dict | None

    @property
    def reduction_percent(self) -> float | None:
        """Reduction of parameter + gradient + optimizer bytes by squeezing on this rank."""
        if self.before is None or self.after is None:
            return None
        return reduction_percent(state_bytes(self.before), state_bytes(self.after))


def memory_by_rank(report: dict) -> list[RankMemory]:
    """Before/after-squeeze memory entries paired by rank, in rank order."""
    memory = report.get("memory") or {}

    def by_rank(entries: list[dict] | None) -> dict[int, dict]:
        return {index if entry.get("rank") is None else int(entry["rank"]): entry
                for index, entry in enumerate(entries or [])}

    before, after = by_rank(memory.get("before_squeeze")), by_rank(memory.get("after_squeeze"))
    return [RankMemory(rank, before.get(rank), after.get(rank)) for rank in sorted(before.keys() | after.keys())]


def mib(num_bytes: int | None) -> str:
    return "n/a" if num_bytes is None else f"{num_bytes / MIB:,.2f}"


def percent(fraction: float | None, digits: int = 1) -> str:
    """`fraction` as a percentage; a layer left with 1 row of 4096 never reads "100%", nor one
    that lost a single row "0%" (more digits are shown instead)."""
    if fraction is None or math.isnan(fraction):
        return "n/a"
    text = f"{100 * fraction:.{digits}f}%"
    for exact, edge in ((0.0, 0.0), (1.0, 100.0)):
        while fraction != exact and float(text[:-1]) == edge and digits < 6:
            digits += 1
            text = f"{100 * fraction:.{digits}f}%"
    return text
