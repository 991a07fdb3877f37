"""One multi-process DeepSpeed run of tiny-BERT MLM training with Variance Pruning (CPU, gloo).

Launched by the tests next to it, never collected by pytest itself:

    DS_ACCELERATOR=cpu torchrun --nproc_per_node N tests/distributed/worker.py train --out r.pt \
        --stages 1 2 3 [--ckpt_dir DIR] [--variants squeeze squeeze_nofold shrink_nofold masked_nofold settings \
        emptied emptied_masked] \
        [--dtype fp32|bf16|fp16] [--persistent]
    ... worker.py resume --out r.pt --stages 1 2 3 --ckpt_dir DIR --tags step3 step6
    ... worker.py memory --out r.pt --stages 2     # BERT-base shape, peak memory around the rebuild
    ... worker.py held --out m.pt --stages 1 2 3     # bytes held per rank, dense vs squeezed

Every run sees the same global batches whatever N: the global batch of step t is fixed by t and is
split over ranks and micro-batches (N=1: one micro-batch; N=2: two ranks x two accumulated
micro-batches). Every chunk has the same padding pattern, so the mean of the chunks' mean losses
is the global batch's mean loss and 1-rank and 2-rank runs train the same model. Rank 0 writes
what every rank observed to --out (torch.save) for the test to assert on.
"""
from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import os
import sys
import time
import weakref

import torch
import torch.distributed as dist
import torch.nn as nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(HERE), os.path.dirname(os.path.dirname(HERE))]

import deepspeed  # noqa: E402
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state,  # noqa: E402
                             safe_get_local_fp32_param, safe_get_local_optimizer_state)

from helpers import allow_fp16_on_cpu  # noqa: E402
from models import random_batch, tiny_model  # noqa: E402
from vp_dist import SqueezedLinear, VariancePruner, VPConfig  # noqa: E402
from vp_dist.adapters import AttentionSite  # noqa: E402
from vp_dist.export import masked_model, squeezed_model  # noqa: E402
from vp_dist.distributed.rebuild import loss_scale  # noqa: E402
from vp_dist.squeeze import ResidualExpandOutput, count_parameters  # noqa: E402
from vp_dist.squeeze.attention import SqueezedBertAttention  # noqa: E402
from vp_dist.distributed import DataParallelReducer, partition_bytes  # noqa: E402
from vp_dist.distributed.memory import RebuildMemory  # noqa: E402
from vp_dist.distributed.zero import (basic_optimizer, flat_fp32_partitions, get_full,  # noqa: E402
                                     held_tensor_bytes)
from vp_dist.train.fused import fuse_layer_norms  # noqa: E402
from vp_dist.distributed.checkpoint import load_checkpoint, save_checkpoint  # noqa: E402

GLOBAL_BATCH = 8
SEQ = 12
STEPS = 8
PAD_FROM = (12, 7) * (GLOBAL_BATCH // 2)  # every chunk of two sequences pads alike
VP = VPConfig(start=2, interval=3, increment=0.25, target=0.5, squeeze_at_target=True)  # prunes at 2, 5
VARIANTS = {  # how the run ends its schedule
    "squeeze": VP,                                     # squeeze + FFN fold + attention shrink at step 5
    "squeeze_nofold": dataclasses.replace(VP, fold_ffn=False),              # squeeze, no fold, no shrink
    "shrink_nofold": VP,  # squeeze + attention shrink, FFN row-squeezed (its fold sites dropped, see `train`)
    "masked_nofold": dataclasses.replace(VP, squeeze_at_target=False, fold_ffn=False),  # never squeezed
    "settings": VP,  # squeeze + fold of a model with non-default settings (see `new_model`)
    "emptied": VP,  # squeeze + fold of a model two of whose layers lose every row (see `new_model`)
    "emptied_masked": dataclasses.replace(VP, squeeze_at_target=False),  # the same model, never squeezed
    # "squeeze" with each FFN's inner width padded with zero units; to a multiple of 12, as the tiny
    # model keeps 32 FFN rows per layer, a multiple of 8 already. Also head_widths="grouped": its heads
    # of 8 all pad to 8, so one group forms (tests/test_export.py's engine run forms several); here
    # the setting's way through the rebuild and the checkpoint is checked
    "squeeze_padded": dataclasses.replace(VP, pad_ffn=12, head_widths="grouped"),
}
CHECKPOINTED = {"squeeze": "", "squeeze_padded": "padded"}  # variant -> checkpoint folder inside the stage's
EMPTIED = ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.attention.self.query"]
CHECKPOINT_STEPS = {3: "step3", 6: "step6"}  # between the two prunings; after the squeeze


# fp16: a loss scale that grows every 2 steps from 2^8, so that by the squeeze it differs from a fresh one.
FP16 = {"enabled": True, "initial_scale_power": 8, "loss_scale_window": 2, "hysteresis": 2, "min_loss_scale": 1}


def ds_config(stage: int, world: int, dtype: str = "fp32", persistent: bool = False) -> dict:
    accumulation = 2 if world > 1 else 1
    zero = {"stage": stage}
    if stage == 3 and not persistent:
        # Every parameter partitioned, as in a large model; `persistent` keeps DeepSpeed's default
        # threshold, under which all of this tiny model's parameters stay gathered (persistent).
        zero["stage3_param_persistence_threshold"] = 0
    config = {
        "train_batch_size": GLOBAL_BATCH,
        "train_micro_batch_size_per_gpu": GLOBAL_BATCH // (world * accumulation),
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": 1.0,
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "betas": [0.9, 0.999], "eps": 1e-6,
                                                  "weight_decay": 0.01, "torch_adam": True}},
        "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": 2e-3,
                                                          "warmup_num_steps": 3, "total_num_steps": 40}},
        "zero_optimization": zero,
        "steps_per_print": 10**9,
    }
    if dtype == "bf16":
        config["bf16"] = {"enabled": True}
    elif dtype == "fp16":
        config["fp16"] = dict(FP16)
        allow_fp16_on_cpu()  # DeepSpeed's CPU gate; torch computes fp16 on any CPU
    return config


class StandInFusedLayerNorm(nn.LayerNorm):
    """Plays apex's FusedLayerNorm on CPU: another LayerNorm class the rebuilt model must keep."""


def new_model(variant: str = "squeeze"):
    """The tiny BERT; the `settings` variant with every setting a rebuild could lose changed from
    its default: fused LayerNorms, gradient checkpointing, eager attention; the `emptied` variant with
    the `EMPTIED` layers' weights scaled by 1e-3, so that their outputs have by far the lowest
    variances of their kinds and the global selection prunes every row of them at 50%."""
    if variant.startswith("emptied"):
        model = tiny_model("bert-mlm", seed=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
        with torch.no_grad():
            for name in EMPTIED:
                model.get_submodule(name).weight.mul_(1e-3)
        return model
    if variant != "settings":
        return tiny_model("bert-mlm", seed=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    model = tiny_model("bert-mlm", seed=0, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                       attn_implementation="eager")
    fuse_layer_norms(model, "on", layer_norm_class=StandInFusedLayerNorm)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return model


def model_settings(model) -> dict:
    """What a rebuild must keep of a model, read off the model itself."""
    blocks = [module for module in model.modules() if hasattr(module, "gradient_checkpointing")]
    return {"layer_norms": sorted({type(m).__name__ for m in model.modules() if isinstance(m, nn.LayerNorm)}),
            "gradient_checkpointing": bool(model.is_gradient_checkpointing),
            "blocks_checkpointing": sorted({bool(block.gradient_checkpointing) for block in blocks}),
            "attn_implementation": model.config._attn_implementation,
            "dtypes": sorted({str(p.dtype) for p in model.parameters()})}


def global_batch(step: int) -> dict:
    return random_batch(batch=GLOBAL_BATCH, seq=SEQ, seed=1000 + step, pad_from=PAD_FROM)


def train_step(engine, pruner, step: int):
    """One optimizer step over this rank's share of global batch `step`; returns (engine, loss, event,
    loss scale just before and just after `pruner.step()`, which may rebuild the engine)."""
    world, rank = dist.get_world_size(), dist.get_rank()
    accumulation = engine.gradient_accumulation_steps()
    chunk = GLOBAL_BATCH // (world * accumulation)
    batch = global_batch(step)
    loss_sum, event = torch.zeros((), dtype=torch.float64, device=engine.device), None
    for micro in range(accumulation):
        start = (micro * world + rank) * chunk
        inputs = {key: value[start:start + chunk].to(engine.device) for key, value in batch.items()}
        with pruner.observe(inputs["attention_mask"]):
            loss = engine(**inputs).loss
        engine.backward(loss)
        engine.step()
        scales = (loss_scale(engine),)
        event = pruner.step() or event
        engine = pruner.engine
        scales += (loss_scale(engine),)
        loss_sum += loss.detach().double()
    dist.all_reduce(loss_sum)
    return engine, float(loss_sum) / (world * accumulation), event, scales


def full_fp32(engine, param, key: str | None = None) -> torch.Tensor:
    """DeepSpeed's own view of the full fp32 master (key None) or optimizer state `key`; at ZeRO
    stage 0, where those helpers return None, the module parameter and the torch optimizer state."""
    value = safe_get_full_fp32_param(param) if key is None else safe_get_full_optimizer_state(param, key)
    return (value if value is not None else get_full(param, engine, key)).cpu()


def gather_module_param(engine, param) -> torch.Tensor:
    """The low-precision module parameter the forward reads, gathered at ZeRO-3."""
    with deepspeed.zero.GatheredParameters([param]):
        return param.detach().float().cpu().clone()


def largest(values: torch.Tensor) -> float:
    return float(values.abs().max()) if values.numel() else 0.0


def local_pruned_elements(param, pruned: torch.Tensor) -> torch.Tensor:
    """ZeRO-3: which elements of this rank's partition of `param` belong to pruned rows."""
    size = param.partition_numel()
    start = dist.get_rank(group=param.ds_process_group) * size
    row = torch.arange(start, start + size) // (param.ds_numel // param.ds_shape[0])
    inside = row < param.ds_shape[0]
    return pruned[row.clamp_max(param.ds_shape[0] - 1)] & inside


def partition_checks(engine, weight, pruned: torch.Tensor, worst: dict) -> None:
    """ZeRO-3, read on this rank's own partitions without gathering: is the weight partitioned
    (not a gathered persistent copy), and are its pruned rows zero in the low-precision partition,
    the fp32 master partition and both Adam moment partitions?"""
    if not hasattr(weight, "ds_id"):
        return
    split = weight.ds_tensor.numel() < weight.ds_numel or dist.get_world_size() == 1
    worst["partitioned_weights"] += int(weight.data.numel() == 0 and split)
    worst["gathered_weights"] += int(weight.data.numel() == weight.ds_numel)
    hit = local_pruned_elements(weight, pruned)
    worst["local_pruned_elements"] += int(hit.sum())
    local = {"local_module": weight.ds_tensor.detach().float().cpu(),
             "local_fp32": safe_get_local_fp32_param(weight).detach().cpu()}
    for key in ("exp_avg", "exp_avg_sq"):
        local[f"local_{key}"] = safe_get_local_optimizer_state(weight, key).detach().cpu()
    for place, values in local.items():
        worst[place] = max(worst[place], largest(values.reshape(-1)[:hit.numel()][hit]))


def row_checks(engine, pruner, newly_pruned: torch.Tensor | None, window_mean: torch.Tensor | None) -> dict:
    """SPEC 4 on this rank: pruned rows of the fp32 master, the module copy and the Adam moments
    (at ZeRO-3 also in this rank's own partitions); at a pruning step also the biases of the newly
    pruned rows against the window mean."""
    modules = dict(engine.module.named_modules())
    split = pruner.layout.split
    newly = dict(zip(pruner.masks(), split(newly_pruned))) if newly_pruned is not None else {}
    means = dict(zip(pruner.masks(), split(window_mean))) if window_mean is not None else {}
    worst = {"fp32": 0.0, "module": 0.0, "exp_avg": 0.0, "exp_avg_sq": 0.0, "bias_fp32_vs_mean": 0.0,
             "bias_module_vs_mean": 0.0,
             "pruned_rows": 0, "newly_pruned_rows": 0, "kept_rows_nonzero": 0, "kept_rows": 0,
             "partitioned_weights": 0, "gathered_weights": 0, "local_pruned_elements": 0, "local_module": 0.0,
             "local_fp32": 0.0, "local_exp_avg": 0.0, "local_exp_avg_sq": 0.0}
    for name, kept in pruner.masks().items():
        pruned = ~kept
        weight, bias = modules[name].weight, modules[name].bias
        partition_checks(engine, weight, pruned, worst)
        fp32 = full_fp32(engine, weight)
        module = gather_module_param(engine, weight)
        worst["pruned_rows"] += int(pruned.sum())
        worst["kept_rows"] += int(kept.sum())
        worst["kept_rows_nonzero"] += int((fp32[kept].abs().sum(1) > 0).sum())
        worst["fp32"] = max(worst["fp32"], largest(fp32[pruned]))
        worst["module"] = max(worst["module"], largest(module[pruned]))
        for key in ("exp_avg", "exp_avg_sq"):
            state = full_fp32(engine, weight, key)
            worst[key] = max(worst[key], largest(state[pruned]))
        bias_fp32 = full_fp32(engine, bias).double()
        bias_module = gather_module_param(engine, bias).double()
        if name in newly and bool(newly[name].any()):
            rows, mean = newly[name], means[name][newly[name]]
            worst["newly_pruned_rows"] += int(rows.sum())
            for kind, value in (("bias_fp32_vs_mean", bias_fp32), ("bias_module_vs_mean", bias_module)):
                error = (value[rows] - mean).abs() / mean.abs().clamp_min(1e-3)
                worst[kind] = max(worst[kind], float(error.max()))
    return worst


def full_parameters(engine, key: str | None = None) -> dict:
    """Full fp32 masters (key None) or optimizer state `key` of every (trainable, for a key) parameter."""
    return {name: full_fp32(engine, param, key).detach().clone() for name, param in engine.module.named_parameters()
            if key is None or param.requires_grad}


def masked_view(engine, key: str | None = None) -> dict:
    """`full_parameters`, each squeezed weight scattered back to its masked [d_out, d_in] shape."""
    params = full_parameters(engine, key)
    for name, module in engine.module.named_modules():
        if isinstance(module, SqueezedLinear) and f"{name}.weight" in params:  # else emptied: a buffer
            weight = params[f"{name}.weight"]
            full = torch.zeros(module.out_features, weight.shape[1], dtype=weight.dtype)
            full[module.kept_rows.cpu()] = weight
            params[f"{name}.weight"] = full
    return params


def run_steps(engine, pruner, first: int, record: dict, ckpt_dir: str | None) -> None:
    layer_names = [layer.name for layer in pruner.layers]
    for step in range(first, STEPS + 1):
        squeezed_before, kept_before = pruner.squeezed, pruner.kept.clone()
        if not squeezed_before and pruner.schedule.is_finished(step) and pruner.config.squeeze_at_target:
            record["bytes_dense"] = partition_bytes(engine, layer_names)
        engine, loss, event, scales = train_step(engine, pruner, step)
        record["losses"][step] = loss
        record["loss_scales"][step] = scales
        if event is not None:
            record["events"][step] = {"kept": pruner.kept.cpu().clone(), "ewmv": event.ewmv.clone(),
                                      "window_mean": event.window_mean.clone(), "sparsity": event.sparsity}
        if event is not None and pruner.schedule.is_finished(pruner.steps_done):
            # Right after the final pruning, squeezed or not: masters and moments in masked shapes.
            record["at_final_pruning"] = {key or "params": masked_view(engine, key)
                                          for key in (None, "exp_avg", "exp_avg_sq")}
        if pruner.squeezed and not squeezed_before:
            record["bytes_squeezed"] = partition_bytes(engine, layer_names)
            record["settings_after"] = model_settings(engine.module)
            record["squeezed_at"] = step
            record["emptied_after"] = sorted(name for name, module in engine.module.named_modules()
                                             if isinstance(module, SqueezedLinear) and module.kept_rows.numel() == 0
                                             or is_shrunk_projection(module) and not bool(module.mask.any()))
            record["attention_blocks_after"] = sorted(name for name, module in engine.module.named_modules()
                                                      if isinstance(module, SqueezedBertAttention))
            record["residual_blocks_after"] = sorted(name for name, module in engine.module.named_modules()
                                                     if isinstance(module, ResidualExpandOutput))
            record["origins"] = dict(pruner.last_origins)
            record["squeezed_numel"] = count_parameters(engine.module)
            record["float_dtypes_after"] = sorted({str(t.dtype) for t in (*engine.module.parameters(),
                                                                          *engine.module.buffers())
                                                   if t.is_floating_point()})
        elif not pruner.squeezed and (event is not None or any(not bool(k.all()) for k in pruner.masks().values())):
            newly = (kept_before & ~pruner.kept).cpu() if event is not None else None
            record["checks"][step] = row_checks(engine, pruner, newly, event.window_mean if event else None)
        if pruner.squeezed and "bytes_squeezed" in record and step == record["squeezed_at"] + 1:
            record["bytes_squeezed_after_step"] = partition_bytes(engine, layer_names)
        if ckpt_dir is not None and step in CHECKPOINT_STEPS:
            save_checkpoint(engine, pruner, ckpt_dir, tag=CHECKPOINT_STEPS[step], client_state={"next_step": step + 1})
    record["final_kept"] = pruner.kept.cpu().clone()
    record["final_params"] = full_parameters(engine)
    record["final_masked_view"] = masked_view(engine)
    record["global_steps"] = engine.global_steps
    record["lr"] = engine.get_lr()[0]
    if pruner.squeezed:
        record["exports"] = export_errors(engine, pruner)


def is_shrunk_projection(module) -> bool:
    """query, key, value or attn_out inside a `SqueezedBertAttention` (holds its full-size `mask`)."""
    return hasattr(module, "mask") and hasattr(module, "weight") and not isinstance(module, SqueezedLinear)


@torch.no_grad()
def export_errors(engine, pruner) -> dict:
    """Largest |logit difference| of both exports of the squeezed engine's model (built on every
    rank: collective at ZeRO-3) against the engine itself, on a padded batch in eval."""
    batch = global_batch(100)
    engine.module.eval()
    reference = engine(**{key: value.to(engine.device) for key, value in batch.items()}).logits.float().cpu()
    errors = {}
    for kind, export in (("masked", lambda: masked_model(pruner)[0]), ("squeezed", lambda: squeezed_model(pruner))):
        model = export().float().eval()
        logits = model(**batch).logits
        valid = batch["attention_mask"].bool()
        errors[kind] = float((logits - reference)[valid].abs().max())
        errors[f"{kind}_blocks"] = sum(isinstance(m, SqueezedBertAttention) for m in model.modules())
        errors[f"{kind}_residual_blocks"] = sum(isinstance(m, ResidualExpandOutput) for m in model.modules())
    errors["scale"] = float(reference.abs().max())
    engine.module.train()
    return errors


def new_record() -> dict:
    return {"losses": {}, "events": {}, "checks": {}, "loss_scales": {}}


def train(stage: int, variant: str, ckpt_dir: str | None, dtype: str, persistent: bool) -> dict:
    model = new_model(variant)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                      config=ds_config(stage, dist.get_world_size(), dtype, persistent))
    pruner = VariancePruner(engine, VARIANTS[variant])
    if variant == "shrink_nofold":  # the attention shrink alone: the squeeze applies `pruner.folds`
        pruner.folds = [site for site in pruner.folds if isinstance(site, AttentionSite)]
    record = new_record()
    record["settings_before"] = model_settings(engine.module)
    record["layer_shapes"] = {layer.name: tuple(getattr(layer.module.weight, "ds_shape", layer.module.weight.shape))
                              for layer in pruner.layers}
    record["dense_numel"] = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                for p in engine.module.parameters())
    run_steps(engine, pruner, 1, record, ckpt_dir)
    return record


def variant_checkpoints(stage_dir: str, variant: str) -> str:
    """Where the `variant` run of a stage writes its checkpoints (`CHECKPOINTED`)."""
    return os.path.join(stage_dir, CHECKPOINTED[variant]) if CHECKPOINTED[variant] else stage_dir


def resume(stage: int, ckpt_dir: str, tag: str) -> dict:
    engine, pruner, client_state = load_checkpoint(new_model(), ds_config(stage, dist.get_world_size()), ckpt_dir, tag)
    record = new_record()
    record["resumed_at"] = client_state["next_step"]
    record["resumed_global_steps"] = engine.global_steps
    record["resumed_squeezed"] = pruner.squeezed
    record["resumed_attention_blocks"] = sorted(name for name, module in engine.module.named_modules()
                                                if isinstance(module, SqueezedBertAttention))
    record["resumed_residual_blocks"] = sorted(name for name, module in engine.module.named_modules()
                                               if isinstance(module, ResidualExpandOutput))
    run_steps(engine, pruner, client_state["next_step"], record, None)
    return record


def memory(stage: int, ds_config_pattern: str) -> dict:
    """BERT-base width, 6 layers (vocab 8,192), 2 sequences of 64 tokens per rank, the shipped DeepSpeed
    config of `stage` (`ds_config_pattern`; CPU: fp32): pruned at steps 1 and 2 to 50%, squeezed as `vp_dist.train.loop`
    does, 2 more steps. This rank's peaks (`RebuildMemory`) and bytes before and after."""
    import json
    from transformers import BertConfig, BertForMaskedLM
    from vp_dist.train.model import PRESETS
    world = dist.get_world_size()
    torch.manual_seed(0)
    # BERT-base width, 6 of its 12 layers: the suite's time; launch/rebuild_memory.py runs all 12.
    model = BertForMaskedLM(BertConfig(vocab_size=8192, **{**PRESETS["bert-base"], "num_hidden_layers": 6}))
    with open(os.path.join(os.path.dirname(os.path.dirname(HERE)), ds_config_pattern.format(stage=stage))) as f:
        config = json.load(f)
    config.update(train_batch_size=2 * world, train_micro_batch_size_per_gpu=2, gradient_accumulation_steps=1)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    del model
    pruner = VariancePruner(engine, VPConfig(start=1, interval=1, increment=0.25, target=0.5, squeeze_at_target=False))
    probe = RebuildMemory(engine.device, after_steps=2)
    record = {}
    for step in range(1, 5):
        batch = {key: value.to(engine.device) for key, value in
                 random_batch(batch=2, seq=64, seed=100 * step + dist.get_rank(), pad_from=(64, 48)).items()}
        with pruner.observe(batch["attention_mask"]):
            loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        event = pruner.step()
        if probe.pending and (figures := probe.step_done()) is not None:
            record.update(figures)
        if event is not None and pruner.schedule.is_finished(pruner.steps_done):
            record["bytes_dense"] = partition_bytes(engine)["total"]
            engine = probe.rebuild(pruner)
            record["bytes_squeezed"] = partition_bytes(engine)["total"]
        record.setdefault("losses", []).append(float(loss))
    return record


# ---------------------------------------------------------------------- memory held per rank
MEMORY_VP = VPConfig(start=2, interval=1, increment=0.5, target=0.5, squeeze_at_target=True)  # prunes to 50% and squeezes at step 2
MEMORY_STEPS = {2: "dense", 4: "squeezed"}  # measured steps: the optimizer state exists at both


def memory_model():
    """A small BERT (12.6M parameters, 50 MB in fp32): its training state dwarfs allocator noise."""
    return tiny_model("bert-mlm", seed=0, hidden_size=512, num_attention_heads=8, intermediate_size=2048,
                      num_hidden_layers=4, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def rss_bytes(field: str) -> int:
    """VmRSS (now) or VmHWM (peak since the last `reset_peak_rss`) of this process, in bytes."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def release_freed_memory() -> None:
    """Collect garbage and hand the C heap's free pages back to the OS (glibc keeps them otherwise,
    so RSS would stay at its high-water mark after the dense engine is freed), then reset VmHWM."""
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")  # Linux: reset VmHWM (peak RSS) to the current RSS


def measured_memory_step(engine, pruner, step: int, record: dict):
    """train_step, measuring a `MEMORY_STEPS` step: bytes held between the last backward and the
    optimizer step (gradient buffers full), as measured (`held_tensor_bytes`) and as counted
    (`partition_bytes`), and the process's peak RSS over the step. Returns the engine to go on with."""
    world, rank = dist.get_world_size(), dist.get_rank()
    accumulation = engine.gradient_accumulation_steps()
    chunk = GLOBAL_BATCH // (world * accumulation)
    batch, label = global_batch(step), MEMORY_STEPS.get(step)
    release_freed_memory()
    rss_at_start = rss_bytes("VmRSS")
    for micro in range(accumulation):
        start = (micro * world + rank) * chunk
        inputs = {key: value[start:start + chunk] for key, value in batch.items()}
        with pruner.observe(inputs["attention_mask"]):
            loss = engine(**inputs).loss
        engine.backward(loss)
        if label:  # after each backward: gradients accumulate (stages 0-1) or sit in partitions (2-3)
            record.setdefault(label, {"held": []})["held"].append(held_tensor_bytes(engine))
        engine.step()
        if label and micro == accumulation - 1:
            record[label].update(partition=partition_bytes(engine), rss_at_start=rss_at_start,
                                 peak_rss=rss_bytes("VmHWM"))
        old_state = [weakref.ref(t) for t in flat_fp32_partitions(engine)]  # dead once the engine is freed
        old_state += [weakref.ref(v) for state in basic_optimizer(engine).state.values()
                      for v in state.values() if torch.is_tensor(v)]
        pruner.step()
        if pruner.engine is not engine:
            record["squeezed_at"] = step
            record["squeeze_peak_rss"] = rss_bytes("VmHWM")  # old and new engine side by side, briefly
            record["old_state"] = old_state  # weak references, read by `memory` once this frame is gone
            engine = pruner.engine
    return engine


def held_memory(stage: int) -> dict:
    model = memory_model()
    # only the engine is kept: the optimizer that `initialize` also returns would keep the dense
    # engine alive after the squeeze (the optimizer's backward hooks hold the engine)
    engine = deepspeed.initialize(model=model, model_parameters=model.parameters(),
                                  config=ds_config(stage, dist.get_world_size()))[0]
    pruner = VariancePruner(engine, MEMORY_VP)
    record = {"dense_numel": sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel() for p in model.parameters())}
    del model
    for step in range(1, max(MEMORY_STEPS) + 1):
        engine = measured_memory_step(engine, pruner, step, record)
        if "old_state" in record:  # just squeezed: nothing should hold the dense engine's state any more
            gc.collect()
            old_state = record.pop("old_state")
            record["old_state_tensors"] = len(old_state)
            record["old_state_tensors_alive"] = sum(ref() is not None for ref in old_state)
    record["squeezed_numel"] = sum(p.ds_numel if hasattr(p, "ds_numel") else p.numel()
                                   for p in engine.module.parameters())
    return record


def print_held_memory(per_rank: list[dict], stages: list[int]) -> None:
    """The figures the README quotes: per rank, dense -> squeezed, in MiB."""
    def mib(value: int) -> str:
        return f"{value / 2**20:,.1f}"

    for stage in stages:
        for rank, results in enumerate(per_rank):
            record = results[stage, "held"]
            dense, squeezed = record["dense"], record["squeezed"]
            held = [max(h["total"] for h in moment["held"]) for moment in (dense, squeezed)]
            print(f"ZeRO-{stage} rank {rank}: partition_bytes {mib(dense['partition']['total'])} -> "
                  f"{mib(squeezed['partition']['total'])} MiB; held tensors (largest in a step) {mib(held[0])} -> "
                  f"{mib(held[1])} MiB; peak RSS over a step {mib(dense['peak_rss'])} -> {mib(squeezed['peak_rss'])} "
                  f"MiB; dense engine's state tensors still alive: {record['old_state_tensors_alive']} of "
                  f"{record['old_state_tensors']}", flush=True)


def provoke_mask_mismatch() -> str | None:
    """Hand the reducer masks that differ on the last rank; return the error it raised, if any."""
    kept = torch.ones(448, dtype=torch.bool)
    if dist.get_rank() == dist.get_world_size() - 1:
        kept[[3, 200]] = False
    try:
        DataParallelReducer().check_identical(kept)
    except RuntimeError as error:
        return str(error)
    return None


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("scenario", choices=["train", "resume", "memory", "held"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--stages", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--ckpt_dir")
    parser.add_argument("--tags", nargs="+", default=[])
    parser.add_argument("--variants", nargs="+", default=["squeeze"], choices=list(VARIANTS))
    parser.add_argument("--resume_variant", default="squeeze", choices=list(CHECKPOINTED),
                        help="resume: whose checkpoints (the train variants that write them)")
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    parser.add_argument("--ds_config_pattern", default="ds_configs/zero{stage}_cpu.json", help="memory scenario")
    parser.add_argument("--persistent", action="store_true", help="ZeRO-3: keep the default persistence threshold")
    args = parser.parse_args()
    on_gpu = os.environ.get("DS_ACCELERATOR") == "cuda"  # see conftest: VP_DIST_TEST_DEVICE=cuda
    deepspeed.init_distributed(dist_backend="nccl" if on_gpu else "gloo")
    if on_gpu:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        # Runs compared bit for bit must not differ by atomics (warn only: index_add has no such kernel).
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.set_num_threads(1)
    results = {}
    for stage in args.stages:
        started = time.perf_counter()
        stage_dir = os.path.join(args.ckpt_dir, f"stage{stage}") if args.ckpt_dir else None
        if args.scenario == "held":
            results[stage, "held"] = held_memory(stage)
        elif args.scenario == "train":
            for variant in args.variants:
                checkpoints = variant_checkpoints(stage_dir, variant) if stage_dir and variant in CHECKPOINTED else None
                results[stage, variant] = train(stage, variant, checkpoints, args.dtype, args.persistent)
        elif args.scenario == "memory":
            results[stage, "memory"] = memory(stage, args.ds_config_pattern)
        else:
            for tag in args.tags:
                results[stage, tag] = resume(stage, variant_checkpoints(stage_dir, args.resume_variant), tag)
        results[stage, "seconds"] = time.perf_counter() - started
    if args.scenario == "train" and dist.get_world_size() > 1:
        results["mismatch_error"] = provoke_mask_mismatch()
    per_rank = [None] * dist.get_world_size()
    dist.all_gather_object(per_rank, results)
    if dist.get_rank() == 0:
        torch.save({"world_size": dist.get_world_size(), "ranks": per_rank}, args.out)
        if args.scenario == "held":
            print_held_memory(per_rank, args.stages)
    dist.barrier()


if __name__ == "__main__":
    main()
