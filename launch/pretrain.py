#!/usr/bin/env python
"""vp-dist pre-training entry point (BERT MLM/NSP with Variance Pruning on DeepSpeed).

Runs under every launcher, on GPU (nccl) or CPU (DS_ACCELERATOR=cpu, gloo):
    deepspeed --num_gpus 8 launch/pretrain.py --config launch/configs/bert_large_paper.yaml
    torchrun --nproc_per_node 2 launch/pretrain.py --config launch/configs/demo.yaml
    mpirun -np 2 python launch/pretrain.py --config launch/configs/demo.yaml
    python launch/pretrain.py --config launch/configs/demo.yaml            # one process
Any config field can be overridden: `--output_dir runs/x`, `--lr 1e-4`, `--vp.target 0.3`,
`--phases.mlm.steps 200`, or `vp.target=0.3`; `--print_config` shows the result. Re-running with
the same output_dir resumes from its latest checkpoint.
"""
from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from vp_dist import cli  # noqa: E402
from vp_dist.train.preemption import StopRequest  # noqa: E402
from vp_dist.train.config import (HIDDEN_FIELDS, RunConfig, read_deepspeed_config,  # noqa: E402
                                  run_config_from_dict, world_size_from_launcher)


def parse_args(argv: list[str] | None = None) -> RunConfig:
    """The run config from `--config FILE` and the overrides; exits 2 naming the field on bad input."""
    return cli.parse_command_line(RunConfig, argv, prog="pretrain.py", description=__doc__, config_file=True,
                                  hidden=HIDDEN_FIELDS, finish=run_config_from_dict)


def main(argv: list[str] | None = None) -> None:
    stop_request = StopRequest()  # from the start: an early SIGUSR1 must not kill the process
    config = parse_args(argv)
    try:  # before any process group starts: one clear message instead of a traceback per rank
        read_deepspeed_config(config, world_size_from_launcher())
    except cli.ConfigError as error:
        cli.fail("pretrain.py", error)
    from vp_dist.train.loop import pretrain
    pretrain(config, stop_request)


if __name__ == "__main__":
    main()
