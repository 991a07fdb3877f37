#!/usr/bin/env python
"""Size of the per-step statistics all-reduce next to the gradients DeepSpeed reduces in that step.

Builds the pre-training model of a preset shape (BertForPreTraining, as `launch/pretrain.py`
does), attaches a VariancePruner and prints a JSON line: prunable layers and rows, the values and
bytes of the flat float64 buffer that is all-reduced once per optimizer step, and the bytes of
the model's gradients in bf16. Example:

    python launch/stats_allreduce_size.py --shape bert-large --vocab_size 30522
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from vp_dist import VPConfig, VariancePruner  # noqa: E402
from vp_dist.adapters import prunable_layers  # noqa: E402
from vp_dist.cli import positive_int  # noqa: E402
from vp_dist.train.config import ModelSpec  # noqa: E402
from vp_dist.train.model import PRESETS, build_model  # noqa: E402

MIB = 2**20


def measure(shape: str, vocab_size: int, max_seq_len: int) -> dict:
    model = build_model(ModelSpec(config=shape, fused_layernorm="off"), vocab_size, max_seq_len)
    pruner = VariancePruner(model, VPConfig())
    buffer = pruner.step_sums.buffer
    layers = prunable_layers(model)
    parameters = sum(p.numel() for p in model.parameters())
    buffer_bytes = buffer.numel() * buffer.element_size()
    gradient_bytes = parameters * torch.finfo(torch.bfloat16).bits // 8
    return {
        "shape": shape, "vocab_size": vocab_size,
        "prunable_layers": len(layers), "prunable_rows": sum(layer.module.weight.shape[0] for layer in layers),
        "stats_values": buffer.numel(), "stats_dtype": str(buffer.dtype).removeprefix("torch."),
        "stats_MiB": round(buffer_bytes / MIB, 2),
        "parameters": parameters, "bf16_gradients_MiB": round(gradient_bytes / MIB, 1),
        "stats_over_gradients": round(buffer_bytes / gradient_bytes, 5),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", choices=sorted(PRESETS), default="bert-large")
    parser.add_argument("--vocab_size", type=positive_int, default=30522)
    parser.add_argument("--max_seq_len", type=positive_int, default=512)
    args = parser.parse_args()
    print(json.dumps(measure(args.shape, args.vocab_size, args.max_seq_len)))


if __name__ == "__main__":
    main()
