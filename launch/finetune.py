#!/usr/bin/env python
"""Fine-tune a dense, masked or squeezed BERT on GLUE or SQuAD v1.1 (paper Table 1).

Every field of `vp_dist.downstream.finetune.FinetuneConfig` is a flag. Examples:

    python launch/finetune.py --task mrpc --model runs/demo/export_masked \\
        --data_dir glue_data/MRPC --output_dir runs/demo/mrpc
    deepspeed --num_gpus 8 launch/finetune.py --task squad --model runs/demo/export_squeezed \\
        --data_dir squad --output_dir runs/demo/squad --deepspeed_config ds_configs/zero2_bf16.json \\
        --batch_size 4 --lr 3e-5 --epochs 2
    python launch/finetune.py --task sst2 --model runs/demo/export_masked --output_dir runs/demo/sst2 \\
        --teacher runs/dense/sst2/model --kd_alpha 0.5 --kd_temperature 2     # hub data when online

Writes <output_dir>/metrics.json and <output_dir>/model (unless --no-save_model).
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from vp_dist.cli import ConfigError, fail, read_deepspeed_json  # noqa: E402
from vp_dist.downstream.cli import configure_logging, parse_config  # noqa: E402
from vp_dist.downstream.finetune import FinetuneConfig, finetune  # noqa: E402


def main(argv=None) -> None:
    cfg = parse_config(FinetuneConfig, __doc__, argv, prog="finetune.py")
    if cfg.deepspeed_config:  # read before any process group starts
        try:
            read_deepspeed_json(cfg.deepspeed_config)
        except ConfigError as error:
            fail("finetune.py", error)
    configure_logging()
    finetune(cfg)


if __name__ == "__main__":
    main()
