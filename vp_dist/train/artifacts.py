"""What a run leaves behind (SPEC 6): history, memory per rank, vp_report.json, masks, TensorBoard."""
from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from ..adapters import PROJECTION_TYPES
from ..distributed.devices import collective_device
from ..squeeze import count_parameters
from .flops import peak_tflops

logger = logging.getLogger(__name__)
REPORT_VERSION = 1


def progress_bar(rank: int, total: int, initial: int):
    """tqdm on rank 0 when stderr is a terminal; cluster logs get the plain log lines instead."""
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, disable=rank != 0 or not sys.stderr.isatty(),
                desc="pre-training", unit="step", dynamic_ncols=True)


def peak_memory_bytes() -> int:
    """This process's peak memory, as the rebuild measures it (`vp_dist.distributed.memory`):
    CUDA `max_memory_allocated` on a GPU, else the peak resident set size."""
    from ..distributed.memory import peak_bytes
    return peak_bytes(torch.cuda.current_device() if torch.cuda.is_available() else "cpu")


def telemetry_line(entry: dict) -> str:
    """The log line of one logged step (README "Telemetry")."""
    mfu = f"{100 * entry['mfu']:.1f}%" if entry.get("mfu") is not None else "n/a"
    return (f"step {entry['step']} ({entry['phase']}) | loss {entry['loss']:.4f} | lr {entry['lr']:.3e} | "
            f"{entry['tokens_per_s']:,.0f} tokens/s | {entry['tflops_per_gpu']:.2f} TFLOP/s/GPU | MFU {mfu} | "
            f"peak mem {entry['peak_memory_bytes'] / 2**30:.2f} GiB | sparsity {entry['sparsity']:.3f}")


class RunRecord:
    """Accumulates the report of one run; every rank keeps one, rank 0 writes it."""

    def __init__(self):
        self.meta: dict = {}
        self.history: list[dict] = []
        self.memory: dict[str, list] = {}
        self.parameters: dict = {}
        self.squeezed = False
        self.pruned_rows: list[dict] = []  # per pruning: max |value| of pruned rows per ZeRO state
        self.seconds = 0.0
        self.tokens = 0
        self.peak_tflops: float | None = None  # one device's peak, for the MFU
        self._window = {"tokens": 0, "flops": 0, "seconds": 0.0}  # since the last logged step
        self._writer = None

    @classmethod
    def start(cls, cfg, model, world_size: int, ds_config: dict) -> "RunRecord":
        record = cls()
        config = model.config
        dtype = "bf16" if ds_config.get("bf16", {}).get("enabled") else (
            "fp16" if ds_config.get("fp16", {}).get("enabled") else "fp32")
        record.meta = {
            "model": {"model_type": config.model_type, "num_layers": config.num_hidden_layers,
                      "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
                      "num_attention_heads": config.num_attention_heads, "vocab_size": config.vocab_size},
            "world_size": world_size,
            "zero_stage": ds_config.get("zero_optimization", {}).get("stage", 0),
            "dtype": dtype,
            "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
            "run_config": cfg.to_dict(),
        }
        record.peak_tflops = peak_tflops(torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                                         dtype, cfg.peak_tflops)
        record.meta["peak_tflops"] = record.peak_tflops
        record.parameters = {"before": count_parameters(model), "after": None}
        if dist.get_rank() == 0:
            try:
                from torch.utils.tensorboard import SummaryWriter
                record._writer = SummaryWriter(str(Path(cfg.output_dir) / "tensorboard"))
            except ImportError:  # tensorboard is a dependency, but the run must not die for logs
                logger.warning("tensorboard is not installed: no TensorBoard logs")
        return record

    # --------------------------------------------------------------- recording
    def record_memory(self, key: str, engine, only_if_missing: bool = False) -> None:
        if only_if_missing and self.memory.get(key):
            return
        from ..distributed.zero import partition_bytes
        held = partition_bytes(engine)
        mine = {"rank": dist.get_rank(), "parameter_bytes": held["params"], "gradient_bytes": held["gradients"],
                "optimizer_bytes": held["optimizer_states"], "total_bytes": held["total"]}
        mine["max_memory_allocated"] = (torch.cuda.max_memory_allocated() if torch.cuda.is_available() else None)
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, mine)
        self.memory[key] = gathered

    def record_rebuild(self, figures: dict) -> None:
        """Every rank's `RebuildMemory` figures (vp_dist.distributed.memory) as `memory["rebuild"]`."""
        gathered = [None] * dist.get_world_size()
        dist.all_gather_object(gathered, {"rank": dist.get_rank(), **figures})
        self.memory["rebuild"] = gathered
        worst = max(gathered, key=lambda f: f["rebuild_peak"] - f["steady_peak_before"])
        logger.info("rebuild: %.1f s, peak %.1f MiB against %.1f MiB in training before, %.1f MiB after "
                    "(rank %d, %s)", worst["rebuild_seconds"], worst["rebuild_peak"] / 2**20,
                    worst["steady_peak_before"] / 2**20, worst["steady_peak_after"] / 2**20, worst["rank"],
                    worst["kind"])

    def record_pruned_rows(self, step: int, largest: dict[str, float]) -> None:
        self.pruned_rows.append({"step": step, **largest})
        if any(value != 0.0 for value in largest.values()):
            logger.warning("step %d: pruned rows are not all zero: %s", step, largest)

    def record_squeeze(self, pruner, scale_before: float | None = None, scale_after: float | None = None) -> None:
        """The squeeze happened: the parameter count after it, and with fp16 the loss scale on
        both sides of the engine rebuild (`memory["loss_scale"]`, which must be the same)."""
        self.squeezed = True
        if scale_before is not None or scale_after is not None:
            self.memory["loss_scale"] = {"before": scale_before, "after": scale_after}
        if pruner.tensor_parallel_squeezed:  # the whole model's count, not this TP rank's share
            from ..distributed.tp_squeeze import tensor_parallel_parameter_count
            self.parameters["after"] = tensor_parallel_parameter_count(pruner.engine.module)
        else:
            self.parameters["after"] = count_parameters(pruner.engine.module)

    def record_step(self, step: int, phase: str, loss: torch.Tensor, tokens, flops: int, seconds: float,
                    engine, pruner, event, log: bool) -> None:
        """One optimizer step. tokens: this rank's valid tokens (int or a device tensor, read at log
        steps only); flops: this rank's training FLOPs (`ModelFlops.training`); seconds: its wall time.

        At a log step (every `log_every` steps and at every pruning) the window since the last one
        is gathered over the ranks in one collective: tokens/s (all ranks), TFLOP/s per GPU (mean
        over ranks), MFU against `peak_tflops`, peak memory (max over ranks); one log line, the
        same values in TensorBoard and in the report's history.
        """
        self.seconds += seconds
        window = self._window
        window["tokens"] = window["tokens"] + tokens
        window["flops"] += flops
        window["seconds"] += seconds
        if not log:
            return
        self._window = {"tokens": 0, "flops": 0, "seconds": 0.0}
        per_rank = self._gather_window(window["tokens"], window["flops"])  # [world, 3] float64, CPU
        window_tokens = int(per_rank[:, 0].sum())
        self.tokens += window_tokens
        elapsed = window["seconds"]
        tflops = float(per_rank[:, 1].mean()) / elapsed / 1e12 if elapsed else 0.0
        sparsity = pruner.sparsity()
        entry = {"step": step, "phase": phase, "loss": float(loss), "lr": float(engine.get_lr()[0]),
                 "tokens_per_s": window_tokens / elapsed if elapsed else 0.0,
                 "tflops_per_gpu": tflops,
                 "mfu": tflops / self.peak_tflops if self.peak_tflops else None,
                 "peak_memory_bytes": int(per_rank[:, 2].max()),
                 "sparsity": sum(sparsity.values()) / len(sparsity)}
        self.history.append(entry)
        logger.info("%s", telemetry_line(entry))
        if self._writer is not None:
            for key in ("loss", "lr", "tokens_per_s", "tflops_per_gpu", "mfu", "peak_memory_bytes", "sparsity"):
                if entry[key] is not None:
                    self._writer.add_scalar(f"train/{key}", entry[key], step)
            for projection_type, value in sparsity.items():
                self._writer.add_scalar(f"sparsity/{projection_type}", value, step)
            self._writer.flush()
        if event is not None:
            logger.info("step %d: pruned to %.2f (%s)", step, event.target_sparsity,
                        ", ".join(f"{t} {s:.3f}" for t, s in event.sparsity.items()))

    @staticmethod
    def _gather_window(tokens, flops: int) -> torch.Tensor:
        """[world, 3]: every rank's (tokens, FLOPs, peak memory bytes) of the window, in one
        all-gather on the device the backend communicates on (NCCL: the GPU)."""
        device = collective_device()
        mine = torch.cat([torch.as_tensor(tokens).reshape(1).to(device=device, dtype=torch.float64),
                          torch.tensor([float(flops), float(peak_memory_bytes())], dtype=torch.float64,
                                       device=device)])
        gathered = [torch.empty_like(mine) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, mine)
        return torch.stack(gathered).cpu()

    # --------------------------------------------------------------- state
    def state_dict(self) -> dict:
        return {"history": self.history, "memory": self.memory, "parameters": self.parameters,
                "squeezed": self.squeezed, "seconds": self.seconds, "tokens": self.tokens,
                "pruned_rows": self.pruned_rows}

    def restore(self, state: dict) -> None:
        for key, value in state.items():
            setattr(self, key, value)

    def report(self, pruner) -> dict:
        return {
            "version": REPORT_VERSION,
            **self.meta,
            "schedule": {"start": pruner.schedule.start, "interval": pruner.schedule.interval,
                         "increment": pruner.schedule.increment, "target": pruner.schedule.target,
                         "pruning_steps": [list(p) for p in pruner.schedule.pruning_steps()]},
            "projection_types": [t for t in PROJECTION_TYPES if t in pruner.type_rows],
            "layers": [{"name": layer.name, "block": layer.block, "type": layer.projection_type,
                        "rows": size} for layer, size in zip(pruner.layers, pruner.layout.sizes)],
            "prune_events": [event.to_json() for event in pruner.events],
            "history": self.history,
            "memory": self.memory,
            "throughput": {"tokens_per_s": (self.tokens / self.seconds) if self.seconds else 0.0,
                           "tokens": self.tokens, "seconds": self.seconds},
            "squeezed": self.squeezed,
            "pruned_rows": self.pruned_rows,
            "parameters": self.parameters,
        }


def save_prune_event(pruner, event, directory: Path) -> Path:
    """`DIR/prune_events/step<N>.safetensors`: per layer the kept mask after this pruning and the
    window mean and EWMV it was chosen from (SPEC 6: masks and statistics at every pruning step)."""
    from safetensors.torch import save_file
    directory = Path(directory) / "prune_events"
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for layer, kept, mean, ewmv in zip(pruner.layers, pruner.layout.split(pruner.kept.cpu()),
                                       pruner.layout.split(event.window_mean), pruner.layout.split(event.ewmv)):
        tensors[f"{layer.name}.kept"] = kept.contiguous()
        tensors[f"{layer.name}.window_mean"] = mean.contiguous()
        tensors[f"{layer.name}.ewmv"] = ewmv.contiguous()
    path = directory / f"step{event.step}.safetensors"
    save_file(tensors, str(path), metadata={"step": str(event.step), "target_sparsity": str(event.target_sparsity)})
    return path


def gather_rng_states() -> list[dict]:
    """Every rank's RNG states (dropout, masking), gathered so rank 0's checkpoint holds them all."""
    import random

    import numpy as np
    mine = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    gathered = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, mine)
    return gathered


def restore_rng_states(states: list[dict] | None) -> bool:
    """Put back this rank's RNG states; only meaningful on the same number of ranks."""
    import random

    import numpy as np
    if not states or len(states) != dist.get_world_size():
        return False
    mine = states[dist.get_rank()]
    torch.set_rng_state(mine["torch"])
    np.random.set_state(mine["numpy"])
    random.setstate(mine["python"])
    if mine["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(mine["cuda"])
    return True


def write_run_outputs(run: RunRecord, pruner, directory: Path, render: bool) -> dict:
    """vp_report.json, masks.safetensors and (optionally) the rendered report, in `directory`."""
    from safetensors.torch import save_file
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    report = run.report(pruner)
    tmp = directory / "vp_report.json.tmp"
    tmp.write_text(json.dumps(report, indent=1))
    tmp.replace(directory / "vp_report.json")  # never a half-written report
    save_file({name: kept.contiguous() for name, kept in pruner.masks().items()},
              str(directory / "masks.safetensors"))
    if render:
        from ..report import render_report
        render_report(report, directory)
    return report
