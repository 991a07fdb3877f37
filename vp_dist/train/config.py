"""Run configuration: one YAML/JSON file plus `--section.key value` command-line overrides.

The dataclasses below are the schema: `vp_dist.cli` turns them into flags and `--help` (type from
the annotation, meaning from the `# comment`), and validates a file + overrides with pydantic.

    model:    which BERT shape (a preset name, an HF config file/dir, or a hub name) + overrides
    data:     corpus, tokenizer, cache
    phases:   list of training phases (paper: MLM at seq 128 with pruning, then NSP at seq 512)
    vp:       VPConfig fields
    deepspeed_config, output_dir, seed, logging and checkpoint cadence
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from .. import cli
from ..config import VPConfig


@dataclass
class ModelSpec:
    config: str = "tiny"           # tiny | mini | bert-base | bert-large | path to config.json/dir | hub name
    overrides: dict = field(default_factory=dict)  # HF config fields, e.g. {num_hidden_layers: 4}
    fused_layernorm: str = "auto"  # apex FusedLayerNorm: auto (if importable, on GPU) | on | off
    gradient_checkpointing: bool = False  # activation checkpointing of every encoder layer (non-reentrant)
    masked_positions_only: bool = True    # MLM head (transform + decoder) and loss at labelled positions only


@dataclass
class DataSpec:
    corpus: str = "default"        # "default" = the shipped English corpus; files, dirs, or a hub name
    text_field: str = "text"       # field holding the text in .jsonl/.json/.parquet/hub datasets
    hub_config: str | None = None  # hub dataset configuration, e.g. 20220301.en for wikipedia
    tokenizer: str | None = None   # path or hub name; None: train WordPiece on the corpus
    vocab_size: int = 8192         # vocabulary of the WordPiece tokenizer trained when tokenizer is None
    streaming: bool = False        # stream the corpus (larger than memory) instead of loading it
    cache_dir: str | None = None   # default: OUTPUT_DIR/cache
    max_document_chars: int = 100_000  # longer documents are counted, logged and skipped
    prepared: str | None = None    # folder written by launch/preprocess.py (DIR/<objective>-<seq_len> per phase); replaces corpus/streaming
    num_workers: int = 2           # DataLoader processes per rank reading prepared data (0: in the training process); streaming uses at most 1
    num_proc: int | None = None    # processes for rank 0's tokenisation in the in-memory path (Dataset.map num_proc)


@dataclass
class PhaseSpec:
    name: str = "mlm"              # phase name, used in logs and in overrides (--phases.mlm.steps)
    objective: str = "mlm"         # mlm | mlm+nsp
    steps: int = 100               # optimizer steps in this phase
    seq_len: int = 128            # tokens per sequence
    global_batch: int = 32         # sequences per optimizer step over all ranks
    micro_batch: int = 8           # sequences per forward pass per rank
    prune: bool = True             # observe statistics (pruning follows the VP schedule)
    mlm_probability: float = 0.15  # fraction of tokens masked for MLM

    def validate(self, index: int) -> None:
        where = f"phases[{index}] ({self.name})"
        if self.objective not in ("mlm", "mlm+nsp"):
            raise ValueError(f"{where}: objective={self.objective!r} must be 'mlm' or 'mlm+nsp'")
        for key in ("steps", "seq_len", "global_batch", "micro_batch"):
            if int(getattr(self, key)) < 1:
                raise ValueError(f"{where}: {key}={getattr(self, key)} must be >= 1")
        if not 0 < self.mlm_probability < 1:
            raise ValueError(f"{where}: mlm_probability={self.mlm_probability} must be in (0, 1)")
        if self.global_batch % self.micro_batch:
            raise ValueError(f"{where}: global_batch={self.global_batch} must be a multiple of "
                             f"micro_batch={self.micro_batch}")


@dataclass
class RunConfig:
    output_dir: str = "runs/vp"    # where checkpoints, logs, exports and the report go
    deepspeed_config: str = "ds_configs/zero2_cpu.json"  # DeepSpeed config JSON; batch sizes, lr, steps are set from this run config
    seed: int = 1234               # torch seed on every rank
    lr: float = 5e-4               # peak learning rate (DeepSpeed optimizer and warm-up scheduler)
    warmup_steps: int = 10         # linear warm-up, optimizer steps
    weight_decay: float = 0.01     # AdamW weight decay
    log_every: int = 10            # optimizer steps between log lines (every pruning is logged too)
    checkpoint_every: int = 50     # optimizer steps; 0: only at the end
    stop_after: int = 0            # checkpoint and exit after this global step (0: run to the end)
    dist_timeout_minutes: int = 30  # a collective waiting longer for a dead or hung rank raises (>= 1)
    squeeze_at_target: bool = True  # squeeze and re-partition the engine right after the final pruning
    tensor_parallel: int = 1       # DeepSpeed AutoTP degree: world = tensor_parallel x data-parallel ranks
    render_report: bool = True     # write report.md and the figures at the end
    grad_accum_dtype: str = "auto"  # DeepSpeed data_types.grad_accum_dtype: auto = fp32 under bf16 (ZeRO 1-3), else the model's
    verify_pruned_rows: bool = True  # at each pruning, report max |value| of pruned rows in every ZeRO state
    peak_tflops: float = 0.0       # one GPU's peak TFLOP/s for the MFU in the logs; 0: known GPUs looked up
    model: ModelSpec = field(default_factory=ModelSpec)  # which BERT
    data: DataSpec = field(default_factory=DataSpec)     # corpus and tokenizer
    phases: list[PhaseSpec] = field(default_factory=lambda: [PhaseSpec()])  # training phases, in order
    vp: VPConfig = field(default_factory=VPConfig)       # Variance Pruning schedule and statistics

    @property
    def total_steps(self) -> int:
        return sum(p.steps for p in self.phases)

    def vp_config(self) -> VPConfig:
        return self.vp

    def to_dict(self) -> dict:
        """Plain values, readable back as a run config (`--config run_config.json`)."""
        out = cli.to_plain(self)
        for path in HIDDEN_FIELDS:
            section, name = path.split(".")
            out[section].pop(name)
        return out


# Not settable in a run config: the loop squeezes itself (the run's squeeze_at_target, measuring
# memory on both sides), and extra adapter families are Python objects (library API only).
HIDDEN_FIELDS = frozenset({"vp.squeeze_at_target", "vp.families"})


def run_config_from_dict(values: dict) -> RunConfig:
    """A validated RunConfig from a nested mapping (file + overrides); ConfigError names the field."""
    vp = values.get("vp") or {}
    for path in HIDDEN_FIELDS:
        if isinstance(vp, dict) and path.split(".")[1] in vp:
            raise cli.ConfigError(f"{path}: not a run-config field"
                                  + ("; set the run's squeeze_at_target instead" if "squeeze" in path else ""))
    if values.get("phases") == []:
        raise cli.ConfigError("phases: at least one phase is needed")
    config = cli.validate(RunConfig, values)
    _check_ranges(config)
    for index, phase in enumerate(config.phases):
        try:
            phase.validate(index)
        except ValueError as error:
            raise cli.ConfigError(str(error)) from None
    return config


def _check_ranges(config: RunConfig) -> None:
    """Values the run would only refuse after it started (DeepSpeed, torch, the data pipeline),
    refused here, before any process group or data work, naming the field."""
    def need(ok: bool, message: str) -> None:
        if not ok:
            raise cli.ConfigError(message)
    need(config.tensor_parallel >= 1, f"tensor_parallel={config.tensor_parallel} must be >= 1")
    need(config.lr > 0, f"lr={config.lr} must be > 0")
    need(config.warmup_steps >= 1, f"warmup_steps={config.warmup_steps} must be >= 1 (DeepSpeed's warm-up "
         "schedulers need a positive count; they warm up at least 2 steps)")
    need(config.weight_decay >= 0, f"weight_decay={config.weight_decay} must be >= 0")
    need(config.log_every >= 1, f"log_every={config.log_every} must be >= 1")
    need(config.checkpoint_every >= 0, f"checkpoint_every={config.checkpoint_every} must be >= 0 (0: only at the end)")
    need(config.stop_after >= 0, f"stop_after={config.stop_after} must be >= 0 (0: run to the end)")
    need(config.dist_timeout_minutes >= 1, f"dist_timeout_minutes={config.dist_timeout_minutes} must be >= 1")
    need(config.grad_accum_dtype in ("auto", "fp32", "bf16", "fp16"),
         f"grad_accum_dtype={config.grad_accum_dtype!r} must be auto, fp32, bf16 or fp16")
    need(config.peak_tflops >= 0, f"peak_tflops={config.peak_tflops} must be >= 0 (0: looked up)")
    from ..data.tokenizer import SPECIAL_TOKENS

    def missing(value: str | None, path_like: bool = False) -> bool:
        """A local path (one that starts with . / ~, or `path_like`) that does not exist; else a hub
        name, a preset or unset."""
        local = bool(value) and (path_like or value.startswith((".", "/", "~")))
        return local and not os.path.exists(os.path.expanduser(value))

    model, data = config.model, config.data
    need(model.fused_layernorm in ("auto", "on", "off"),
         f"model.fused_layernorm={model.fused_layernorm!r} must be auto, on or off")
    need(not missing(model.config, model.config.endswith(".json")),
         f"model.config={model.config!r} does not exist (a preset: tiny, mini, bert-base, bert-large; a "
         "config.json file or folder; or a hub name)")
    need(data.tokenizer is not None or data.prepared is not None or data.vocab_size > len(SPECIAL_TOKENS),
         f"data.vocab_size={data.vocab_size} must be larger than the {len(SPECIAL_TOKENS)} special tokens")
    need(data.num_workers >= 0, f"data.num_workers={data.num_workers} must be >= 0 (0: in the training process)")
    need(data.num_proc is None or data.num_proc >= 1, f"data.num_proc={data.num_proc} must be >= 1")
    need(data.max_document_chars >= 1, f"data.max_document_chars={data.max_document_chars} must be >= 1")
    for name in ("tokenizer", "prepared"):
        need(not missing(getattr(data, name)), f"data.{name}={getattr(data, name)!r} does not exist")
    need(data.prepared is not None or not missing(data.corpus), f"data.corpus={data.corpus!r} does not exist")
    _check_model_overrides(model)


def _check_model_overrides(model: ModelSpec) -> None:
    """Override keys BertConfig has, and (a preset's shape) heads that divide the hidden size: refused
    before the tokenizer is trained on the corpus, which can take long."""
    from transformers import BertConfig

    from .model import PRESETS
    defaults = BertConfig(**PRESETS.get(model.config, {}))
    for key in model.overrides:
        if not hasattr(defaults, key):
            raise cli.ConfigError(f"model.overrides: BertConfig has no field {key!r}")
    if model.config in PRESETS:
        shape = {**PRESETS[model.config], **model.overrides}
        hidden, heads = shape["hidden_size"], shape["num_attention_heads"]
        if not (isinstance(hidden, int) and isinstance(heads, int) and heads >= 1 and hidden % heads == 0):
            raise cli.ConfigError(f"model.overrides: hidden_size={hidden} must be a multiple of "
                                  f"num_attention_heads={heads}")


# Settings a resumed run may change without a word: where and how often it logs, checkpoints and stops.
OPERATIONAL_FIELDS = frozenset({"stop_after", "log_every", "checkpoint_every", "render_report",
                                "dist_timeout_minutes", "peak_tflops", "verify_pruned_rows", "data.num_workers"})


def changed_settings(before: dict, after: dict, prefix: str = "") -> list[str]:
    """`key: old -> new` for each setting (dotted, list items by index) that differs between two
    `RunConfig.to_dict()`s, leaving out `OPERATIONAL_FIELDS`."""
    changes = []
    for key in sorted(set(before) | set(after)):
        path, old, new = f"{prefix}{key}", before.get(key), after.get(key)
        if path in OPERATIONAL_FIELDS:
            continue
        if isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
            old, new = dict(enumerate(old)), dict(enumerate(new))
        if isinstance(old, dict) and isinstance(new, dict):
            changes += changed_settings({str(k): v for k, v in old.items()}, {str(k): v for k, v in new.items()},
                                        path + ".")
        elif old != new:
            changes.append(f"{path}: {old!r} -> {new!r}")
    return changes


def apply_override(values: dict, assignment: str) -> None:
    """`a.b.c=value`, typed by the schema; list items by index or by phase name: `phases.mlm.steps=5`."""
    if "=" not in assignment:
        raise cli.ConfigError(f"override {assignment!r} must look like section.key=value")
    path, text = assignment.split("=", 1)
    cli.set_path(values, path, text, RunConfig)


def load_run_config(path: str | None, overrides: list[str] = ()) -> RunConfig:
    values = cli.read_config_file(path) if path else {}
    for assignment in overrides:
        apply_override(values, assignment)
    return run_config_from_dict(values)


def world_size_from_launcher(environ=os.environ) -> int:
    """Ranks this job will have, read from the launcher's environment before any process group."""
    for name in ("WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "MV2_COMM_WORLD_SIZE"):
        if environ.get(name, "").isdigit():
            return int(environ[name])
    return 1


def read_deepspeed_config(cfg: RunConfig, world_size: int) -> dict:
    """The DeepSpeed config file, checked against the run: exists, a JSON object, batch sizes that divide.

    The run's phases set DeepSpeed's batch sizes (`global_batch = micro_batch x accumulation x
    data-parallel ranks`, `world_size / tensor_parallel` of them: the ranks of one TP group read the
    same batch), so every phase must divide evenly over them. Called by the launcher before any
    process group starts, and by the loop.
    """
    where = f"deepspeed_config={cfg.deepspeed_config!r}"
    ds = cli.read_deepspeed_json(cfg.deepspeed_config)
    stage = (ds.get("zero_optimization") or {}).get("stage", 0)
    tp = cfg.tensor_parallel
    autotp = (ds.get("tensor_parallel") or {}).get("autotp_size")
    if autotp not in (None, tp) and not (autotp in (0, 1) and tp == 1):
        raise cli.ConfigError(f"{where}: tensor_parallel.autotp_size={autotp} differs from the run's "
                              f"tensor_parallel={tp}; set it in the run config only")
    if tp > 1 and stage == 3:
        raise cli.ConfigError(f"{where}: zero_optimization.stage=3 with tensor_parallel={tp} is not supported; "
                              "use stage 0, 1 or 2 within each TP rank")
    if world_size % tp:
        raise cli.ConfigError(f"tensor_parallel={tp} does not divide world_size={world_size}; "
                              "launch a multiple of tensor_parallel ranks")
    data_parallel = world_size // tp
    for index, phase in enumerate(cfg.phases):
        if phase.global_batch % (phase.micro_batch * data_parallel):
            ranks = f"world_size={world_size}" if tp == 1 else \
                f"data-parallel ranks={data_parallel} (world_size={world_size} / tensor_parallel={tp})"
            raise cli.ConfigError(
                f"phases[{index}] ({phase.name}): global_batch={phase.global_batch} is not a multiple of "
                f"micro_batch={phase.micro_batch} x {ranks}; change global_batch or micro_batch")
    return ds
