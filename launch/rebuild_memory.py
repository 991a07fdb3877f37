#!/usr/bin/env python
"""Memory of the squeeze's rebuild against training, per ZeRO stage (the README's figures).

Runs `launch/pretrain.py --config launch/configs/memory_bert_base.yaml` (BERT-base shape, pruned
to 50%, squeezed at step 2, 2 more steps) on 2 ranks once per stage, one after another, and prints
from each run's `vp_report.json` the largest over ranks of: the steady-state peak of training
before the squeeze, the rebuild's peak, the steady-state peak of the 2 steps after it, the
rebuild's time, and the parameter+gradient+optimizer bytes per rank before and after.

    DS_ACCELERATOR=cpu python launch/rebuild_memory.py                 # CPU: peak RSS per rank
    python launch/rebuild_memory.py --nproc 1 --ds_config_pattern ds_configs/zero{stage}_bf16.json
                                                                       # GPU: max_memory_allocated
    python launch/rebuild_memory.py --report_only runs/rebuild_memory  # print the table again
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MiB = 2 ** 20


def run_stage(stage: int, args) -> Path:
    out = Path(args.output_dir) / f"zero{stage}"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}",
               str(ROOT / "launch" / "pretrain.py"), "--config", str(ROOT / "launch" / "configs" / "memory_bert_base.yaml"),
               "--deepspeed_config", str(ROOT / args.ds_config_pattern.format(stage=stage)),
               "--output_dir", str(out), "--render_report", "false", "--checkpoint_every", "0"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
           "TOKENIZERS_PARALLELISM": "false"}
    subprocess.run(command, check=True, env=env, cwd=ROOT)
    return out


def row(stage: int, out: Path) -> str:
    report = json.loads((out / "vp_report.json").read_text())
    rebuild = report["memory"].get("rebuild")
    if not rebuild:
        raise SystemExit(f"{out}/vp_report.json has no memory.rebuild record: did the run squeeze?")
    worst = {key: max(rank[key] for rank in rebuild)
             for key in ("steady_peak_before", "rebuild_peak", "steady_peak_after", "rebuild_seconds")}
    held = {key: max(rank["total_bytes"] for rank in report["memory"][key]) for key in ("before_squeeze", "after_squeeze")}
    ok = all(rank["rebuild_peak"] <= rank["steady_peak_before"] for rank in rebuild)
    return (f"| {stage} | {rebuild[0]['kind']} | {worst['steady_peak_before'] / MiB:,.0f} | "
            f"{worst['rebuild_peak'] / MiB:,.0f} | {worst['steady_peak_after'] / MiB:,.0f} | "
            f"{worst['rebuild_seconds']:.1f} | {held['before_squeeze'] / MiB:,.1f} -> {held['after_squeeze'] / MiB:,.1f} | "
            f"{'yes' if ok else 'NO'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stages", type=int, nargs="+", choices=(1, 2, 3), default=[1, 2, 3])
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--ds_config_pattern", default="ds_configs/zero{stage}_cpu.json")
    parser.add_argument("--output_dir", default="runs/rebuild_memory")
    parser.add_argument("--report_only", metavar="DIR", help="print the table of runs already in DIR")
    args = parser.parse_args()
    if args.report_only:
        args.output_dir = args.report_only
    outs = {stage: (Path(args.output_dir) / f"zero{stage}" if args.report_only else run_stage(stage, args))
            for stage in args.stages}
    print("| ZeRO stage | peak measured | steady-state peak before (MiB) | rebuild peak (MiB) | "
          "steady-state peak after (MiB) | rebuild (s) | P+G+O per rank (MiB) | rebuild <= before on every rank |")
    print("|---|---|---|---|---|---|---|---|")
    for stage, out in outs.items():
        print(row(stage, out))


if __name__ == "__main__":
    main()
