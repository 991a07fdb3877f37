"""Re-partitioning after the squeeze (SPEC 5): a new DeepSpeed engine around the smaller model.

The squeezed modules replace the masked ones in the *same* module object, so every setting of
the model is kept (fused LayerNorms, gradient checkpointing, attention implementation, dtype,
buffers, config); `deepspeed.initialize` then partitions it afresh with the old engine's
configuration and parameter groups, and weights, gradients and optimizer states per rank shrink
with the matrices. The squeeze is the plain model's (`pruner.squeeze_folds()`): row-squeezed
layers, folded FFNs and, with `fold_ffn`, whole attention blocks shrunk exactly
(`SqueezedBertAttention`, which reuses the old block's LayerNorm and dropout modules). Nothing is
reset: the fp32 masters (exact also in bf16/fp16), each Adam moment row by row through the new
parameter's `ParamOrigin` (`old[rows][:, cols]`: also the collapsed and folded tensors of a shrunk
block), the optimizer step count, the LR scheduler position, the param groups' hyperparameters,
the loss scale, the batch sizes and the engine's step counters move over.

Memory: the rebuild never holds more than training did. It works one unit at a time (a layer, an
FFN pair, an attention block's four projections) and never builds a full copy of the model: every
full fp32 value it needs is gathered for one parameter, squeezed, and only this rank's 1/N share
of it is kept (`ShardedStash`, host memory).
Each kind of old state is released as soon as its squeezed share is stashed (masters, then each
moment), the old engine's remaining buffers before the new engine allocates anything, and the
stashed shares are gathered back one parameter at a time into the new engine's partitions.
"""
from __future__ import annotations

import copy
import dataclasses
import gc
import json
import logging
import math
import os

import deepspeed
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..adapters import AttentionSite, FoldSite
from ..squeeze import (ParamOrigin, attention_layers, attention_shrinks, cast_squeezed_buffers,
                       fuse_residual_outputs, shrunk_attention, squeeze_model)
from ..squeeze.layers import replace_module
from .devices import collective_device
from .zero import (basic_optimizer, engine_dtype, flat_fp32_partitions, full_shape, get_full, optimizer_state_keys,
                   partition_bytes, set_full, zero_stage)

logger = logging.getLogger(__name__)

ENGINE_COUNTERS = ("global_steps", "global_samples", "micro_steps", "skipped_steps")
LOSS_SCALER_FIELDS = ("cur_scale", "cur_iter", "last_overflow_iter", "cur_hysteresis")


def loss_scale(engine) -> float | None:
    """The engine's current fp16 loss scale (DeepSpeed's dynamic loss scaler), None without one
    (fp32, bf16): what the rebuild carries over (`LOSS_SCALER_FIELDS`)."""
    scaler = getattr(engine.optimizer, "loss_scaler", None)
    scale = getattr(scaler, "cur_scale", None)
    return None if scale is None else float(scale)


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


# ---------------------------------------------------------------------- 1/N shares of full tensors
class ShardedStash:
    """Full tensors held as 1/N shares over a process group, in host memory.

    `put(key, full)` keeps this rank's share of the flattened tensor (every rank passes the same
    full tensor); `take(key)` all-gathers the full fp32 tensor back on `device` and drops the
    share (`keep=True`: keeps it for a later `take`). Collective: every rank calls `take` for the
    same keys in the same order.
    """

    def __init__(self, group, device):
        self.group, self.device = group, torch.device(device)
        self.world = dist.get_world_size(group=group)
        self.rank = dist.get_rank(group=group)
        self._shares: dict[str, tuple[torch.Tensor, torch.Size]] = {}

    def __contains__(self, key: str) -> bool:
        return key in self._shares

    def put(self, key: str, full: torch.Tensor) -> None:
        flat = full.detach().reshape(-1)
        size = math.ceil(flat.numel() / self.world)
        share = torch.zeros(size, dtype=torch.float32)
        start, stop = self.rank * size, min((self.rank + 1) * size, flat.numel())
        if stop > start:
            share[:stop - start] = flat[start:stop].float().cpu()
        self._shares[key] = (share, full.shape)

    def take(self, key: str, keep: bool = False) -> torch.Tensor:
        share, shape = self._shares[key] if keep else self._shares.pop(key)
        device = collective_device(self.group)  # NCCL gathers CUDA tensors only
        gathered = torch.empty(share.numel() * self.world, dtype=torch.float32, device=device)
        dist.all_gather_into_tensor(gathered, share.to(device), group=self.group)
        return gathered[:math.prod(shape)].reshape(shape).to(self.device)


# ---------------------------------------------------------------------- reading the old engine
def full_master(engine, param: nn.Parameter) -> torch.Tensor:
    """The full fp32 value of a module parameter on every rank (collective at ZeRO >= 1)."""
    if param.requires_grad:
        value = get_full(param, engine)
    elif hasattr(param, "ds_id"):
        with deepspeed.zero.GatheredParameters([param]):
            value = param.data.float().clone()
    else:
        value = param.detach().float()
    return value.detach().reshape(full_shape(param))


def parameter_aliases(module: nn.Module) -> list[list[str]]:
    """Groups of names of one parameter (tied weights), in the module's order."""
    by_param: dict[int, list[str]] = {}
    for name, param in module.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(param), []).append(name)
    return list(by_param.values())


def _stand_in(modules: dict[str, nn.Module]) -> nn.Module:
    """A module tree holding only `modules` at their dotted names, for `squeeze_model`."""
    root = nn.Module()
    for name, module in modules.items():
        parent = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(parent, part):
                parent.add_module(part, nn.Module())
            parent = getattr(parent, part)
        parent.add_module(leaf, module)
    return root


def engine_folds(pruner, shrink_attention: bool = True) -> list[FoldSite | AttentionSite]:
    """The folds the engine rebuild applies: those a plain-model squeeze applies
    (`pruner.squeeze_folds()`: every FFN fold and attention shrink when `fold_ffn`).

    shrink_attention=False leaves out the attention shrink (`AttentionSite`): the structure of
    engines squeezed before the rebuild applied it (their query, key, value and attention-output
    rows row-squeezed), which a checkpoint saved by them needs to load.
    """
    return [site for site in pruner.squeeze_folds() if shrink_attention or not isinstance(site, AttentionSite)]


def _new_parameters(replacements: dict[str, nn.Module], origins: dict[str, ParamOrigin]):
    """(full name, owning module, attribute) of every parameter the replacements brought, in module
    order: those named in `origins`. A module a replacement reuses (the shrunk attention block's
    LayerNorm) keeps its parameters under their old names; they are not among these."""
    for layer, squeezed in replacements.items():
        for module_name, module in squeezed.named_modules():
            for attribute in list(module._parameters):
                name = ".".join(part for part in (layer, module_name, attribute) if part)
                if name in origins:
                    yield name, module, attribute


def _replaced(origins: dict[str, ParamOrigin]) -> set[str]:
    """Old parameter names the squeeze consumed (each new parameter is made from one of them)."""
    return {origin.name for origin in origins.values()}


def _squeeze_one_at_a_time(engine, masks: dict[str, torch.Tensor], folds, stash: ShardedStash, pad_ffn: int = 1,
                           head_widths: str | None = None):
    """Squeeze each masked layer from its full fp32 masters: an FFN pair together where it folds,
    a whole attention block (query, key, value, attn_out) where it shrinks, other layers alone.

    Returns (replacement modules by name, origins). The replacements' new parameters are meta
    placeholders: their fp32 values are in `stash` under their full names. A shrunk attention
    block reuses the old block's LayerNorm and dropout modules (their parameters are carried as
    ordinary ones). `pad_ffn`, `head_widths`: `squeeze_model`'s, for the folded FFN pairs and the
    shrunk attention blocks. Collective.
    """
    modules = dict(engine.module.named_modules())
    params = dict(engine.module.named_parameters())
    shrunk = [site for site in folds if isinstance(site, AttentionSite) and attention_shrinks(site, masks)]
    folded = [site for site in folds if isinstance(site, FoldSite) and not bool(masks[site.ffn_in].all())]
    in_a_unit = {name for site in shrunk for name in attention_layers(site).values()}
    in_a_unit |= {name for site in folded for name in (site.ffn_in, site.ffn_out)}
    units = [([site.ffn_in, site.ffn_out], site) for site in folded]
    units += [(list(attention_layers(site).values()), site) for site in shrunk]
    units += [([name], None) for name, kept in masks.items() if name not in in_a_unit and not bool(kept.all())]
    replacements: dict[str, nn.Module] = {}
    origins: dict[str, ParamOrigin] = {}
    with torch.no_grad():
        for names, site in units:
            full = {f"{name}.{t}": full_master(engine, getattr(modules[name], t)) for name in names
                    for t in ("weight", "bias")}  # one parameter gathered at a time
            unit_origins: dict[str, ParamOrigin] = {}
            if isinstance(site, AttentionSite):
                tensors = {f"{kind}.{t}": full[f"{name}.{t}"]
                           for kind, name in attention_layers(site).items() for t in ("weight", "bias")}
                block = shrunk_attention(modules[site.name], site, masks, tensors, unit_origins, head_widths)
                block.train(modules[site.name].training)
                squeezed = {site.name: block}
            else:
                dense = {}
                for name in names:
                    weight, bias = full[f"{name}.weight"], full[f"{name}.bias"]
                    dense[name] = nn.Linear(weight.shape[1], weight.shape[0], device="meta")
                    dense[name].weight, dense[name].bias = nn.Parameter(weight), nn.Parameter(bias)
                    dense[name].train(modules[name].training)
                if site is not None:
                    dense[site.activation] = modules[site.activation]  # parameter-free
                stand_in = _stand_in(dense)
                unit_origins = squeeze_model(stand_in, {name: masks[name] for name in names},
                                             [site] if site is not None else [], pad_ffn)
                squeezed = {name: stand_in.get_submodule(name) for name in names}
            del full
            for name, module, attribute in list(_new_parameters(squeezed, unit_origins)):
                value = module._parameters[attribute]
                stash.put(name, value)
                trainable = params[unit_origins[name].name].requires_grad
                module._parameters[attribute] = nn.Parameter(torch.empty(value.shape, device="meta"),
                                                             requires_grad=trainable)
            replacements.update(squeezed)
            origins.update(unit_origins)
    return replacements, origins


def _moment_sources(module: nn.Module, replacements: dict, origins: dict) -> dict[str, ParamOrigin]:
    """New parameter name -> where its optimizer state comes from, for every trainable parameter."""
    replaced = _replaced(origins)
    sources = {name: ParamOrigin(name) for name, param in module.named_parameters()
               if name not in replaced and param.requires_grad}
    for name, owner, attribute in _new_parameters(replacements, origins):
        if owner._parameters[attribute].requires_grad:
            sources[name] = origins[name]
    return sources


def origin_slice(value: torch.Tensor, origin: ParamOrigin) -> torch.Tensor:
    """`value[origin.rows][:, origin.cols]` (None: all), with `origin.pad_rows` zero rows and
    `origin.pad_cols` zero columns appended (a padded FFN's zero units), on `value`'s device."""
    if origin.rows is not None:
        value = value[origin.rows.to(value.device)]
    if origin.cols is not None:
        value = value[:, origin.cols.to(value.device)]
    if origin.pad_rows or origin.pad_cols:
        value = F.pad(value, (0, origin.pad_cols, 0, origin.pad_rows) if value.dim() == 2 else (0, origin.pad_rows))
    return value


# ---------------------------------------------------------------------- releasing the old engine
def _release_tensors(value, depth: int = 0) -> None:
    """Free the storage of every tensor in `value` (containers walked a few levels deep).

    The old engine's buffers are also referenced from views (parameters into flat buffers, state
    fragments) and from the caller's own `engine` variable: dropping references would not free
    them in time, resizing their storages does.
    """
    if torch.is_tensor(value):
        if value.device.type == "meta":
            return
        storage = value.untyped_storage()
        if storage.resizable():
            storage.resize_(0)
        else:  # e.g. state loaded from a checkpoint: at least this tensor lets go of it
            value.data = torch.empty(0, dtype=value.dtype, device=value.device)
    elif depth < 3 and isinstance(value, dict):
        for item in list(value.values()):
            _release_tensors(item, depth + 1)
    elif depth < 3 and isinstance(value, (list, tuple)):
        for item in value:
            _release_tensors(item, depth + 1)


def _release_state(engine, key: str) -> None:
    """Free the old optimizer's state tensors `key` (after their squeezed shares are stashed)."""
    for state in basic_optimizer(engine).state.values():
        if torch.is_tensor(state.get(key)):
            _release_tensors(state.pop(key))


def release_engine(engine) -> None:
    """Destroy the old engine and free everything it allocated; its module is kept (emptied)."""
    for handle in ("module_forward_pre_hook", "module_forward_post_hook", "first_dataloader_check"):
        if getattr(engine, handle, None) is not None:
            getattr(engine, handle).remove()
    engine.destroy()
    optimizer = engine.optimizer
    _release_tensors(basic_optimizer(engine).state)
    basic_optimizer(engine).state.clear()
    for owner in {id(optimizer): optimizer, id(basic_optimizer(engine)): basic_optimizer(engine)}.values():
        _release_tensors(vars(owner))
    for param in engine.module.parameters():
        for attribute in ("ds_tensor", "grad"):
            if torch.is_tensor(getattr(param, attribute, None)):
                _release_tensors(getattr(param, attribute))
        _release_tensors(param)
    for module in engine.module.modules():
        if type(module._parameters) is not dict:  # ZeRO-3's gathering dict goes; a new engine adds its own
            module._parameters = dict(dict.items(module._parameters))
        for attribute in ("_original_parameters", "_external_params"):
            if attribute in vars(module):
                delattr(module, attribute)
    engine.optimizer = engine.lr_scheduler = None


# ---------------------------------------------------------------------- training state
@dataclasses.dataclass
class TrainingState:
    """Everything of the old engine that goes on unchanged, captured before it is released."""

    lr_scheduler: dict | None
    group_settings: list[dict]
    counters: dict
    micro_batch: int
    train_batch: int
    loss_scaler: dict
    state_templates: dict[int, dict]  # param group -> non-per-element optimizer state (Adam's step)
    state_dtypes: dict[str, torch.dtype]  # per-element optimizer state key -> its dtype

    @classmethod
    def capture(cls, engine) -> "TrainingState":
        optimizer = basic_optimizer(engine)
        templates, dtypes = {}, {}
        for flat, group in flat_groups(engine):
            state = optimizer.state.get(flat)
            for key, value in (state or {}).items():
                if torch.is_tensor(value) and value.shape == flat.shape:
                    dtypes[key] = value.dtype
            if group not in templates and state:
                templates[group] = {key: (value.clone() if torch.is_tensor(value) else copy.deepcopy(value))
                                    for key, value in state.items()
                                    if not (torch.is_tensor(value) and value.shape == flat.shape)}
        scaler = getattr(engine.optimizer, "loss_scaler", None)
        return cls(
            lr_scheduler=engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else None,
            group_settings=[{k: copy.deepcopy(v) for k, v in group.items() if k != "params"}
                            for group in optimizer.param_groups],
            counters={counter: getattr(engine, counter) for counter in ENGINE_COUNTERS},
            micro_batch=engine.train_micro_batch_size_per_gpu(), train_batch=engine.train_batch_size(),
            loss_scaler={field: copy.deepcopy(getattr(scaler, field)) for field in LOSS_SCALER_FIELDS
                         if scaler is not None and hasattr(scaler, field)},
            state_templates=templates, state_dtypes=dtypes)

    def seed_optimizer_state(self, engine, keys: list[str]) -> None:
        """Give the new optimizer its state now (ZeRO creates it lazily at the first step): the
        per-element `keys` as zeros of the new flat size, the rest (the step count) as it was."""
        optimizer = basic_optimizer(engine)
        for flat, group in flat_groups(engine):
            if optimizer.state.get(flat) or group not in self.state_templates:
                continue
            state = {key: (value.clone() if torch.is_tensor(value) else copy.deepcopy(value))
                     for key, value in self.state_templates[group].items()}
            state.update({key: torch.zeros(flat.shape, dtype=self.state_dtypes[key], device=flat.device)
                          for key in keys})
            optimizer.state[flat] = state
        if hasattr(engine.optimizer, "_lazy_init_hp_params_optimizer_state"):
            # ZeRO 1/2 and BF16 link each parameter's state fragments after their first step; link now.
            engine.optimizer._lazy_init_hp_params_optimizer_state()

    def restore(self, engine) -> None:
        if self.lr_scheduler is not None and engine.lr_scheduler is not None:
            engine.lr_scheduler.load_state_dict(self.lr_scheduler)
        for group, settings in zip(basic_optimizer(engine).param_groups, self.group_settings):
            group.update(copy.deepcopy(settings))
        for counter, value in self.counters.items():
            setattr(engine, counter, value)
        # The config holds the batch sizes the run started with; a phase may have changed them since.
        if engine.train_micro_batch_size_per_gpu() != self.micro_batch:
            engine.set_train_micro_batch_size(self.micro_batch)
        if engine.train_batch_size() != self.train_batch:
            engine.set_train_batch_size(self.train_batch)
        scaler = getattr(engine.optimizer, "loss_scaler", None)
        for field, value in self.loss_scaler.items():
            if scaler is not None and hasattr(scaler, field):
                setattr(scaler, field, value)


# ---------------------------------------------------------------------- the rebuild
def build_engine(model: nn.Module, ds_config: dict, model_parameters=None, optimizer=None,
                 lr_scheduler=None, mpu=None):
    """`deepspeed.initialize` for an already initialised process group; returns the engine. The
    floating buffers squeezing added (empty tensors of layers that lost every row, the shrunk
    attention's 0/1 constants) get the engine's dtype (`cast_squeezed_buffers`)."""
    engine, *_ = deepspeed.initialize(
        model=model, model_parameters=model_parameters if model_parameters is not None else model.parameters(),
        config=ds_config, optimizer=optimizer, lr_scheduler=lr_scheduler, mpu=mpu, dist_init_required=False)
    cast_squeezed_buffers(engine.module, engine_dtype(engine))
    return engine


@torch.no_grad()
def _install_parameters(module: nn.Module, replacements: dict, origins: dict, aliases: list[list[str]],
                        stash: ShardedStash, dtype: dict, requires_grad: dict, device) -> None:
    """Put the squeezed layers in place of the masked ones and give every parameter a fresh
    low-precision tensor gathered back from the stash (kept there for the masters): the new ones
    in the dtype of the parameter they came from; tied weights stay tied; a reused module's
    (LayerNorm) parameters come back under their old names, once. Collective."""
    for name, squeezed in replacements.items():
        replace_module(module, name, squeezed)
    replaced = _replaced(origins)
    for names in aliases:
        if names[0] in replaced:
            continue
        value = stash.take(names[0], keep=True).to(dtype[names[0]])
        param = nn.Parameter(value, requires_grad=requires_grad[names[0]])
        for name in names:
            replace_module(module, name, param)
    for name, owner, attribute in list(_new_parameters(replacements, origins)):
        placeholder = owner._parameters[attribute]
        value = stash.take(name, keep=True).to(dtype[origins[name].name])
        owner._parameters[attribute] = nn.Parameter(value, requires_grad=placeholder.requires_grad)
    for squeezed in replacements.values():
        for owner in squeezed.modules():
            for buffer_name, buffer in owner._buffers.items():
                if buffer is not None:
                    owner._buffers[buffer_name] = buffer.to(device)


def rebuild_engine_squeezed(pruner):
    """Replace `pruner.engine` by an engine around the squeezed model; returns the new engine.

    Called by `VariancePruner.squeeze()` in engine mode, on every rank. Works at ZeRO 0-3.
    Afterwards `pruner.engine`, `pruner.model` and `pruner.layers` are the new ones (the model is
    the same module object, squeezed); the old engine is destroyed and its memory freed, so the
    caller must drop its own references to it (`engine = pruner.engine`).
    """
    if pruner.squeezed:
        raise RuntimeError("the engine is already squeezed")
    old = pruner.engine
    module = old.module
    optimizer_factory, scheduler_factory = engine_factories(old)
    ds_config, mpu = engine_config(old), getattr(old, "mpu", None)
    before = partition_bytes(old)["total"]
    device = torch.device(deepspeed.get_accelerator().current_device_name())
    stash = ShardedStash(getattr(old, "seq_data_parallel_group", None) or old.data_parallel_group, device)
    old_params = dict(module.named_parameters())
    dtype = {name: param.dtype for name, param in old_params.items()}
    requires_grad = {name: param.requires_grad for name, param in old_params.items()}
    group_of = param_groups_of(old)
    old_group = {name: group_of.get(id(param)) for name, param in old_params.items()}
    aliases = parameter_aliases(module)
    keys = optimizer_state_keys(old)
    training = TrainingState.capture(old)
    pruner._detach_hooks()
    pruner._grad_masks = {}

    # 1. fp32 masters: squeezed layer by layer, the rest as they are; then the old masters go.
    masks = {name: kept.cpu() for name, kept in pruner.masks_on_device().items()}
    folds = engine_folds(pruner)
    replacements, origins = _squeeze_one_at_a_time(old, masks, folds, stash, pruner.config.pad_ffn,
                                                   pruner.config.head_widths)
    sources = _moment_sources(module, replacements, origins)
    replaced = _replaced(origins)
    with torch.no_grad():
        for name, param in old_params.items():
            if name not in replaced:
                stash.put(name, full_master(old, param))
        _release_tensors(flat_fp32_partitions(old))
        # 2. each optimizer state, row by row from the old one, which is freed right after.
        for key in keys:
            for name, origin in sources.items():
                moment = get_full(old_params[origin.name], old, key)  # collective on the old engine
                stash.put(f"{name}#{key}", origin_slice(moment.reshape(full_shape(old_params[origin.name])), origin))
                del moment
            _release_state(old, key)
    # 3. the old engine goes before the new one allocates anything.
    release_engine(old)
    del old_params, group_of
    gc.collect()
    deepspeed.get_accelerator().empty_cache()

    # 4. the squeezed module: new layers in place of the masked ones, fresh parameters.
    _install_parameters(module, replacements, origins, aliases, stash, dtype, requires_grad, device)
    fuse_residual_outputs(module, folds)  # FFN-out's expand with the residual add

    # 5. the new engine, its masters exact, its moments carried, its counters and schedules going on.
    grouped: list[list[nn.Parameter]] = [[] for _ in training.group_settings]
    for name, param in module.named_parameters():
        group = old_group.get(origins.get(name, ParamOrigin(name)).name)
        if group is not None:
            grouped[group].append(param)
    model_parameters = [{**copy.deepcopy(settings), "params": params}
                        for settings, params in zip(training.group_settings, grouped)]
    new = build_engine(module, ds_config, model_parameters, optimizer_factory, scheduler_factory, mpu=mpu)
    with torch.no_grad():
        for name, param in new.module.named_parameters():
            if param.requires_grad:
                set_full(param, new, stash.take(name))
        training.seed_optimizer_state(new, keys)
        for key in keys:
            for name, param in new.module.named_parameters():
                if f"{name}#{key}" in stash:
                    set_full(param, new, stash.take(f"{name}#{key}"), key)
    training.restore(new)
    pruner.last_origins = origins
    adopt_engine(pruner, new)
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
