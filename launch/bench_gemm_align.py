#!/usr/bin/env python
"""What a squeezed FFN's inner width costs when it is not a multiple of 8 or 64.

Variance Pruning leaves each layer an arbitrary number of FFN rows (SPEC 3's exact global
counts), e.g. 2037 of 4096. This times the squeezed FFN's two GEMMs, forward and backward
(`x [tokens, hidden] -> Linear(hidden, k) -> GELU -> Linear(k, hidden)`), at each inner width `k`
given, and at `k` rounded up to multiples of 8 and 64, so the cost of unaligned widths (and what
`VPConfig(align=N)` or zero padding would buy) is measured, not guessed:

    python launch/bench_gemm_align.py --device cuda --dtype bf16 --tokens 4096 --hidden 1024 --widths 2037,1531
    python launch/bench_gemm_align.py --device cpu --dtype fp32 --tokens 256 --hidden 128 --widths 250

Prints one JSON line (and writes it to `--json`): per width, the median seconds of one forward +
backward (of `--repeats`, after `--warmup`), TFLOP/s (6 * tokens * hidden * k FLOPs per GEMM pair
forward and backward), and the time per unit of width relative to the rounded-up widths.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch
import torch.nn.functional as F

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def ffn_seconds(tokens: int, hidden: int, width: int, dtype, device, warmup: int, repeats: int) -> float:
    generator = torch.Generator(device="cpu").manual_seed(width)
    x = torch.randn(tokens, hidden, generator=generator).to(device, dtype).requires_grad_(True)
    w_in = (torch.randn(width, hidden, generator=generator) * hidden ** -0.5).to(device, dtype).requires_grad_(True)
    w_out = (torch.randn(hidden, width, generator=generator) * width ** -0.5).to(device, dtype).requires_grad_(True)
    b_in = torch.zeros(width, device=device, dtype=dtype, requires_grad=True)
    grad = torch.randn(tokens, hidden, generator=generator).to(device, dtype)
    cuda = device.type == "cuda"

    def step() -> float:
        if cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = F.linear(F.gelu(F.linear(x, w_in, b_in)), w_out)
        out.backward(grad)
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(warmup):
        step()
    return statistics.median(step() for _ in range(repeats))


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--widths", default="2037,1531,1021",
                        help="comma-separated inner widths k; each is also timed rounded up to 8 and 64")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)
    try:
        widths = [int(w) for w in args.widths.split(",") if w.strip()]
    except ValueError:
        parser.error(f"--widths must be comma-separated integers, got {args.widths!r}")
    if not widths or min(widths) < 1:
        parser.error(f"--widths needs positive integers, got {args.widths!r}")
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    rows = []
    for width in widths:
        row = {"width": width}
        for label, k in (("exact", width), ("round8", round_up(width, 8)), ("round64", round_up(width, 64))):
            seconds = ffn_seconds(args.tokens, args.hidden, k, dtype, device, args.warmup, args.repeats)
            row[label] = {"k": k, "seconds": round(seconds, 7),
                          "tflops": round(6 * 2 * args.tokens * args.hidden * k / seconds / 1e12, 2)}
        # time per kept row, unaligned over aligned: > 1 means the odd width runs slower per row
        row["per_row_exact_over_round8"] = round((row["exact"]["seconds"] / width)
                                                 / (row["round8"]["seconds"] / row["round8"]["k"]), 3)
        row["per_row_exact_over_round64"] = round((row["exact"]["seconds"] / width)
                                                  / (row["round64"]["seconds"] / row["round64"]["k"]), 3)
        rows.append(row)
    result = {"benchmark": "ffn_gemm_alignment", "device": str(device), "dtype": args.dtype,
              "tokens": args.tokens, "hidden": args.hidden, "repeats": args.repeats, "rows": rows}
    line = json.dumps(result)
    print(line)
    if args.json:
        with open(args.json, "w") as handle:
            handle.write(line + "\n")
    return result


if __name__ == "__main__":
    main()
