#!/usr/bin/env python
"""Paper Table 2: fine-tuning a dense BERT against the same BERT squeezed at 50% rows per layer,
on SQuAD-shaped inputs (sequence 384), over a sweep of batch sizes.

For each batch size and model: peak memory and training iterations per second (forward, backward,
AdamW step), each measured in a fresh child process so one peak never leaks into the next.
- GPU: peak = torch.cuda.max_memory_allocated; an out-of-memory error is reported as "OOM", as in
  the paper, and larger batches of that model are skipped.
- CPU: peak = the child's maximum resident set size (whole process, with the Python runtime), and
  `peak_above_runtime_bytes`, the same less the resident size before the model was built.
Both report `state_bytes`: parameters + gradients + optimizer state, counted after the first step.
Weights are random; the squeezed model has exactly `--sparsity` of every layer's rows pruned at
random (for speed and memory only the structure matters), FFN-in rows folded into FFN-out, the
attention shrunk exactly with `--head-widths` (VPConfig.head_widths; default split).
Prints one JSON document. Examples:

    python launch/bench_finetune.py --shape mini --batches 1,2,4 --steps 5
    python launch/bench_finetune.py --shape bert-large --batches 1,4,8,16 --device cuda --dtype bf16 --json FILE

A measurement that fails for another reason than memory is recorded in its row as {"error": ...}
and the sweep goes on; `--json FILE` also writes the document to FILE.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout
from vp_dist.cli import nonnegative_int, open_fraction, positive_int, positive_int_list  # noqa: E402

SHAPES = {  # same shapes as the pre-training presets (vp_dist.train.model.PRESETS)
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    "mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


def build_model(shape: str, squeezed: bool, sparsity: float, seq: int, head_widths: str = "split"):
    from transformers import BertConfig, BertForQuestionAnswering

    from vp_dist.adapters import fold_sites, prunable_layers
    from vp_dist.squeeze import squeeze_model

    torch.manual_seed(0)
    config = BertConfig(vocab_size=30522, max_position_embeddings=max(512, seq), **SHAPES[shape])
    model = BertForQuestionAnswering(config)
    if squeezed:
        generator = torch.Generator().manual_seed(0)
        masks = {}
        for layer in prunable_layers(model):
            rows = layer.module.weight.shape[0]
            kept = torch.ones(rows, dtype=torch.bool)
            kept[torch.randperm(rows, generator=generator)[: round(sparsity * rows)]] = False
            masks[layer.name] = kept
        squeeze_model(model, masks, fold_sites(model), head_widths=head_widths)
    return model


def tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def measure(spec: dict) -> dict:
    """One (model, batch) measurement; runs in the child process."""
    import resource

    device = torch.device(spec["device"])
    baseline = _current_rss()  # the runtime before any model tensor exists
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[spec["dtype"]]
    model = build_model(spec["shape"], spec["squeezed"], spec["sparsity"], spec["seq"],
                        spec["head_widths"]).to(device, dtype)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-5)
    generator = torch.Generator().manual_seed(1)
    batch, seq = spec["batch"], spec["seq"]
    inputs = {"input_ids": torch.randint(1000, 30000, (batch, seq), generator=generator),
              "attention_mask": torch.ones(batch, seq, dtype=torch.long),
              "token_type_ids": torch.zeros(batch, seq, dtype=torch.long),
              "start_positions": torch.randint(0, seq, (batch,), generator=generator),
              "end_positions": torch.randint(0, seq, (batch,), generator=generator)}
    inputs = {k: v.to(device) for k, v in inputs.items()}
    cuda = device.type == "cuda"

    def step() -> None:
        model(**inputs).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=False)  # gradients stay allocated: part of the footprint

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    try:
        times = []
        for index in range(spec["warmup"] + spec["steps"]):
            if cuda:
                torch.cuda.synchronize()
            started = time.perf_counter()
            step()
            if cuda:
                torch.cuda.synchronize()
            if index >= spec["warmup"]:
                times.append(time.perf_counter() - started)
    except torch.OutOfMemoryError:
        return {"oom": True}
    state = (tensor_bytes(model.parameters()) + tensor_bytes(p.grad for p in model.parameters())
             + tensor_bytes(v for s in optimizer.state.values() for v in s.values()))
    peak = torch.cuda.max_memory_allocated() if cuda else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    result = {"oom": False, "it_per_s": 1.0 / statistics.median(times), "peak_bytes": peak, "state_bytes": state,
              "parameters": sum(p.numel() for p in model.parameters())}
    if not cuda:
        result["peak_above_runtime_bytes"] = peak - baseline
    return result


def _current_rss() -> int:
    import os
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def run_child(spec: dict, timeout: int) -> dict:
    completed = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True,
                               text=True, timeout=timeout)
    if completed.returncode != 0:
        tail = completed.stderr.strip().splitlines()[-3:]
        if any("OutOfMemory" in line or "out of memory" in line for line in tail):
            return {"oom": True}
        return {"oom": False, "error": f"exit code {completed.returncode}: {' | '.join(tail)}"}
    return json.loads(completed.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", choices=sorted(SHAPES), default="mini")
    parser.add_argument("--batches", type=positive_int_list, default="1,2,4,8", help="comma-separated batch sizes")
    parser.add_argument("--seq", type=positive_int, default=384)
    parser.add_argument("--sparsity", type=open_fraction, default=0.5)
    parser.add_argument("--steps", type=positive_int, default=10, help="timed steps (median step time)")
    parser.add_argument("--warmup", type=nonnegative_int, default=2)
    parser.add_argument("--repeats", type=positive_int, default=1,
                        help="measurements per (model, batch), dense and squeezed alternating; median it/s")
    parser.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=nonnegative_int, default=0, help="CPU threads per child (0: torch's default)")
    parser.add_argument("--timeout", type=positive_int, default=1800, help="seconds per measurement")
    parser.add_argument("--json", help="also write the JSON document to this file")
    parser.add_argument("--head-widths", choices=("split", "equal", "grouped"), default="split",
                        help="the squeezed model's attention head layout (VPConfig.head_widths)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        spec = json.loads(args.child)
        if spec["threads"]:
            torch.set_num_threads(spec["threads"])
        print(json.dumps(measure(spec)))
        return
    if not 0.0 < args.sparsity < 1.0:
        parser.error(f"--sparsity={args.sparsity} must be in (0, 1)")

    rows, out_of_memory = [], set()
    for batch in args.batches:
        row = {"batch": batch}
        runs: dict[str, list[dict]] = {"dense": [], "squeezed": []}
        errors: dict[str, str] = {}
        for _ in range(args.repeats):
            for name in ("dense", "squeezed"):  # alternating, so drift in machine load hits both alike
                if name in out_of_memory:
                    continue
                spec = {"shape": args.shape, "squeezed": name == "squeezed", "sparsity": args.sparsity,
                        "batch": batch, "seq": args.seq, "steps": args.steps, "warmup": args.warmup,
                        "dtype": args.dtype, "device": args.device, "threads": args.threads,
                        "head_widths": args.head_widths}
                try:
                    result = run_child(spec, args.timeout)
                except subprocess.TimeoutExpired:
                    result = {"oom": False, "error": f"timed out after {args.timeout} s"}
                if "error" in result:
                    errors[name] = result["error"]
                elif result.pop("oom"):
                    out_of_memory.add(name)
                else:
                    runs[name].append(result)
        for name, results in runs.items():
            if name in out_of_memory:
                row[name] = "OOM"
                continue
            if not results:
                row[name] = {"error": errors.get(name, "no measurement")}
                continue
            speeds = [r["it_per_s"] for r in results]
            merged = {**max(results, key=lambda r: r["peak_bytes"]), "it_per_s": round(statistics.median(speeds), 3),
                      "it_per_s_each": [round(v, 3) for v in speeds]}
            row[name] = {**merged, "peak_gb": round(merged["peak_bytes"] / 2**30, 3),
                         "state_gb": round(merged["state_bytes"] / 2**30, 3)}
        if all(isinstance(row[name], dict) and "error" not in row[name] for name in ("dense", "squeezed")):
            row["squeezed_over_dense"] = {key: round(row["squeezed"][key] / row["dense"][key], 3)
                                          for key in ("it_per_s", "peak_bytes", "state_bytes",
                                                      "peak_above_runtime_bytes") if key in row["dense"]}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    document = json.dumps({
        "benchmark": "finetune_dense_vs_squeezed", "task_shape": "SQuAD (BertForQuestionAnswering)",
        "shape": args.shape, "seq": args.seq, "sparsity": args.sparsity, "head_widths": args.head_widths,
        "dtype": args.dtype,
        "device": device_name, "threads": args.threads or torch.get_num_threads(), "steps": args.steps,
        "repeats": args.repeats,
        "peak_memory": "torch.cuda.max_memory_allocated" if args.device.startswith("cuda") else "child max RSS",
        "rows": rows}, indent=1)
    print(document)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(document)


if __name__ == "__main__":
    main()
