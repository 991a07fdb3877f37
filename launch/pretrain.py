#!/usr/bin/env python
"""vp-dist pre-training entry point (BERT MLM/NSP with Variance Pruning on DeepSpeed).

Runs under every launcher, on GPU (nccl) or CPU (DS_ACCELERATOR=cpu, gloo):
    deepspeed --num_gpus 8 launch/pretrain.py --config launch/configs/bert_large_paper.yaml
    torchrun --nproc_per_node 2 launch/pretrain.py --config launch/configs/demo.yaml
    mpirun -np 2 python launch/pretrain.py --config launch/configs/demo.yaml
    python launch/pretrain.py --config launch/configs/demo.yaml            # one process
Any config field can be overridden: `--output_dir runs/x`, `--vp.target 0.3`,
`--phases.mlm.steps 200`, or `vp.target=0.3`. Re-running with the same output_dir resumes
from its latest checkpoint.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from vp_dist.train.config import load_run_config  # noqa: E402


def parse_args(argv: list[str]) -> tuple[str | None, list[str]]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="run config, YAML or JSON (see launch/configs/)")
    parser.add_argument("--deepspeed_config", help="DeepSpeed config JSON (see ds_configs/)")
    parser.add_argument("--output_dir", help="where checkpoints, logs and the report go")
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # deepspeed launcher
    known, rest = parser.parse_known_args(argv)
    overrides = [f"{key}={value}" for key, value in (("deepspeed_config", known.deepspeed_config),
                                                     ("output_dir", known.output_dir)) if value is not None]
    index = 0
    while index < len(rest):
        item = rest[index]
        if item.startswith("--") and "=" in item:
            overrides.append(item[2:])
        elif item.startswith("--"):
            if index + 1 >= len(rest):
                parser.error(f"{item} needs a value")
            overrides.append(f"{item[2:]}={rest[index + 1]}")
            index += 1
        elif "=" in item:
            overrides.append(item)
        else:
            parser.error(f"unexpected argument {item!r}: overrides look like --section.key value")
        index += 1
    return known.config, overrides


def main(argv: list[str] | None = None) -> None:
    config_path, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        config = load_run_config(config_path, overrides)
    except (ValueError, FileNotFoundError) as error:
        sys.exit(f"pretrain.py: bad configuration: {error}")
    from vp_dist.train.loop import pretrain
    pretrain(config)


if __name__ == "__main__":
    main()
