"""Re-partitioning after the squeeze (SPEC 5): a new DeepSpeed engine around the smaller model.

The squeezed parameters replace the masked ones: a dense copy of the model is assembled from the
full fp32 masters (gathered from the ZeRO partitions), squeezed, and handed to `deepspeed.initialize`
with the old engine's configuration and parameter groups; ZeRO partitions it afresh, so weights,
gradients and optimizer states per rank shrink with the matrices. Then the fp32 masters are set
from the squeezed fp32 copy (exact also under bf16), each Adam moment is carried row by row
(`old[rows][:, cols]`), and the optimizer step count, the LR scheduler position, the param groups'
hyperparameters, the loss scale, the batch sizes and the engine's step counters move over.
Nothing is reset.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import json
import logging
import os

import deepspeed
import torch
import torch.nn as nn

from ..pruner import prepare_model
from ..squeeze import ParamOrigin, squeeze_model
from .zero import (basic_optimizer, full_shape, get_full, optimizer_state_keys, partition_bytes,
                   set_full, zero_stage)

logger = logging.getLogger(__name__)

ENGINE_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")
LOSS_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


# ---------------------------------------------------------------------- what built the engine
def engine_config(engine) -> dict:
    """A copy of the DeepSpeed config dict the engine was built with (also from a JSON path)."""
    if isinstance(engine.config, dict):
        return copy.deepcopy(engine.config)
    if isinstance(engine.config, (str, os.PathLike)):
        with open(engine.config) as handle:
            return json.load(handle)
    return copy.deepcopy(engine._config._param_dict)


def engine_factories(engine):
    """(optimizer, lr_scheduler) arguments that make `deepspeed.initialize` build the same kinds
    for new parameters: None where the config builds them, a callable where the client did."""
    optimizer = engine.client_optimizer
    if isinstance(optimizer, torch.optim.Optimizer):
        kind, defaults = type(optimizer), dict(optimizer.defaults)
        optimizer = lambda params: kind(params, **defaults)  # noqa: E731
    scheduler = engine.client_lr_scheduler
    if scheduler is not None and hasattr(scheduler, "state_dict"):
        raise ValueError(
            "the engine was given an LR scheduler instance, which cannot follow the squeezed engine's new "
            "optimizer: pass deepspeed.initialize(lr_scheduler=lambda optimizer: ...) or a `scheduler` "
            "section in the DeepSpeed config")
    return optimizer, scheduler


def flat_groups(engine) -> list[tuple[torch.Tensor, int]]:
    """(tensor keyed in the basic optimizer's state, its param group index) on this rank."""
    optimizer = engine.optimizer
    if hasattr(optimizer, "fp32_partitioned_groups_flat"):
        return [(flat, optimizer.sub_group_to_group_id[index])
                for index, flat in enumerate(optimizer.fp32_partitioned_groups_flat)]
    for attribute in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition"):
        if hasattr(optimizer, attribute):
            return [(flat, index) for index, flat in enumerate(getattr(optimizer, attribute))]
    return [(param, index) for index, group in enumerate(basic_optimizer(engine).param_groups)
            for param in group["params"]]


def param_groups_of(engine) -> dict[int, int]:
    """id(module parameter) -> index of its optimizer param group."""
    optimizer = engine.optimizer
    if hasattr(optimizer, "fp16_groups") and hasattr(optimizer, "sub_group_to_group_id"):
        return {id(p): optimizer.sub_group_to_group_id[index]
                for index, group in enumerate(optimizer.fp16_groups) for p in group}
    for attribute in ("bit16_groups", "bf16_groups"):
        if hasattr(optimizer, attribute):
            return {id(p): index for index, group in enumerate(getattr(optimizer, attribute)) for p in group}
    return {id(p): index for index, group in enumerate(basic_optimizer(engine).param_groups)
            for p in group["params"]}


# ---------------------------------------------------------------------- dense fp32 copy
def _full_value(engine, param: nn.Parameter) -> torch.Tensor:
    """The full fp32 value of a module parameter on every rank (collective at ZeRO >= 1)."""
    if param.requires_grad:
        value = get_full(param, engine)
    elif hasattr(param, "ds_id"):
        with deepspeed.zero.GatheredParameters([param]):
            value = param.data.float().clone()
    else:
        value = param.detach().float()
    return value.detach().reshape(full_shape(param)).cpu().clone()


def _aliases(module: nn.Module) -> list[list[str]]:
    by_param: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(param), []).append(name)
    return sorted(sorted(names) for names in by_param.values())


def dense_fp32_copy(engine, config=None) -> nn.Module:
    """A plain fp32 copy of the engine's Hugging Face model on CPU, from the full fp32 masters.

    Built from the model's config on the meta device (no initialisation cost), with the same
    biases VP added and the same tied weights; every parameter and buffer is then copied.
    Collective: every rank calls it.
    """
    module = engine.module
    if not hasattr(module, "config"):
        raise TypeError(f"{type(module).__name__} has no `config`: the squeezed engine is rebuilt from a "
                        "Hugging Face model's config")
    with torch.device("meta"):
        dense = type(module)(copy.deepcopy(module.config))
    prepare_model(dense, config)  # the biases VP gave bias-free layers
    dense.to_empty(device="cpu")
    if hasattr(dense, "tie_weights"):
        dense.tie_weights()
    if _aliases(dense) != _aliases(module):
        raise RuntimeError(f"rebuilding {type(module).__name__} from its config did not reproduce its "
                           "parameters and tied weights")
    targets = dict(dense.named_parameters())
    with torch.no_grad():
        for name, param in module.named_parameters():
            targets[name].copy_(_full_value(engine, param))
        buffers = dict(dense.named_buffers())
        for name, buffer in module.named_buffers():
            buffers[name].copy_(buffer.detach().cpu())
    return dense.train(module.training)


# ---------------------------------------------------------------------- optimizer state
def _seed_optimizer_state(new_engine, old_engine) -> None:
    """Give the new engine's optimizer the old one's state layout (zeros, old step count).

    ZeRO creates optimizer state lazily at the first step; the moments carried over need somewhere
    to go now. Per-element tensors become zeros of the new flat size; everything else (the step
    count of torch's AdamW) is copied, which keeps Adam's bias correction where it was.
    """
    old_state = basic_optimizer(old_engine).state
    templates: dict[int, tuple[torch.Tensor, dict]] = {}
    for flat, group in flat_groups(old_engine):
        if group not in templates and old_state.get(flat):
            templates[group] = (flat, old_state[flat])
    new_state = basic_optimizer(new_engine).state
    for flat, group in flat_groups(new_engine):
        if new_state.get(flat) or group not in templates:
            continue
        template_flat, template = templates[group]
        new_state[flat] = {
            key: (torch.zeros(flat.shape, dtype=value.dtype, device=flat.device)
                  if torch.is_tensor(value) and value.shape == template_flat.shape
                  else value.clone() if torch.is_tensor(value) else copy.deepcopy(value))
            for key, value in template.items()}
    if hasattr(new_engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
        # ZeRO 1/2 and BF16 link each parameter's state fragments after their first step; link now.
        new_engine.optimizer._lazy_init_hp_params_optimizer_state()


def _slice(value: torch.Tensor, origin: ParamOrigin) -> torch.Tensor:
    if origin.rows is not None:
        value = value[origin.rows.cpu()]
    if origin.cols is not None:
        value = value[:, origin.cols.cpu()]
    return value


def _carry_training_state(new_engine, old_engine) -> None:
    old_optimizer, new_optimizer = basic_optimizer(old_engine), basic_optimizer(new_engine)
    if old_engine.lr_scheduler is not None and new_engine.lr_scheduler is not None:
        new_engine.lr_scheduler.load_state_dict(old_engine.lr_scheduler.state_dict())
    for new_group, old_group in zip(new_optimizer.param_groups, old_optimizer.param_groups):
        for key, value in old_group.items():
            if key != "params":
                new_group[key] = copy.deepcopy(value)
    for counter in ENGINE_COUNTERS:
        setattr(new_engine, counter, getattr(old_engine, counter))
    # The config holds the batch sizes the run started with; a phase may have changed them since.
    if new_engine.train_micro_batch_size_per_gpu() != old_engine.train_micro_batch_size_per_gpu():
        new_engine.set_train_micro_batch_size(old_engine.train_micro_batch_size_per_gpu())
    if new_engine.train_batch_size() != old_engine.train_batch_size():
        new_engine.set_train_batch_size(old_engine.train_batch_size())
    old_scaler = getattr(old_engine.optimizer, "loss_scaler", None)
    new_scaler = getattr(new_engine.optimizer, "loss_scaler", None)
    if old_scaler is not None and new_scaler is not None:
        for field in LOSS_SCALER_FIELDS:
            if hasattr(old_scaler, field):
                setattr(new_scaler, field, getattr(old_scaler, field))


# ---------------------------------------------------------------------- the rebuild
def build_engine(model: nn.Module, ds_config: dict, model_parameters=None, optimizer=None,
                 lr_scheduler=None, mpu=None):
    """`deepspeed.initialize` for an already initialised process group; returns the engine."""
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model_parameters if model_parameters is not None else model.parameters(),
        config=ds_config, optimizer=optimizer, lr_scheduler=lr_scheduler, mpu=mpu, dist_init_required=False)
    return engine


def rebuild_engine_squeezed(pruner):
    """Replace `pruner.engine` by an engine around the squeezed model; returns the new engine.

    Called by `VariancePruner.squeeze()` in engine mode, on every rank. Works at ZeRO 0-3.
    Afterwards `pruner.engine`, `pruner.model` and `pruner.layers` are the new ones; the old
    engine is destroyed, so the caller must drop its own references to it (`engine = pruner.engine`).
    """
    if pruner.squeezed:
        raise RuntimeError("the engine is already squeezed")
    old = pruner.engine
    optimizer_factory, scheduler_factory = engine_factories(old)
    before = partition_bytes(old)["total"]

    dense = dense_fp32_copy(old, pruner.config)
    masks = {name: kept.cpu() for name, kept in pruner.masks_on_device().items()}
    origins = squeeze_model(dense, masks, pruner.folds if pruner.config.fold_ffn else [])
    squeezed_values = {name: p.detach().clone() for name, p in dense.named_parameters()}

    old_params = dict(old.module.named_parameters())
    group_of = param_groups_of(old)
    old_groups = basic_optimizer(old).param_groups
    grouped: list[list[nn.Parameter]] = [[] for _ in old_groups]
    for name, param in dense.named_parameters():
        group = group_of.get(id(old_params[origins.get(name, ParamOrigin(name)).name]))
        if group is not None:
            grouped[group].append(param)
    model_parameters = [{**{k: copy.deepcopy(v) for k, v in old_group.items() if k != "params"}, "params": params}
                        for old_group, params in zip(old_groups, grouped)]

    new = build_engine(dense, engine_config(old), model_parameters, optimizer_factory, scheduler_factory,
                       mpu=getattr(old, "mpu", None))
    _seed_optimizer_state(new, old)
    keys = optimizer_state_keys(old)
    with torch.no_grad():
        for name, param in new.module.named_parameters():
            if not param.requires_grad:
                continue
            set_full(param, new, squeezed_values[name])
            origin = origins.get(name, ParamOrigin(name))
            for key in keys:
                moment = get_full(old_params[origin.name], old, key)  # collective on the old engine
                set_full(param, new, _slice(moment.reshape(full_shape(old_params[origin.name])).cpu(), origin), key)
    _carry_training_state(new, old)

    pruner._detach_hooks()
    pruner._grad_masks = {}
    pruner.last_origins = origins
    old.destroy()
    adopt_engine(pruner, new)
    del old, old_params, dense, squeezed_values
    gc.collect()
    after = partition_bytes(new)["total"]
    logger.info("re-partitioned the squeezed model (ZeRO stage %d): %.3f MB -> %.3f MB per rank",
                zero_stage(new), before / 2**20, after / 2**20)
    return new


def adopt_engine(pruner, engine) -> None:
    """Point a pruner whose masks match `engine`'s squeezed model at that engine."""
    from . import engine_collaborators
    modules = dict(engine.module.named_modules())
    pruner.engine = engine
    pruner.model = engine.module
    pruner.layers = [dataclasses.replace(layer, module=modules[layer.name]) for layer in pruner.layers]
    pruner.reducer, pruner._store = engine_collaborators(engine)
    pruner.squeezed = True
    pruner._engine_steps_seen = engine.global_steps
