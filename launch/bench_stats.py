#!/usr/bin/env python
"""Cost of Variance Pruning's statistics: a training step observed against the same step unobserved.

One BertForPreTraining (MLM + NSP, AdamW) of a preset shape, with a VariancePruner attached and no
pruning due. Each repetition times one observed step (forward inside `pruner.observe`, backward,
optimizer step, `pruner.step()`) and one unobserved step (the same without `observe` and
`pruner.step()`; the hooks still fire and return at once), in alternating order (ABBA), so drift in
machine load hits both alike. Prints and optionally writes a JSON object: median step times, the
median of the per-pair ratios observed/unobserved as `overhead_pct`, and on CUDA the peak memory.
On CPU the ratio is taken from the process's CPU time (`time.process_time`, one thread by default):
on a machine shared with other jobs, wall time measures their load more than this step; the wall
times are reported too. On CUDA it is wall time between synchronisations. On CPU, where a whole
step's timing noise is larger than the effect, `direct_pct` also times the statistics work alone:
the hooks' accumulation of one step's real layer outputs plus the meter update, replayed.
Examples:

    python launch/bench_stats.py                                     # CPU, BERT-base, ~1-2 min
    python launch/bench_stats.py --device cuda --dtype bf16 --shape bert-large --batch 32 --seq 128 \\
        --json runs/bench_stats.json
    python launch/bench_stats.py --compile ...                       # torch.compile'd model (inductor)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout, as the other launch scripts

from vp_dist import VPConfig, VariancePruner  # noqa: E402
from vp_dist.cli import nonnegative_int, positive_int  # noqa: E402
from vp_dist.stats import MeterState, StepSums, update_meters  # noqa: E402
from vp_dist.stats_kernels import TRITON_AVAILABLE  # noqa: E402
from vp_dist.train.config import ModelSpec  # noqa: E402
from vp_dist.train.model import PRESETS, build_model  # noqa: E402

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32",
                        help="fp32, or bf16/fp16 autocast (activations then in that dtype)")
    parser.add_argument("--shape", choices=sorted(PRESETS), default="bert-base")
    parser.add_argument("--layers", type=positive_int, default=None, help="encoder layers (default: the preset's)")
    parser.add_argument("--batch", type=positive_int, default=None, help="sequences per step (default: 2 on CPU, 32 on CUDA)")
    parser.add_argument("--seq", type=positive_int, default=128)
    parser.add_argument("--vocab_size", type=positive_int, default=30522)
    parser.add_argument("--repeats", type=positive_int, default=None,
                        help="timed pairs of steps (default: 6 on CPU, 20 on CUDA)")
    parser.add_argument("--warmup", type=nonnegative_int, default=3, help="untimed pairs first")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (inductor)")
    parser.add_argument("--threads", type=nonnegative_int, default=1, help="torch threads on CPU (0: leave the default)")
    parser.add_argument("--json", type=Path, default=None, help="also write the result to this file")
    args = parser.parse_args(argv)
    on_cpu = args.device == "cpu"
    args.batch = args.batch or (2 if on_cpu else 32)
    args.repeats = args.repeats or (6 if on_cpu else 20)
    return args


def make_batch(args, vocab_size: int, device) -> dict:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(5, vocab_size, (args.batch, args.seq), generator=g)
    mask = torch.ones_like(ids)
    mask[::2, args.seq - args.seq // 8:] = 0  # some padding, as in packed MLM batches
    labels = ids.masked_fill(torch.rand(ids.shape, generator=g) > 0.15, -100)
    batch = {"input_ids": ids, "attention_mask": mask, "labels": labels,
             "next_sentence_label": torch.arange(args.batch) % 2}
    return {k: v.to(device) for k, v in batch.items()}


def time_statistics_alone(model, run, batch, pruner, autocast, repeats: int = 5) -> float:
    """CPU time of one step's statistics work alone (median of `repeats`): every prunable layer's
    real outputs accumulated as the hooks do, then the meter update."""
    outputs, handles = {}, []
    for index, layer in enumerate(pruner.layers):
        handles.append(layer.module.register_forward_hook(
            lambda module, inputs, output, index=index: outputs.__setitem__(index, output.detach())))
    with torch.no_grad(), autocast():
        run(**batch)
    for handle in handles:
        handle.remove()
    valid_mask = batch["attention_mask"].reshape(-1) == 1
    sums = StepSums(pruner.layout, valid_mask.device, deferred=True)  # as the pruner fills it
    sums.begin(torch.zeros(pruner.layout.total_rows), centre_each_batch=False)
    meters = MeterState.zeros(pruner.layout, valid_mask.device)
    row_layer = pruner.layout.row_layer(valid_mask.device)
    timings = []
    for _ in range(repeats):
        start = time.process_time()
        valid, num_valid = valid_mask.float(), valid_mask.sum()
        for index, output in outputs.items():
            sums.accumulate(index, output, valid, num_valid)
        sums.end_forward()
        sums.flush()
        update_meters(meters, sums, row_layer, alpha=0.9)
        timings.append(time.process_time() - start)
    return statistics.median(timings)


def measure(args) -> dict:
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    overrides = {"num_hidden_layers": args.layers} if args.layers else {}
    torch.manual_seed(0)
    model = build_model(ModelSpec(config=args.shape, overrides=overrides, fused_layernorm="off"),
                        args.vocab_size, args.seq).to(device).train()
    pruner = VariancePruner(model, VPConfig(start=10**9, interval=1, increment=0.5, target=0.5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)
    run = torch.compile(model) if args.compile else model
    batch = make_batch(args, args.vocab_size, device)
    dtype = DTYPES[args.dtype]
    autocast = (lambda: torch.autocast(args.device, dtype=dtype)) if dtype else contextlib.nullcontext

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    clock = time.perf_counter if device.type == "cuda" else time.process_time

    def train_step(observed: bool) -> tuple[float, float]:
        sync()
        start, wall = clock(), time.perf_counter()
        with (pruner.observe(batch["attention_mask"]) if observed else contextlib.nullcontext()), autocast():
            loss = run(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if observed:
            pruner.step(optimizer)
        sync()
        return clock() - start, time.perf_counter() - wall

    for _ in range(args.warmup):
        train_step(True), train_step(False)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = {"observed": [], "unobserved": []}
    walls = {"observed": [], "unobserved": []}
    ratios = []
    for repeat in range(args.repeats):
        order = (True, False) if repeat % 2 == 0 else (False, True)  # ABBA: drift cancels
        pair = {observed: train_step(observed) for observed in order}
        for observed, key in ((True, "observed"), (False, "unobserved")):
            times[key].append(pair[observed][0])
            walls[key].append(pair[observed][1])
        ratios.append(pair[True][0] / pair[False][0])
    direct = time_statistics_alone(model, run, batch, pruner, autocast) if device.type == "cpu" else None
    layout = pruner.layout
    result = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "dtype": args.dtype, "shape": args.shape,
        "layers": model.config.num_hidden_layers, "batch": args.batch, "seq": args.seq,
        "vocab_size": args.vocab_size, "compile": args.compile, "repeats": args.repeats,
        "triton_kernel": TRITON_AVAILABLE and device.type == "cuda" and not args.compile,
        "prunable_layers": layout.num_layers, "prunable_rows": layout.total_rows,
        "clock": "wall" if device.type == "cuda" else "process_cpu",
        "observed_s": round(statistics.median(times["observed"]), 9),
        "unobserved_s": round(statistics.median(times["unobserved"]), 9),
        "overhead_pct": round(100 * (statistics.median(ratios) - 1), 2),
        # nanoseconds: the per-pair ratios (overhead_pct) can be recomputed from these, also for ~1 ms steps
        "times_s": {k: [round(t, 9) for t in v] for k, v in times.items()},
        "wall_s": {k: [round(t, 9) for t in v] for k, v in walls.items()},
        "torch": torch.__version__,
    }
    if direct is not None:
        # nanoseconds too: direct_pct can be recomputed from the two printed figures on a tiny model,
        # whose statistics work takes a few hundred microseconds (10 us rounding moved it by ~1%)
        result["direct_stats_s"] = round(direct, 9)
        result["direct_pct"] = round(100 * result["direct_stats_s"] / result["unobserved_s"], 2)
    if device.type == "cuda":
        result["peak_memory_GiB"] = round(torch.cuda.max_memory_allocated(device) / 2**30, 2)
    stats = pruner.statistics()
    result["statistics_finite"] = all(bool(torch.isfinite(v).all()) for pair in stats.values() for v in pair)
    return result


def main(argv=None) -> None:
    args = parse_args(argv)
    result = measure(args)
    text = json.dumps(result)
    print(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text + "\n")


if __name__ == "__main__":
    main()
