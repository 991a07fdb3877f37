#!/usr/bin/env python
"""The one-GPU proof behind `launch/gpu_check.sh` (see there and the README's "GPU" section).

    python launch/gpu_check.py OUT            # one CUDA GPU, <= 8 minutes on an H100
    python launch/gpu_check.py OUT --smoke    # CPU, tiny shapes: checks the script itself

Runs each step in a child process with its own timeout, inside an overall budget; a step that
fails, times out or is skipped is recorded in OUT/gpu_check.json with its error and log file, and
the next step runs. Writes OUT/gpu_check.json (every figure) and OUT/gpu_check.md (a table).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BUDGET_S = 480          # the whole check on an H100
# The suite's GPU tests: NCCL collectives, the masked head under autocast, the Triton statistics
# kernel against torch, the no-host-sync check, apex's FusedLayerNorm swap (skipped on a CPU).
GPU_TEST_FILES = ("tests/test_gpu.py", "tests/test_stats_gpu.py", "tests/test_fused.py")
PRETRAIN_KEYS = ("pruned_rows_zero", "pruned_rows_max_abs", "pgo_bytes_before", "pgo_bytes_after",
                 "steady_peak_before_bytes", "steady_peak_after_bytes", "final_loss", "tokens_per_s",
                 "tflops_per_gpu", "mfu")
SQUEEZE_KEYS = ("dense_it_per_s", "squeezed_it_per_s", "train_speedup", "train_flop_ratio", "eval_speedup",
                "eval_encoder_speedup", "dense_peak_bytes", "squeezed_peak_bytes", "ops_per_forward_backward")


@dataclass(frozen=True)
class Step:
    """One step of the check: how it runs, how long it may take, what it must report.

    kind: "pretrain" (`launch/pretrain.py` under the DeepSpeed launcher, ZeRO `setting` = (stage,
    dtype)), "bench" (a launch script writing one JSON, read by `parse`) or "tests" (the GPU tests).
    A bench step runs `script` with the BERT-large shape (the tiny one in smoke mode; `sizes` =
    (smoke, GPU) arguments replace it), `batch_scale` times the batch, then `args`, and on the GPU
    also `gpu_args`. `smoke_skip`: why the CPU smoke run leaves it out (it runs a script another
    step already checks). `timeout_s` is the GPU's (x4 in smoke mode)."""

    name: str
    kind: str
    timeout_s: float
    figures: tuple[str, ...]
    parse: Callable[[dict], dict] | None = None
    script: str | None = None
    args: tuple[str, ...] = ()
    gpu_args: tuple[str, ...] = ()
    sizes: tuple[tuple[str, ...], tuple[str, ...]] | None = None
    batch_scale: int = 1
    setting: tuple[int, str] | None = None
    smoke_skip: str | None = None


def squeeze_step(name: str, timeout_s: float, *args: str, smoke_skip: str | None, figures=SQUEEZE_KEYS,
                 parse=None, **fields) -> Step:
    """A `launch/bench_squeeze.py` step: dense against squeezed BERT-large, `args` added to the shape."""
    return Step(name, "bench", timeout_s, figures, parse or squeeze_figures, "bench_squeeze.py", args,
                smoke_skip=smoke_skip, **fields)


FP16_REFUSED = ("DeepSpeed's CPU accelerator refuses fp16 on this CPU (oneDNN has no fp16 kernels here: "
                "no AVX512-FP16/AMX-FP16)")


def cpu_accepts_fp16(env: dict) -> bool:
    """Whether DeepSpeed's CPU accelerator builds fp16 engines here (asked in a child process with
    the smoke run's environment, so this process keeps no DeepSpeed state)."""
    probe = ("from deepspeed.accelerator import get_accelerator; "
             "raise SystemExit(0 if get_accelerator().is_fp16_supported() else 3)")
    done = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
    return done.returncode == 0


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def ds_config(out: Path, stage: int, dtype: str, smoke: bool) -> Path:
    """A DeepSpeed config for the step: the repository's ZeRO-`stage` one, in `dtype`. ZeRO-3
    partitions every parameter (no persistence threshold), so the check sees real partitions."""
    base = json.loads((ROOT / "ds_configs" / f"zero{stage}_{'cpu' if smoke else 'bf16'}.json").read_text())
    base.pop("bf16", None), base.pop("fp16", None)
    if dtype == "bf16":
        base["bf16"] = {"enabled": True}
    elif dtype == "fp16":  # DeepSpeed's dynamic loss scaler
        base["fp16"] = {"enabled": True, "loss_scale": 0, "initial_scale_power": 16, "loss_scale_window": 1000,
                        "hysteresis": 2, "min_loss_scale": 1}
    if stage == 3:
        base["zero_optimization"].update(stage3_param_persistence_threshold=0)
    if os.environ.get("VP_GPU_CHECK_TORCH_ADAM"):  # no FusedAdam JIT build
        base["optimizer"]["params"]["torch_adam"] = True
    path = out / "ds" / f"zero{stage}_{dtype}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(base, indent=1))
    return path


def pretrain_command(out: Path, name: str, stage: int, dtype: str, smoke: bool) -> list[str]:
    script = [str(ROOT / "launch/pretrain.py"), "--config", str(ROOT / "launch/configs/memory_bert_base.yaml"),
              "--deepspeed_config", str(ds_config(out, stage, dtype, smoke)), "--output_dir", str(out / "runs" / name),
              "--data.cache_dir", str(out / "cache"), "--log_every", "1", "--checkpoint_every", "0",
              "--render_report", "false", "--warmup_steps", "2", "--lr", "1.0e-4",
              "--vp", "{start: 2, interval: 2, increment: 0.25, target: 0.5}"]  # prunes at 2, 4; squeezes at 4
    tokenizer = out / "runs" / "pretrain_bf16_zero2" / "tokenizer"
    if name != "pretrain_bf16_zero2" and tokenizer.is_dir():
        script += ["--data.tokenizer", str(tokenizer)]  # trained once, by the first run
    if smoke:
        script += ["--model.config", "tiny", "--model.overrides", "{hidden_size: 64, num_attention_heads: 2, intermediate_size: 128}",
                   "--data.vocab_size", "1024",
                   "--phases", "[{name: mlm, objective: mlm, steps: 7, seq_len: 64, global_batch: 4, micro_batch: 4}]"]
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", *script]
    script += ["--model.config", "bert-base",
               "--phases", "[{name: mlm, objective: mlm, steps: 12, seq_len: 128, global_batch: 32, micro_batch: 32}]"]
    return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "1", "--master_port", str(free_port()),
            *script]


def pretrain_figures(run_dir: Path) -> dict:
    """The step's figures, read from the run's vp_report.json."""
    report = json.loads((run_dir / "vp_report.json").read_text())
    squeeze_step = report["prune_events"][-1]["step"]
    history = report["history"]
    before = [h for h in history if h["step"] < squeeze_step]
    after = [h for h in history if h["step"] > squeeze_step]
    memory = report["memory"]
    checks = report.get("pruned_rows") or []
    largest = max((v for entry in checks for k, v in entry.items() if k != "step"), default=None)
    figures = {
        "zero_stage": report["zero_stage"], "dtype": report["dtype"], "device": report.get("device"),
        "squeezed": report["squeezed"], "squeeze_step": squeeze_step,
        "pruned_rows_checked_at": [entry["step"] for entry in checks],
        "pruned_rows_zero": bool(checks) and largest == 0.0, "pruned_rows_max_abs": largest,
        # parameter + gradient + optimizer bytes per rank, read from the engines' partitions
        "pgo_bytes_before": max(r["total_bytes"] for r in memory["before_squeeze"]),
        "pgo_bytes_after": max(r["total_bytes"] for r in memory["after_squeeze"]),
        # peak since the previous reset (GPU: max_memory_allocated): the training steps before the
        # squeeze, and the steps after it (the rebuild's own transient is reset away)
        "steady_peak_before_bytes": before[-1]["peak_memory_bytes"] if before else None,
        "steady_peak_after_bytes": after[-1]["peak_memory_bytes"] if after else None,
        "final_loss": history[-1]["loss"],
        "tokens_per_s": after[-1]["tokens_per_s"] if after else None,
        "tflops_per_gpu": after[-1]["tflops_per_gpu"] if after else None,
        "mfu": after[-1]["mfu"] if after else None,
        "parameters": report["parameters"],
    }
    for key in ("rebuild", "loss_scale"):  # recorded by newer loops: passed through when there
        if key in report or key in memory:
            figures[key] = report.get(key, memory.get(key))
    if report["dtype"] == "fp16":
        scale = report.get("loss_scale") or memory.get("loss_scale")
        figures["loss_scale_kept"] = (scale.get("before") == scale.get("after")) if isinstance(scale, dict) else None
    if not all(math.isfinite(h["loss"]) for h in history):
        raise RuntimeError(f"non-finite loss in {run_dir}/vp_report.json")
    return figures


def squeeze_figures(result: dict) -> dict:
    """launch/bench_squeeze.py's JSON: training step and eval latency (medians, s; eval with the MLM
    head and of the encoder alone), FLOP ratio, the
    models' ops per forward + backward (host work: a small GPU step waits on it), and on CUDA
    `max_memory_allocated` over a training step (no peak figure on CPU)."""
    step, latency, encoder = result["train_step_s"], result["eval_latency_s"], result["eval_encoder_latency_s"]
    peak = result.get("max_memory_allocated_bytes") or {}
    return {"dense_it_per_s": 1 / step["dense"], "squeezed_it_per_s": 1 / step["squeezed"],
            "train_speedup": step["dense"] / step["squeezed"],
            "train_flop_ratio": result["squeezed_over_dense_train_flops"],
            "eval_speedup": latency["dense"] / latency["squeezed"],
            # the encoder alone, as a fine-tuned task model runs it (no MLM vocabulary head)
            "eval_encoder_speedup": encoder["dense"] / encoder["squeezed"],
            "dense_peak_bytes": peak.get("dense"), "squeezed_peak_bytes": peak.get("squeezed"),
            "ops_per_forward_backward": result["ops_per_forward_backward"]}


def compiled_squeeze_figures(result: dict) -> dict:
    return {**squeeze_figures(result), "compile_s": result["compile_s"]}


def gemm_figures(result: dict) -> dict:
    return {"rows": result["rows"]}


def finetune_figures(result: dict) -> dict:
    rows = result["rows"]
    return {"batches": {str(row["batch"]): {name: (row[name] if row[name] == "OOM" or "error" in row[name] else
                                                   {k: row[name][k] for k in ("it_per_s", "peak_bytes", "state_bytes")})
                                            for name in ("dense", "squeezed")} for row in rows},
            "dense_oom_batches": [row["batch"] for row in rows if row["dense"] == "OOM"],
            "squeezed_oom_batches": [row["batch"] for row in rows if row["squeezed"] == "OOM"]}


def gpu_test_figures(junit: Path) -> dict:
    """Counts from pytest's JUnit XML report of the GPU test files."""
    import xml.etree.ElementTree as ElementTree
    root = ElementTree.parse(junit).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    total, failed, skipped = (int(suite.get(key, 0)) for key in ("tests", "failures", "skipped"))
    failed += int(suite.get("errors", 0))
    return {"tests_passed": total - failed - skipped, "tests_failed": failed, "tests_skipped": skipped}


def stats_figures(result: dict) -> dict:
    """launch/bench_stats.py's JSON: observed against unobserved training steps, in % of step time."""
    return {"overhead_percent": result["overhead_pct"]}


# The steps in the order they run: most telling first, so that a short budget keeps what matters (the
# system end to end, the squeezed model's speed, the statistics' cost, then the other precisions and
# the sweeps). `VP_GPU_CHECK_STEPS` picks a subset by name.
PLAN = (
    Step("pretrain_bf16_zero2", "pretrain", 150, PRETRAIN_KEYS, setting=(2, "bf16")),
    # eval latency also as CUDA-graph replays (no launch cost), and where a training step's GPU time goes
    squeeze_step("bench_squeeze", 110, gpu_args=("--cuda-graph", "--profile", "15"), smoke_skip=None),
    # the squeezed FFN's GEMMs at odd widths and rounded up to 8 and 64
    Step("bench_gemm_align", "bench", 40, ("rows",), gemm_figures, "bench_gemm_align.py",
         sizes=(("--tokens", "256", "--hidden", "128", "--widths", "250", "--repeats", "3"),
                ("--tokens", "4096", "--hidden", "1024", "--widths", "2037,1531,1021"))),
    # torch.compile (inductor) on both models, without and with CUDA graphs (the training step is
    # launch-bound); 8 layers bound the compile time
    squeeze_step("bench_squeeze_compile", 180, "--layers", "8", "--compile", "default",
                 figures=SQUEEZE_KEYS + ("compile_s",), parse=compiled_squeeze_figures,
                 smoke_skip="bench_squeeze under torch.compile (tests/test_bench_squeeze.py runs it on CPU)"),
    squeeze_step("bench_squeeze_graphs", 180, "--layers", "8", "--compile", "reduce-overhead",
                 figures=SQUEEZE_KEYS + ("compile_s",), parse=compiled_squeeze_figures,
                 smoke_skip="bench_squeeze under torch.compile with CUDA graphs (CUDA only)"),
    Step("bench_stats", "bench", 75, ("overhead_percent",), stats_figures, "bench_stats.py"),
    Step("pretrain_bf16_zero3", "pretrain", 150, PRETRAIN_KEYS, setting=(3, "bf16")),
    Step("gpu_tests", "tests", 90, ("tests_passed", "tests_failed", "tests_skipped")),
    Step("pretrain_fp16_zero2", "pretrain", 150, PRETRAIN_KEYS + ("loss_scale_kept",), setting=(2, "fp16")),
    Step("bench_finetune", "bench", 120, ("batches", "dense_oom_batches", "squeezed_oom_batches"), finetune_figures,
         "bench_finetune.py",
         sizes=(("--shape", "tiny", "--batches", "1,2", "--seq", "64", "--steps", "1", "--warmup", "0"),
                ("--shape", "bert-large", "--batches", "1,16", "--seq", "384", "--steps", "3", "--warmup", "1"))),
    # 4x the tokens per step: GEMMs, not kernel launches, set the pace; the profile's gemm_ms: how
    # much of the busy GPU pruning shrinks
    squeeze_step("bench_squeeze_b128", 75, "--profile", "15", batch_scale=4,
                 smoke_skip="bench_squeeze at 4x the batch"),
    # the FFN's inner widths padded to multiples of 8 with zero units (VPConfig.pad_ffn: exact,
    # SPEC 3's counts kept), against bench_squeeze's unaligned widths
    squeeze_step("bench_squeeze_pad_ffn8", 60, "--pad-ffn", "8", smoke_skip="bench_squeeze with --pad-ffn 8"),
    # heads in up to 3 groups with their own widths (fewer zero QKV rows, one attention call per
    # group), with CUDA graphs: what the extra calls cost the launch-bound eval
    squeeze_step("bench_squeeze_grouped", 90, "--head-widths", "grouped", "--cuda-graph",
                 smoke_skip="bench_squeeze with head groups"),
    # what VPConfig(align=N) buys over SPEC 3's exact counts: 8 (the least a bf16 GEMM wants; on
    # the CPU, like pad_ffn=8, about 0.02 of the dense step, README) and 64 (whole tiles)
    squeeze_step("bench_squeeze_align8", 60, "--align", "8", smoke_skip="bench_squeeze with --align 8"),
    squeeze_step("bench_squeeze_align64", 60, "--align", "64", smoke_skip="bench_squeeze with --align 64"),
    # the older layout: flash attention in training too, more GEMM rows
    squeeze_step("bench_squeeze_equal_widths", 90, "--head-widths", "equal", "--cuda-graph",
                 smoke_skip="bench_squeeze with one head width for Q, K and V"),
)
STEPS = {step.name: step for step in PLAN}
# What each step must report: the JSON's figure keys (null with the step's error when it failed).
FIGURES = {step.name: step.figures for step in PLAN}
# Steps the CPU smoke run leaves out: they run a script another step already checks.
SMOKE_SKIPS = {step.name: step.smoke_skip for step in PLAN if step.smoke_skip}


def bench_command(name: str, json_path: Path, smoke: bool) -> list[str]:
    """The command line of the bench step `name`: on the GPU in bf16, in smoke mode on the CPU in fp32."""
    step = STEPS[name]
    device, dtype = ("cpu", "fp32") if smoke else ("cuda", "bf16")
    if step.sizes is not None:
        sizes = step.sizes[0] if smoke else step.sizes[1]
    else:
        batch = (4 if smoke else 32) * step.batch_scale
        sizes = ("--shape", "tiny", "--batch", str(batch), "--seq", "64") if smoke else \
            ("--shape", "bert-large", "--batch", str(batch), "--seq", "128")
    return [sys.executable, str(ROOT / "launch" / step.script), "--device", device, "--dtype", dtype, *sizes,
            *step.args, *(() if smoke else step.gpu_args), "--json", str(json_path)]


def run_step(name: str, command: list[str], timeout: float, log: Path, env: dict) -> tuple[bool, str | None]:
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "w") as handle:
        handle.write(" ".join(command) + "\n\n")
        handle.flush()
        try:
            done = subprocess.run(command, cwd=ROOT, env=env, stdout=handle, stderr=subprocess.STDOUT,
                                  timeout=timeout)
        except subprocess.TimeoutExpired:
            return False, f"timed out after {timeout:.0f} s"
    if done.returncode != 0:
        tail = [line for line in log.read_text().splitlines() if line.strip()][-4:]
        return False, f"exit code {done.returncode}: " + " | ".join(tail)[-800:]
    return True, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("out", type=Path)
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny shapes (DS_ACCELERATOR=cpu, torchrun)")
    parser.add_argument("--budget", type=float, default=float(os.environ.get("VP_GPU_CHECK_BUDGET", 0)) or None,
                        help=f"seconds for the whole check (default: $VP_GPU_CHECK_BUDGET, else {BUDGET_S}; "
                             "smoke mode on a busy CPU: 4x)")
    args = parser.parse_args()
    if args.budget is None:
        args.budget = BUDGET_S * (4 if args.smoke else 1)
    if args.budget <= 0:
        parser.error(f"--budget {args.budget} must be > 0 seconds")
    import torch
    if not args.smoke and not torch.cuda.is_available():  # what gpu_check.sh checks, for direct calls
        parser.error("no CUDA GPU visible to torch: run it on a GPU, or --smoke for the CPU smoke run")
    out = args.out.resolve()
    out.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    if args.smoke:
        env.update(DS_ACCELERATOR="cpu", OMP_NUM_THREADS=env.get("OMP_NUM_THREADS", "2"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)

    summary = {"device": "cpu (smoke)" if args.smoke else (torch.cuda.get_device_name() if torch.cuda.is_available() else None),
               "torch": torch.__version__, "smoke": args.smoke, "budget_s": args.budget, "steps": {}}
    started = time.monotonic()
    plan = list(PLAN)
    if os.environ.get("VP_GPU_CHECK_STEPS"):  # a subset, in the order given (e.g. to re-run what failed)
        wanted = [name for name in os.environ["VP_GPU_CHECK_STEPS"].split(",") if name]
        unknown = set(wanted) - set(STEPS)
        if unknown:
            raise SystemExit(f"gpu_check: unknown steps in VP_GPU_CHECK_STEPS: {sorted(unknown)}")
        plan = [STEPS[name] for name in dict.fromkeys(wanted)]
    smoke_skips = dict(SMOKE_SKIPS)
    if args.smoke and not cpu_accepts_fp16(env):
        smoke_skips["pretrain_fp16_zero2"] = FP16_REFUSED
    for step in plan:
        name, kind = step.name, step.kind
        entry = {"ok": False, "error": None, "seconds": 0.0, "log": f"logs/{name}.log",
                 **dict.fromkeys(step.figures)}
        if args.smoke and name in smoke_skips:  # the same script as another step, other arguments
            entry["error"] = f"skipped in smoke mode: {smoke_skips[name]}"
            summary["steps"][name] = entry
            continue
        left = args.budget - (time.monotonic() - started)
        timeout = min(step.timeout_s * (4 if args.smoke else 1), left)
        if timeout < 10:
            entry["error"] = f"skipped: the {args.budget:.0f} s budget is spent"
            summary["steps"][name] = entry
            continue
        json_path = out / "bench" / f"{name}.json"
        json_path.parent.mkdir(parents=True, exist_ok=True)
        junit = out / "bench" / "gpu_tests.xml"
        if kind == "pretrain":
            command = pretrain_command(out, name, *step.setting, args.smoke)
        elif kind == "tests":
            command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
                       *(str(ROOT / path) for path in GPU_TEST_FILES)]
        else:
            command = bench_command(name, json_path, args.smoke)
        step_started = time.monotonic()
        ok, error = run_step(name, command, timeout, out / entry["log"], env)
        entry["seconds"] = round(time.monotonic() - step_started, 1)
        if ok:
            try:
                if kind == "pretrain":
                    entry.update(pretrain_figures(out / "runs" / name))
                elif kind == "tests":
                    entry.update(gpu_test_figures(junit))
                else:
                    result = json.loads(json_path.read_text())
                    entry.update(step.parse(result), result=result)
                entry["ok"] = True
            except Exception as problem:  # a run that finished but left no usable figures
                error = f"figures unreadable: {type(problem).__name__}: {problem}"
        entry["error"] = error
        summary["steps"][name] = entry
        print(f"gpu_check: {name}: {'ok' if entry['ok'] else 'FAILED: ' + str(error)} ({entry['seconds']} s)",
              flush=True)
        (out / "gpu_check.json").write_text(json.dumps(summary, indent=1))  # partial results survive a kill
    summary["seconds"] = round(time.monotonic() - started, 1)
    (out / "gpu_check.json").write_text(json.dumps(summary, indent=1))
    (out / "gpu_check.md").write_text(markdown(summary))
    print(f"gpu_check: wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'} ({summary['seconds']} s)")


def _gib(value) -> str:
    return "-" if value is None else f"{value / 2**30:.2f} GiB"


def _num(value, digits=2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def markdown(summary: dict) -> str:
    lines = [f"# vp-dist GPU check: {summary['device']}", "",
             f"torch {summary['torch']}, {summary['seconds']} s in all"
             f"{' (CPU smoke mode: tiny shapes, not GPU figures)' if summary['smoke'] else ''}.", "",
             "| step | ok | s | figures |", "|---|---|---|---|"]
    for name, step in summary["steps"].items():
        if not step["ok"]:
            error = " ".join(str(step["error"]).replace("|", "/").split())  # one table cell
            figures = f"**{error}** (see {step['log']})"
        elif name.startswith("pretrain"):
            figures = (f"pruned rows zero: {step['pruned_rows_zero']} (max {step['pruned_rows_max_abs']}); "
                       f"P+G+O {_gib(step['pgo_bytes_before'])} -> {_gib(step['pgo_bytes_after'])}; "
                       f"steady peak {_gib(step['steady_peak_before_bytes'])} -> {_gib(step['steady_peak_after_bytes'])}; "
                       f"after squeeze {_num(step['tflops_per_gpu'])} TFLOP/s, MFU {_num(step['mfu'], 3)}; "
                       f"loss {_num(step['final_loss'], 3)}")
        elif name == "bench_gemm_align":
            figures = "; ".join(f"k {row['width']}: {row['exact']['tflops']} TFLOP/s, per row x{row['per_row_exact_over_round8']} "
                                f"of k {row['round8']['k']}, x{row['per_row_exact_over_round64']} of k {row['round64']['k']}"
                                for row in step["rows"])
        elif name.startswith("bench_squeeze"):
            ops = step["ops_per_forward_backward"]
            figures = (f"dense {_num(step['dense_it_per_s'])} it/s, {_gib(step['dense_peak_bytes'])}; "
                       f"squeezed {_num(step['squeezed_it_per_s'])} it/s, {_gib(step['squeezed_peak_bytes'])}; "
                       f"ops per forward + backward {ops['dense']:,} vs {ops['squeezed']:,}; "
                       f"train x{_num(step['train_speedup'])}, eval x{_num(step['eval_speedup'])} "
                       f"(encoder x{_num(step['eval_encoder_speedup'])})")
        elif name == "bench_finetune":
            parts = []
            for batch, row in step["batches"].items():
                cells = [f"{model} " + (row[model] if isinstance(row[model], str) else
                                        f"{_num(row[model]['it_per_s'])} it/s {_gib(row[model]['peak_bytes'])}")
                         for model in ("dense", "squeezed")]
                parts.append(f"batch {batch}: " + ", ".join(cells))
            figures = "; ".join(parts)
        elif name == "gpu_tests":
            figures = (f"{step['tests_passed']} passed, {step['tests_failed']} failed, "
                       f"{step['tests_skipped']} skipped ({', '.join(GPU_TEST_FILES)})")
        else:
            figures = f"statistics overhead {_num(step['overhead_percent'])}% of step time"
        lines.append(f"| {name} | {'yes' if step['ok'] else 'no'} | {step['seconds']} | {figures} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
