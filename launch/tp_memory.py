#!/usr/bin/env python
"""Bytes per rank of a small BERT under DeepSpeed AutoTP, masked and squeezed (tensor parallelism, issue 15).

    DS_ACCELERATOR=cpu torchrun --standalone --nproc_per_node 4 launch/tp_memory.py --tp 2 --stage 0 [--squeeze]

One optimizer step with the pruner attached (50% pruned at step 1), then `partition_bytes` on every
rank ("masked"); with --squeeze the engine is then rebuilt around the squeezed model (tp > 1: the
balanced tensor-parallel squeezed layers) and counted again after one more step ("squeezed").
Rank 0 prints one JSON line. The README's TP table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

import deepspeed  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from transformers import BertConfig, BertForMaskedLM  # noqa: E402

from vp_dist import VariancePruner, VPConfig  # noqa: E402
from vp_dist.cli import positive_int  # noqa: E402
from vp_dist.distributed import partition_bytes, tensor_parallel_groups  # noqa: E402

GLOBAL_BATCH, SEQ = 8, 32


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tp", type=positive_int, default=2)
    parser.add_argument("--stage", type=int, choices=(0, 1, 2), default=0)
    parser.add_argument("--squeeze", action="store_true", help="also count after the squeeze")
    args = parser.parse_args()
    deepspeed.init_distributed("gloo" if deepspeed.get_accelerator().device_name() == "cpu" else "nccl")
    data_parallel = dist.get_world_size() // args.tp
    torch.manual_seed(0)
    model = BertForMaskedLM(BertConfig(vocab_size=8192, hidden_size=256, num_hidden_layers=4, num_attention_heads=4,
                                       intermediate_size=1024, max_position_embeddings=64))
    config = {"train_micro_batch_size_per_gpu": GLOBAL_BATCH // data_parallel, "gradient_accumulation_steps": 1,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
              "zero_optimization": {"stage": args.stage}, "steps_per_print": 10**9}
    if args.tp > 1:
        config["tensor_parallel"] = {"autotp_size": args.tp}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    pruner = VariancePruner(engine, VPConfig(start=1, interval=1, increment=0.5, target=0.5, squeeze_at_target=False))
    chunk = GLOBAL_BATCH // data_parallel
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, 8192, (chunk, SEQ), generator=generator).to(engine.device)
    attention_mask = torch.ones_like(input_ids)

    def train_step():
        with pruner.observe(attention_mask):
            loss = engine(input_ids=input_ids, attention_mask=attention_mask, labels=input_ids).loss
        engine.backward(loss)
        engine.step()
        pruner.step()

    def count() -> dict:
        counts = partition_bytes(engine, [layer.name for layer in pruner.layers])
        mine = {key: counts[key] for key in ("params_lp", "params_fp32", "gradients", "optimizer_states", "total")}
        mine["prunable_layers"] = sum(layer["total"] for layer in counts["layers"].values())
        return mine

    train_step()
    mine = {"masked": count()}
    if args.squeeze:
        engine = pruner.squeeze()
        train_step()
        mine["squeezed"] = count()
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, mine)
    if dist.get_rank() == 0:
        grid = tensor_parallel_groups()
        print(json.dumps({"tp": grid["tp_size"], "dp": grid["dp_size"], "zero_stage": args.stage,
                          "ranks": per_rank}))


if __name__ == "__main__":
    main()
