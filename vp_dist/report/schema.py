"""Checking a report dict against schema version 1 before anything is drawn from it.

Sections and optional fields may be missing or null (a checkpoint mid-run has no squeeze yet), but
what is there must have its documented type, and every entry of a list names what identifies it (a
layer its name, block, type and rows; a prune event or history entry its step). A report that breaks this
is refused with every problem named, instead of a figure that is silently wrong.
"""
from __future__ import annotations

from numbers import Integral, Real

_MAX_PROBLEMS_SHOWN = 6


class ReportFormatError(ValueError):
    """A `vp_report.json` that is not a complete, valid report."""


def _kind(value, kind: str) -> bool:
    if kind == "int":
        return isinstance(value, Integral) and not isinstance(value, bool)
    if kind == "number":
        return isinstance(value, Real) and not isinstance(value, bool)
    return isinstance(value, {"str": str, "bool": bool, "dict": dict, "list": list}[kind])


class _Checker:
    def __init__(self):
        self.problems: list[str] = []

    def field(self, mapping: dict, key: str, kind: str, where: str, *, required: bool = False):
        """The value of `mapping[key]` when it has `kind`, else None (and a problem noted).

        An optional field may be null, read as "not there yet"; a required one may not.
        """
        value = mapping.get(key)
        if value is None:
            if required:
                self.problems.append(f"{where}.{key} is {'null' if key in mapping else 'missing'}")
            return None
        if not _kind(value, kind):
            self.problems.append(f"{where}.{key}={value!r} must be {'an' if kind == 'int' else 'a'} {kind}")
            return None
        return value

    def entries(self, mapping: dict, key: str, where: str) -> list[tuple[str, dict]]:
        """(location, entry) for each dict in the list `mapping[key]`; other items are problems."""
        items = self.field(mapping, key, "list", where) or []
        found = []
        for index, item in enumerate(items):
            location = f"{where}.{key}[{index}]"
            if isinstance(item, dict):
                found.append((location, item))
            else:
                self.problems.append(f"{location}={item!r} must be an object")
        return found


def validate_report(report: dict, source: object = "report") -> None:
    """Raise ReportFormatError naming each field of `report` whose type breaks schema version 1."""
    if not isinstance(report, dict):
        raise ReportFormatError(f"{source} is a {type(report).__name__}, expected a JSON object")
    if "version" not in report and not {"layers", "prune_events", "history", "schedule"} & set(report):
        raise ReportFormatError(f"{source} holds none of a run report's fields (version, layers, prune_events, "
                                "history, schedule): not a vp_report.json")
    check = _Checker()
    top = "report"
    for key, kind in (("version", "int"), ("world_size", "int"), ("zero_stage", "int"), ("dtype", "str"),
                      ("squeezed", "bool"), ("model", "dict")):
        check.field(report, key, kind, top)
    for index, name in enumerate(check.field(report, "projection_types", "list", top) or []):
        if not isinstance(name, str):
            check.problems.append(f"{top}.projection_types[{index}]={name!r} must be a str")

    schedule = check.field(report, "schedule", "dict", top) or {}
    for key, kind in (("start", "int"), ("interval", "int"), ("increment", "number"), ("target", "number")):
        check.field(schedule, key, kind, f"{top}.schedule")
    for index, pair in enumerate(check.field(schedule, "pruning_steps", "list", f"{top}.schedule") or []):
        if not (isinstance(pair, list) and len(pair) == 2 and _kind(pair[0], "int") and _kind(pair[1], "number")):
            check.problems.append(f"{top}.schedule.pruning_steps[{index}]={pair!r} must be [step, sparsity]")

    for where, layer in check.entries(report, "layers", top):
        for key, kind in (("name", "str"), ("block", "int"), ("type", "str"), ("rows", "int")):
            check.field(layer, key, kind, where, required=True)

    for where, event in check.entries(report, "prune_events", top):
        check.field(event, "step", "int", where, required=True)
        check.field(event, "target_sparsity", "number", where)
        check.field(event, "newly_pruned", "int", where)
        for key, kind in (("sparsity", "number"), ("kept_rows", "int")):
            for name, value in (check.field(event, key, "dict", where) or {}).items():
                if value is not None and not _kind(value, kind):
                    check.problems.append(f"{where}.{key}[{name!r}]={value!r} must be {kind}")

    for where, entry in check.entries(report, "history", top):
        check.field(entry, "step", "int", where, required=True)
        check.field(entry, "phase", "str", where)
        for key in ("loss", "lr", "tokens_per_s", "sparsity"):
            check.field(entry, key, "number", where)

    memory = check.field(report, "memory", "dict", top) or {}
    for stage in ("before_squeeze", "after_squeeze"):
        for where, entry in check.entries(memory, stage, f"{top}.memory"):
            check.field(entry, "rank", "int", where)  # missing: its place in the list
            for key in ("parameter_bytes", "gradient_bytes", "optimizer_bytes", "max_memory_allocated",
                        "params_lp", "params_fp32", "gradients", "optimizer_states"):  # partition_bytes' names
                check.field(entry, key, "int", where)

    throughput = check.field(report, "throughput", "dict", top) or {}
    for key, kind in (("tokens_per_s", "number"), ("steps", "int"), ("tokens", "int"), ("seconds", "number")):
        check.field(throughput, key, kind, f"{top}.throughput")
    parameters = check.field(report, "parameters", "dict", top) or {}
    for key in ("before", "after"):
        check.field(parameters, key, "int", f"{top}.parameters")

    if check.problems:
        shown = "; ".join(check.problems[:_MAX_PROBLEMS_SHOWN])
        more = len(check.problems) - _MAX_PROBLEMS_SHOWN
        raise ReportFormatError(f"{source} does not follow vp_report schema version 1: {shown}"
                                f"{f' (and {more} more)' if more > 0 else ''}")
