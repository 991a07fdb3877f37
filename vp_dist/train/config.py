"""Run configuration: one YAML/JSON file plus `section.key=value` command-line overrides.

    model:    which BERT shape (a preset name, an HF config file/dir, or a hub name) + overrides
    data:     corpus, tokenizer, cache
    phases:   list of training phases (paper: MLM at seq 128 with pruning, then NSP at seq 512)
    vp:       VPConfig fields
    deepspeed_config, output_dir, seed, logging and checkpoint cadence
"""
from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from ..config import VPConfig


@dataclass
class ModelSpec:
    config: str = "tiny"           # tiny | bert-base | bert-large | path to config.json/dir | hub name
    overrides: dict = field(default_factory=dict)
    fused_layernorm: str = "auto"  # apex FusedLayerNorm: auto (if importable, on GPU) | on | off


@dataclass
class DataSpec:
    corpus: str = "default"        # "default" = the shipped English corpus; files, dirs, or a hub name
    text_field: str = "text"
    hub_config: str | None = None
    tokenizer: str | None = None   # path or hub name; None: train WordPiece on the corpus
    vocab_size: int = 8192
    streaming: bool = False
    cache_dir: str | None = None   # default: OUTPUT_DIR/cache
    max_document_chars: int = 100_000


@dataclass
class PhaseSpec:
    name: str = "mlm"
    objective: str = "mlm"         # mlm | mlm+nsp
    steps: int = 100               # optimizer steps in this phase
    seq_len: int = 128
    global_batch: int = 32         # sequences per optimizer step over all ranks
    micro_batch: int = 8           # sequences per forward pass per rank
    prune: bool = True             # observe statistics (pruning follows the VP schedule)
    mlm_probability: float = 0.15

    def validate(self, index: int) -> None:
        where = f"phases[{index}] ({self.name})"
        if self.objective not in ("mlm", "mlm+nsp"):
            raise ValueError(f"{where}: objective={self.objective!r} must be 'mlm' or 'mlm+nsp'")
        for key in ("steps", "seq_len", "global_batch", "micro_batch"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{where}: {key}={getattr(self, key)} must be >= 1")
        if self.global_batch % self.micro_batch:
            raise ValueError(f"{where}: global_batch={self.global_batch} must be a multiple of "
                             f"micro_batch={self.micro_batch}")


@dataclass
class RunConfig:
    output_dir: str = "runs/vp"
    deepspeed_config: str = "ds_configs/zero2_cpu.json"
    seed: int = 1234
    lr: float = 5e-4
    warmup_steps: int = 10
    weight_decay: float = 0.01
    log_every: int = 10
    checkpoint_every: int = 50     # optimizer steps; 0: only at the end
    stop_after: int = 0            # checkpoint and exit after this global step (0: run to the end)
    dist_timeout_minutes: int = 30  # a collective waiting longer for a dead or hung rank raises (>= 1)
    squeeze_at_target: bool = True
    render_report: bool = True
    model: ModelSpec = field(default_factory=ModelSpec)
    data: DataSpec = field(default_factory=DataSpec)
    phases: list = field(default_factory=lambda: [PhaseSpec()])
    vp: dict = field(default_factory=dict)

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)

    def vp_config(self) -> VPConfig:
        # The loop squeezes itself (run.squeeze_at_target), measuring memory on both sides.
        if "squeeze_at_target" in self.vp:
            raise ValueError("vp.squeeze_at_target: set the run's squeeze_at_target instead")
        return VPConfig.from_dict(self.vp)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def _build(cls, values: dict, where: str):
    if not isinstance(values, dict):
        raise ValueError(f"{where}: expected a mapping, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; known: {sorted(names)}")
    return cls(**values)


def run_config_from_dict(values: dict) -> RunConfig:
    values = dict(values)
    model = _build(ModelSpec, values.pop("model", {}), "model")
    data = _build(DataSpec, values.pop("data", {}), "data")
    raw_phases = values.pop("phases", [{}])
    if not isinstance(raw_phases, list):
        raise ValueError("phases: expected a list of phase mappings (override items as phases.NAME.key=value)")
    phases = [_build(PhaseSpec, p, f"phases[{i}]") for i, p in enumerate(raw_phases)]
    config = _build(RunConfig, values, "run config")
    config.model, config.data, config.phases = model, data, phases
    if not phases:
        raise ValueError("phases: at least one phase is needed")
    for index, phase in enumerate(phases):
        phase.validate(index)
    config.vp_config()  # validates the VP fields now, not at the first pruning
    return config


def apply_override(values: dict, assignment: str) -> None:
    """`a.b.c=value` (value parsed as YAML); list items by index or by phase name: `phases.mlm.steps=5`."""
    if "=" not in assignment:
        raise ValueError(f"override {assignment!r} must look like section.key=value")
    path, raw = assignment.split("=", 1)
    keys = path.split(".")
    node = values
    for depth, key in enumerate(keys[:-1]):
        if isinstance(node, list):
            node = _list_item(node, key, ".".join(keys[:depth + 1]))
        else:
            node = node.setdefault(key, {})
    last = keys[-1]
    value = yaml.safe_load(raw)
    if isinstance(node, list):
        raise ValueError(f"override {assignment!r}: name a key inside the list item")
    node[last] = value


def _list_item(items: list, key: str, where: str):
    if key.isdigit() and int(key) < len(items):
        return items[int(key)]
    for item in items:
        if isinstance(item, dict) and item.get("name") == key:
            return item
    raise ValueError(f"override path {where!r}: no list item {key!r}")


def load_run_config(path: str | None, overrides: list[str] = ()) -> RunConfig:
    values: dict = {}
    if path:
        text = Path(path).read_text()
        values = json.loads(text) if path.endswith(".json") else (yaml.safe_load(text) or {})
    for assignment in overrides:
        apply_override(values, assignment)
    return run_config_from_dict(values)
