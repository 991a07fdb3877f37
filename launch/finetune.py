#!/usr/bin/env python
"""Fine-tune a dense, masked or squeezed BERT on GLUE or SQuAD v1.1 (paper Table 1).

Every field of `vp_dist.downstream.finetune.FinetuneConfig` is a flag. Examples:

    python launch/finetune.py --task mrpc --model runs/demo/export_masked \
        --data_dir glue_data/MRPC --output_dir runs/demo/mrpc
    deepspeed --num_gpus 8 launch/finetune.py --task squad --model runs/demo/export_squeezed \
        --data_dir squad --output_dir runs/demo/squad --deepspeed_config ds_configs/zero2_bf16.json \
        --batch_size 4 --lr 3e-5 --epochs 2
    python launch/finetune.py --task sst2 --model runs/demo/export_masked --output_dir runs/demo/sst2 \
        --teacher runs/dense/sst2/model --kd_alpha 0.5 --kd_temperature 2   # hub data when online

Writes <output_dir>/metrics.json and <output_dir>/model (unless --no-save_model).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import sys
import typing

from vp_dist.downstream.finetune import FinetuneConfig, finetune


def parse_args(argv=None) -> FinetuneConfig:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(FinetuneConfig)
    for field in dataclasses.fields(FinetuneConfig):
        kind = hints[field.name]
        required = field.default is dataclasses.MISSING
        if kind is bool:
            parser.add_argument(f"--{field.name}", action=argparse.BooleanOptionalAction, default=field.default)
            continue
        base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)  # X | None -> X
        parser.add_argument(f"--{field.name}", type=base, required=required,
                            default=None if required else field.default)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)  # set by `deepspeed`
    args = vars(parser.parse_args(argv))
    args.pop("local_rank")
    try:
        return FinetuneConfig(**args)
    except ValueError as error:
        parser.error(str(error))


def main(argv=None) -> None:
    cfg = parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(asctime)s %(name)s: %(message)s")
    metrics = finetune(cfg)
    if rank == 0:
        print(f"{metrics['task']} ({metrics['model_kind']}): {metrics['eval']}", file=sys.stderr)


if __name__ == "__main__":
    main()
