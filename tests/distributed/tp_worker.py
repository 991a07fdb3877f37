"""One DeepSpeed AutoTP run (tp x dp) of tiny-BERT MLM training with Variance Pruning (CPU, gloo).

Launched by `test_tensor_parallel.py`, never collected by pytest itself:

    DS_ACCELERATOR=cpu torchrun --nproc_per_node N tests/distributed/tp_worker.py --tp T \
        --stages 0 1 --out r.pt [--ckpt_dir DIR [--resume]]

N = T x dp ranks. Every run sees the same global batches: the global batch of step t is fixed by
t and split over the data-parallel ranks only (the T ranks of one TP group read the same chunk).
Every chunk has the same padding pattern, so the mean of the chunks' mean losses is the global
batch's mean loss. The model is masked, never squeezed. Rank 0 writes what every rank saw to --out.
"""
from __future__ import annotations

import argparse
import os
import sys
import time

import torch
import torch.distributed as dist

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.dirname(os.path.dirname(HERE))]

import deepspeed  # noqa: E402

from models import random_batch, tiny_model  # noqa: E402
from vp_dist import VariancePruner, VPConfig  # noqa: E402
from vp_dist.distributed import tensor_parallel_groups  # noqa: E402
from vp_dist.distributed.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402
from vp_dist.distributed.zero import get_full  # noqa: E402

GLOBAL_BATCH = 8
SEQ = 12
STEPS = 6
PAD_FROM = (12, 7) * (GLOBAL_BATCH // 2)  # every chunk of two sequences pads alike
VP = VPConfig(start=2, interval=2, increment=0.25, target=0.5, squeeze_at_target=False)  # prunes at 2, 4
ADAM_KEYS = ("exp_avg", "exp_avg_sq")
CHECKPOINT_STEP = 3  # saved once 3 steps are done: between the two prunings
TAG = "step3"


def ds_config(stage: int, tp: int, dp: int, dtype: str = "fp32") -> dict:
    config = {
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // dp,
        "gradient_accumulation_steps": 1,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "betas": [0.9, 0.999], "eps": 1e-6,
                                                  "weight_decay": 0.01, "torch_adam": True}},
        "zero_optimization": {"stage": stage},
        "steps_per_print": 10**9,
    }
    if tp > 1:
        config["tensor_parallel"] = {"autotp_size": tp}
    if dtype == "bf16":
        config["bf16"] = {"enabled": True}
    return config


def new_model():
    return tiny_model("bert-mlm", seed=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def train(stage: int, tp: int, ckpt_dir: str | None, dtype: str = "fp32") -> dict:
    world = dist.get_world_size()
    model = new_model()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=ds_config(stage, tp, world // tp, dtype))
    pruner = VariancePruner(engine, VP)  # after initialize: AutoTP replaced the linear layers
    return run_steps(engine, pruner, 0, ckpt_dir)


def resume(stage: int, tp: int, ckpt_dir: str) -> dict:
    """A fresh job resumed from the `CHECKPOINT_STEP` checkpoint of the same layout; first tries
    the checkpoint on a run without TP (the same ranks as dp), which must be refused."""
    world = dist.get_world_size()
    try:
        load_checkpoint(new_model(), ds_config(stage, 1, world), ckpt_dir, tag=TAG)
        refusal = None
    except ValueError as error:
        refusal = str(error)
    engine, pruner, _ = load_checkpoint(new_model(), ds_config(stage, tp, world // tp), ckpt_dir, tag=TAG)
    record = run_steps(engine, pruner, CHECKPOINT_STEP, None)
    record["refusal"] = refusal
    return record


def train_micro_batch(engine, pruner, step: int) -> torch.Tensor:
    """Forward (observed), backward and engine step on this dp rank's share of global batch
    `step` (every rank of a TP group reads the same share); returns the loss."""
    grid = tensor_parallel_groups()
    chunk = GLOBAL_BATCH // grid["dp_size"]
    batch = random_batch(batch=GLOBAL_BATCH, seq=SEQ, seed=1000 + step, pad_from=PAD_FROM)
    start = grid["dp_rank"] * chunk
    inputs = {key: value[start:start + chunk].to(engine.device) for key, value in batch.items()}
    with pruner.observe(inputs["attention_mask"]):
        loss = engine(**inputs).loss
    engine.backward(loss)
    engine.step()
    return loss


def run_steps(engine, pruner, first: int, ckpt_dir: str | None) -> dict:
    """Global steps `first`..STEPS-1; saves a checkpoint after step CHECKPOINT_STEP into ckpt_dir."""
    world = dist.get_world_size()
    grid = tensor_parallel_groups()
    assert grid["tp_size"] * grid["dp_size"] == world, grid
    losses, events = [], []
    for step in range(first, STEPS):
        if ckpt_dir is not None and step == CHECKPOINT_STEP:
            save_checkpoint(engine, pruner, ckpt_dir, TAG)
        loss = train_micro_batch(engine, pruner, step)
        event = pruner.step()
        if event is not None:
            events.append((event.step, event.newly_pruned, dict(event.kept_rows), event.ewmv))
        total = loss.detach().double().reshape(1)
        dist.all_reduce(total)  # TP ranks hold the same loss: the mean over all ranks is the dp mean
        losses.append(float(total) / world)
    return {"losses": losses, "events": events, "masks": pruner.masks(), "tp_rank": grid["tp_rank"],
            "pruned_rows": pruned_row_values(engine, pruner)}


def pruned_row_values(engine, pruner) -> dict:
    """Per layer, the largest |value| that this rank holds in pruned rows of its weight shard: the
    module copy, the fp32 master and each Adam moment (collective over the dp group at ZeRO >= 1;
    DeepSpeed's full fp32 accessors return this TP rank's shard)."""
    out = {}
    for index, layer in enumerate(pruner.layers):
        pruned = ~pruner.held_kept(index).cpu()
        weight = layer.module.weight
        values = {"module": weight.detach().cpu()[pruned].abs().max() if pruned.any() else torch.zeros(())}
        for key in (None, *ADAM_KEYS):
            full = get_full(weight, engine, key)
            values[key or "fp32"] = full.cpu()[pruned].abs().max() if pruned.any() else torch.zeros(())
        out[layer.name] = {k: float(v) for k, v in values.items()} | {"rows": int(pruned.sum()),
                                                                      "shape": tuple(weight.shape)}
    return out


def main(train=train, resume=resume, default_stage: int = 0, checkpoint_help: str = "save at step 3 (train), "
         "or resume from it (--resume)") -> None:
    """Run `train` (or `resume`) at each ZeRO stage on this rank; rank 0 saves every rank's results
    to --out. tp_squeeze_worker.py runs its own train/resume through this."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--stages", type=int, nargs="+", default=[default_stage])
    parser.add_argument("--ckpt_dir", help=checkpoint_help)
    parser.add_argument("--resume", action="store_true")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])
    args = parser.parse_args()
    deepspeed.init_distributed(dist_backend="gloo")
    torch.set_num_threads(1)
    results = {}
    for stage in args.stages:
        started = time.perf_counter()
        stage_dir = os.path.join(args.ckpt_dir, f"stage{stage}") if args.ckpt_dir else None
        results[stage] = resume(stage, args.tp, stage_dir) if args.resume else train(stage, args.tp, stage_dir, args.dtype)
        results[stage, "seconds"] = time.perf_counter() - started
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, results)
    if dist.get_rank() == 0:
        torch.save({"world_size": dist.get_world_size(), "tp": args.tp, "ranks": per_rank}, args.out)
    dist.barrier()


if __name__ == "__main__":
    main()
