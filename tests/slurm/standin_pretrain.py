"""A minimal entry point with launch/pretrain.py's command line, for tests/test_slurm.py.

Accepts the same arguments (`--config`, `--deepspeed_config`, `--output_dir`, `key=value`
overrides), joins the process group the same way (`deepspeed.init_distributed`, gloo on CPU,
NCCL otherwise), checks one all_reduce, and records what each rank was handed by the launcher:
`rank<R>.json` from every rank (RANK, LOCAL_RANK, MASTER_ADDR, ... as seen by that process) and
`result.json` from rank 0. A finished pre-training run shows that the ranks met, not what each
one was given; this shows the latter. Run via `VP_ENTRY=tests/slurm/standin_pretrain.py`.
"""

import argparse
import json
import os
import socket
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", type=Path)
    parser.add_argument("--deepspeed_config", type=Path)
    parser.add_argument("--output_dir", type=Path, required=True)
    parser.add_argument("--local_rank", type=int, default=-1, help="set by the deepspeed launcher")
    parser.add_argument("overrides", nargs="*", help="key=value run-config overrides")
    args = parser.parse_args()

    on_cpu = os.environ.get("DS_ACCELERATOR") == "cpu" or not torch.cuda.is_available()
    deepspeed.init_distributed(dist_backend="gloo" if on_cpu else "nccl", auto_mpi_discovery=True)
    rank, world_size = dist.get_rank(), dist.get_world_size()
    device = torch.device("cpu" if on_cpu else f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}")

    # Every rank contributes rank + 1, so the sum tells whether all ranks joined exactly once.
    total = torch.tensor([float(rank + 1)], device=device)
    dist.all_reduce(total)
    expected = world_size * (world_size + 1) / 2

    args.output_dir.mkdir(parents=True, exist_ok=True)
    env_seen = {k: os.environ.get(k) for k in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR",
                                               "MASTER_PORT", "DS_ACCELERATOR", "SLURM_JOB_ID")}
    rank_record = {"rank": rank, "world_size": world_size, "host": socket.gethostname(), "env": env_seen}
    (args.output_dir / f"rank{rank}.json").write_text(json.dumps(rank_record, indent=2))
    dist.barrier()
    if rank == 0:
        result = {
            "world_size": world_size,
            "all_reduce_sum": total.item(),
            "expected_sum": expected,
            "backend": dist.get_backend(),
            "config": str(args.config) if args.config else None,
            "deepspeed_config": str(args.deepspeed_config) if args.deepspeed_config else None,
            "overrides": args.overrides,
        }
        (args.output_dir / "result.json").write_text(json.dumps(result, indent=2))
    dist.destroy_process_group()
    if total.item() != expected:
        raise SystemExit(f"all_reduce sum {total.item()} != {expected} for world_size={world_size}")


if __name__ == "__main__":
    main()
