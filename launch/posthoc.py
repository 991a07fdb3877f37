#!/usr/bin/env python
"""Prune a fine-tuned model without retraining, lowest variance first against random rows of the
same count per layer, at increasing sparsity (paper Fig. 2).

Every field of `vp_dist.downstream.posthoc.PosthocConfig` is a flag. Example:

    python launch/posthoc.py --task mrpc --model runs/dense/mrpc/model --data_dir glue_data/MRPC \\
        --output_dir runs/dense/mrpc/posthoc --sparsities 0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9 \\
        --random_seeds 3 --max_stat_batches 200

Writes <output_dir>/posthoc.json (metric per sparsity, both selections) and posthoc.png.
"""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from vp_dist.downstream.cli import configure_logging, parse_config  # noqa: E402
from vp_dist.downstream.posthoc import PosthocConfig, posthoc  # noqa: E402


def main(argv=None) -> None:
    cfg = parse_config(PosthocConfig, __doc__, argv, prog="posthoc.py")
    configure_logging()
    posthoc(cfg)


if __name__ == "__main__":
    main()
