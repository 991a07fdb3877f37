"""One run of tiny-BERT MLM training squeezed at the final pruning under tensor parallelism (CPU, gloo).

Launched by `test_tensor_parallel_squeeze.py`, never collected by pytest itself:

    DS_ACCELERATOR=cpu torchrun --nproc_per_node N tests/distributed/tp_squeeze_worker.py --tp T \
        --stages 1 --out r.pt [--ckpt_dir DIR [--resume]]

The schedule of `tp_worker.py` (prunings at steps 2 and 4, 50%) with `squeeze_at_target`: after
step 4 the engine is rebuilt (tp 1: the data-parallel rebuild, the reference; tp > 1: balanced
tensor-parallel squeezed layers, a tp x dp engine), and steps 5..STEPS-1 train the squeezed model;
with --ckpt_dir a checkpoint is saved after step 6, and --resume continues a fresh job from it.
Dropout 0: replicated regions would need the same dropout masks on every rank of a TP group.
Rank 0 writes what every rank saw to --out.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.distributed as dist

import deepspeed
import tp_worker
from tp_worker import SEQ, VP, ds_config, new_model

from models import random_batch
from vp_dist import VariancePruner
from vp_dist.distributed import partition_bytes, tensor_parallel_groups
from vp_dist.distributed.checkpoint import load_checkpoint, save_checkpoint
from vp_dist.export.exporters import masked_model, squeezed_model

STEPS = 8
CHECKPOINT_STEP = 6  # saved once 6 steps are done: two steps after the squeeze
TAG = "step6"
SQUEEZE_VP = dataclasses.replace(VP, squeeze_at_target=True)
EVAL_BATCH = dict(batch=4, seq=SEQ, seed=99, pad_from=(12, 9, 5, 3))


def layer_shapes(pruner) -> dict:
    """Per prunable layer: its class, this rank's weight shape and kept rows (a zero-size weight
    is held as a buffer)."""
    out = {}
    for layer in pruner.layers:
        module = layer.module
        kept = getattr(module, "kept_rows", None)
        out[layer.name] = {"class": type(module).__name__, "weight": tuple(module.weight.shape),
                           "bias": tuple(module.bias.shape), "kept_rows": None if kept is None else kept.numel(),
                           "tensor_model_parallel": {name: bool(getattr(param, "tensor_model_parallel", False))
                                                     for name, param in module.named_parameters()}}
    return out


def eval_logits(engine) -> torch.Tensor:
    batch = {k: v.to(engine.device) for k, v in random_batch(**EVAL_BATCH).items()}
    engine.module.eval()
    with torch.no_grad():
        logits = engine.module(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    engine.module.train()
    return logits.float().cpu()


def train(stage: int, tp: int, ckpt_dir: str | None, dtype: str = "fp32") -> dict:
    world = dist.get_world_size()
    model = new_model()
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=ds_config(stage, tp, world // tp, dtype))
    pruner = VariancePruner(engine, SQUEEZE_VP)
    return run_steps(engine, pruner, 0, ckpt_dir)


def resume(stage: int, tp: int, ckpt_dir: str) -> dict:
    """A fresh job resumed from the checkpoint written after the squeeze, on the same layout."""
    world = dist.get_world_size()
    engine, pruner, _ = load_checkpoint(new_model(), ds_config(stage, tp, world // tp), ckpt_dir, tag=TAG)
    record = run_steps(engine, pruner, CHECKPOINT_STEP, None)
    record["shapes_resumed"] = record.pop("shapes_at_start")
    return record


def run_steps(engine, pruner, first: int, ckpt_dir: str | None) -> dict:
    """Global steps `first`..STEPS-1; saves a checkpoint once CHECKPOINT_STEP steps are done."""
    world = dist.get_world_size()
    grid = tensor_parallel_groups()
    losses = []
    record = {"tp_rank": grid["tp_rank"], "dp_rank": grid["dp_rank"], "shapes_at_start": layer_shapes(pruner)}
    for step in range(first, STEPS):
        if ckpt_dir is not None and step == CHECKPOINT_STEP:
            save_checkpoint(engine, pruner, ckpt_dir, TAG)
        loss = tp_worker.train_micro_batch(engine, pruner, step)
        if pruner.squeezed is False and pruner.schedule.is_finished(pruner.steps_done + 1):
            record["bytes_before"] = partition_bytes(engine)
            record["shapes_before"] = layer_shapes(pruner)
        pruner.step()
        if pruner.engine is not engine:  # squeezed at this step
            engine = pruner.engine
            record["bytes_after"] = partition_bytes(engine)
            record["shapes_after"] = layer_shapes(pruner)
            record["logits_squeezed"] = eval_logits(engine)
            record["squeezed_at"] = step + 1
        total = loss.detach().double().reshape(1)
        dist.all_reduce(total)  # TP ranks hold the same loss: the mean over all ranks is the dp mean
        losses.append(float(total) / world)
    record["losses"] = losses
    record["masks"] = pruner.masks()
    record["logits_final"] = eval_logits(engine)
    if first == 0:  # the exports (collective): full-size masked and compact squeezed, as one model
        exported, _ = masked_model(pruner)
        record["logits_export_masked"] = plain_logits(exported)
        record["logits_export_squeezed"] = plain_logits(squeezed_model(pruner))
    return record


def plain_logits(model) -> torch.Tensor:
    batch = random_batch(**EVAL_BATCH)
    with torch.no_grad():
        return model.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()


if __name__ == "__main__":
    tp_worker.main(train, resume, default_stage=1,
                   checkpoint_help="save after step 6 (train), or resume from it (--resume)")
