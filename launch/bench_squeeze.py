#!/usr/bin/env python
"""Training-step time of a dense BERT against the same BERT squeezed at 50% row sparsity.

Both models are built, masked and timed side by side in one run (interleaved repetitions, so
drift in machine load hits both alike). Prints a JSON line with the median step times, their
ratio and the parameter/optimizer bytes of each. Example:

    python launch/bench_squeeze.py --hidden 256 --layers 4 --batch 16 --seq 128 --repeats 10
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
import statistics
import time

import torch
from transformers import BertConfig, BertForMaskedLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # runnable from a checkout

from vp_dist.adapters import fold_sites, prunable_layers  # noqa: E402
from vp_dist.squeeze import count_parameters, squeeze_model  # noqa: E402


def random_half_masks(model, seed: int) -> dict[str, torch.Tensor]:
    """Exactly half the rows of every prunable layer pruned (which rows does not matter for speed)."""
    g = torch.Generator().manual_seed(seed)
    masks = {}
    for layer in prunable_layers(model):
        rows = layer.module.weight.shape[0]
        kept = torch.zeros(rows, dtype=torch.bool)
        kept[torch.randperm(rows, generator=g)[: rows // 2]] = True
        masks[layer.name] = kept
    return masks


def optimizer_bytes(optimizer) -> int:
    return sum(t.numel() * t.element_size() for s in optimizer.state.values() for t in s.values()
               if isinstance(t, torch.Tensor))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: leave the default)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    config = BertConfig(vocab_size=8192, hidden_size=args.hidden, num_hidden_layers=args.layers,
                        num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
                        max_position_embeddings=max(512, args.seq))
    torch.manual_seed(0)
    dense = BertForMaskedLM(config).to(args.device)
    squeezed = BertForMaskedLM(config).to(args.device)
    squeezed.load_state_dict(dense.state_dict())
    squeeze_model(squeezed, {k: v.to(args.device) for k, v in random_half_masks(squeezed, 0).items()},
                  fold_sites(squeezed))

    g = torch.Generator().manual_seed(1)
    input_ids = torch.randint(5, config.vocab_size, (args.batch, args.seq), generator=g).to(args.device)
    batch = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}
    models = {"dense": dense, "squeezed": squeezed}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-4) for name, m in models.items()}
    times: dict[str, list[float]] = {name: [] for name in models}

    def train_step(name: str) -> float:
        model, optimizer = models[name], optimizers[name]
        if args.device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if args.device == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - start

    for _ in range(args.warmup):
        for name in models:
            train_step(name)
    for _ in range(args.repeats):
        for name in models:  # interleaved: dense, squeezed, dense, ...
            times[name].append(train_step(name))

    prunable = {name: sum(l.module.weight.numel() + l.module.bias.numel() for l in prunable_layers(m))
                for name, m in models.items()}
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "benchmark": "train_step_dense_vs_squeezed",
        "device": args.device, "threads": torch.get_num_threads(),
        "shape": {"hidden": args.hidden, "layers": args.layers, "batch": args.batch, "seq": args.seq},
        "sparsity": 0.5, "repeats": args.repeats,
        "median_step_s": {k: round(v, 5) for k, v in median.items()},
        "squeezed_over_dense_time": round(median["squeezed"] / median["dense"], 3),
        "parameters": {name: count_parameters(m) for name, m in models.items()},
        "prunable_layer_parameters": prunable,
        "optimizer_state_bytes": {name: optimizer_bytes(o) for name, o in optimizers.items()},
    }
    print(json.dumps(result))


if __name__ == "__main__":
    main()
