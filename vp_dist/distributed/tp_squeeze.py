"""The squeeze under tensor parallelism (issue 15 item 4): from an AutoTP engine to a tp x dp engine
around balanced tensor-parallel squeezed layers (`vp_dist.squeeze.tensor_parallel`).

1. Every parameter's full fp32 master and optimizer states are gathered: over the data-parallel
   group from ZeRO 1/2 (`get_full`), then over the TP group from the AutoTP shards
   (`tensor_parallel_full`). The old engine is released.
2. The module becomes a plain full-size fp32 model (each AutoTP layer back to `nn.Linear` holding
   the full master) and `squeeze_model` squeezes it with the engine's FFN folds; Q, K, V and
   attn-out are row-squeezed (`engine_folds(shrink_attention=False)`): the data-parallel rebuild's
   exact attention shrink (`SqueezedBertAttention`) has no tensor-parallel form yet.
3. Each squeezed layer is sharded: the heads of an attention block dealt to the TP ranks H/N each
   (balancing their kept Q+K+V rows), Q, K, V column-parallel over whole heads, attn-out
   row-parallel over the same columns; FFN-in column-parallel over a balanced group of its inner
   rows (kept rows within one of 1/N), FFN-out row-parallel over the same columns. Embeddings,
   LayerNorms, the heads and row-parallel biases stay replicated.
4. A new DeepSpeed engine without AutoTP but with a `TensorParallelGrid` mpu: ZeRO 1/2 partition
   and reduce over the dp group, the gradient norm counts sharded parameters on every TP rank and
   replicated ones once. fp32 masters and Adam moments are seeded from the carried values (row by
   row: `old[rows][:, cols]` composed with the rank's slice), counters and schedules go on.

Memory: unlike the data-parallel rebuild (layer by layer, 1/N shares), this one holds the full fp32
model and its optimizer states on every rank, in host memory, for the length of the rebuild.
Dropout in the replicated regions (embeddings, after attn-out and FFN-out) must draw the same
masks on every rank of a TP group; nothing here synchronises the RNG (tested with dropout 0).
"""
from __future__ import annotations

import copy
import gc
import logging

import deepspeed
import torch
import torch.distributed as dist
import torch.nn as nn

from ..adapters import AttentionSite, FoldSite
from ..squeeze import ParamOrigin, squeeze_model
from ..squeeze.layers import replace_module
from ..squeeze.tensor_parallel import (LocalSlice, attention_heads_per_rank, computed_positions, head_positions,
                                       inner_positions_per_rank, shard_column, shard_row)
from .devices import collective_device
from .rebuild import (TrainingState, adopt_engine, build_engine, engine_config, engine_factories, engine_folds,
                      full_master, origin_slice, param_groups_of, parameter_aliases, release_engine)
from .zero import (TensorParallelGrid, autotp_layer_names, get_full, init_tensor_parallel_groups, optimizer_state_keys,
                   partition_bytes, set_full, tensor_parallel_full, tensor_parallel_groups, zero_stage)

logger = logging.getLogger(__name__)


def _compose(origin: ParamOrigin, local: LocalSlice) -> ParamOrigin:
    """old[origin.rows][:, origin.cols][local.rows][:, local.cols] as one ParamOrigin."""
    def pick(outer, inner):
        if inner is None:
            return outer
        return inner if outer is None else outer[inner]
    return ParamOrigin(origin.name, pick(origin.rows, local.rows), pick(origin.cols, local.cols))


def _computed_mask(layer: nn.Module) -> torch.Tensor:
    """Bool [out] of the output positions a squeezed (or plain) linear layer computes."""
    mask = torch.zeros(layer.bias.shape[0], dtype=torch.bool)
    mask[computed_positions(layer)] = True
    return mask


def shard_squeezed_model(model: nn.Module, masks: dict[str, torch.Tensor], sites, num_heads: int, grid: dict
                         ) -> dict[str, tuple[nn.Module, dict[str, LocalSlice]]]:
    """Replace the squeezed prunable layers of `model` by this rank's tensor-parallel shards.

    sites: every FFN (FoldSite) and attention block (AttentionSite) of the model, folded or not.
    Returns {layer name: (new module, {"weight"/"bias": LocalSlice of the squeezed parameter})}.
    """
    rank, size, group = grid["tp_rank"], grid["tp_size"], grid["tp_group"]
    sharded: dict[str, tuple[nn.Module, dict]] = {}
    for site in sites:
        if isinstance(site, AttentionSite):
            head_size = masks[site.query].numel() // num_heads
            heads = attention_heads_per_rank([masks[site.query], masks[site.key], masks[site.value]],
                                             num_heads, size)[rank]
            positions = head_positions(heads, head_size)
            for name in (site.query, site.key, site.value):
                sharded[name] = shard_column(model.get_submodule(name), positions, group)
            sharded[site.attn_out] = shard_row(model.get_submodule(site.attn_out), positions, group)
        elif isinstance(site, FoldSite):
            ffn_in = model.get_submodule(site.ffn_in)
            positions = inner_positions_per_rank(_computed_mask(ffn_in), size)[rank]
            sharded[site.ffn_in] = shard_column(ffn_in, positions, group)
            sharded[site.ffn_out] = shard_row(model.get_submodule(site.ffn_out), positions, group)
    missing = sorted(set(masks) - set(sharded))
    if missing:
        raise NotImplementedError(f"the squeeze under tensor parallelism shards BERT-layout attention blocks and "
                                  f"FFN pairs only; no rule for {missing[:3]}")
    for name, (module, _) in sharded.items():
        module.train(model.get_submodule(name).training)
        replace_module(model, name, module)
    return sharded


def rebuild_tensor_parallel_squeezed(pruner):
    """Replace `pruner.engine` (an AutoTP engine, ZeRO 0-2) by a tp x dp engine around the balanced
    tensor-parallel squeezed model; returns the new engine. Collective: every rank calls it (via
    `VariancePruner.squeeze()`). The caller must drop its references to the old engine."""
    if pruner.squeezed:
        raise RuntimeError("the engine is already squeezed")
    old = pruner.engine
    if zero_stage(old) == 3:
        raise NotImplementedError("ZeRO stage 3 under tensor parallelism is not supported: use ZeRO stage 0-2")
    module = old.module
    grid = tensor_parallel_groups()
    optimizer_factory, scheduler_factory = engine_factories(old)
    ds_config = engine_config(old)
    ds_config.pop("tensor_parallel", None)  # the new layers shard themselves; AutoTP must not touch them
    before = partition_bytes(old)["total"]
    keys = optimizer_state_keys(old)
    training = TrainingState.capture(old)
    # AutoTP engines count TP ranks in the batch (micro x accumulation x world); the new engine's
    # data-parallel world is dp only, and the accumulation must stay what it was.
    training.train_batch = training.micro_batch * old.gradient_accumulation_steps() * grid["dp_size"]
    old_params = dict(module.named_parameters())
    group_of = param_groups_of(old)
    old_group = {name: group_of.get(id(param)) for name, param in old_params.items()}
    requires_grad = {name: param.requires_grad for name, param in old_params.items()}
    aliases = parameter_aliases(module)
    autotp = set(autotp_layer_names(module))
    pruner._detach_hooks()
    pruner._grad_masks = {}

    # 1. full fp32 masters and optimizer states (dp, then TP gathered), on the host.
    masters: dict[str, torch.Tensor] = {}
    states: dict[str, dict[str, torch.Tensor]] = {key: {} for key in keys}
    with torch.no_grad():
        for name, param in old_params.items():
            layer, _, leaf = name.rpartition(".")
            owner = module.get_submodule(layer) if layer else module
            # clones: at stage 0 a master is the module parameter itself, which the release frees
            masters[name] = tensor_parallel_full(owner, leaf, full_master(old, param)).cpu().clone()
            if not param.requires_grad:
                continue
            for key in keys:
                state = get_full(param, old, key)  # collective over the dp group at ZeRO >= 1
                if state is not None:
                    states[key][name] = tensor_parallel_full(owner, leaf, state.reshape(param.shape)).cpu().clone()
    release_engine(old)
    gc.collect()

    # 2. a plain full-size fp32 model holding the masters, squeezed.
    with torch.no_grad():
        for name in autotp:
            weight = masters[f"{name}.weight"]
            bias = masters.get(f"{name}.bias")
            linear = nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
            linear.weight = nn.Parameter(weight, requires_grad=requires_grad[f"{name}.weight"])
            if bias is not None:
                linear.bias = nn.Parameter(bias, requires_grad=requires_grad[f"{name}.bias"])
            linear.train(module.get_submodule(name).training)
            replace_module(module, name, linear)
        for names in aliases:
            if names[0].rpartition(".")[0] in autotp:
                continue
            param = nn.Parameter(masters[names[0]], requires_grad=requires_grad[names[0]])
            for name in names:
                replace_module(module, name, param)
    masks = {name: kept.cpu() for name, kept in pruner.masks_on_device().items()}
    if pruner.config.pad_ffn > 1:  # the shards split the inner width themselves (balanced per rank)
        logger.warning("VPConfig.pad_ffn=%d is not applied by the tensor-parallel squeeze", pruner.config.pad_ffn)
    if pruner.config.head_widths != "split":  # Q, K, V and attn-out are row-squeezed here: no head layout
        logger.warning("VPConfig.head_widths=%r is not applied by the tensor-parallel squeeze (its attention is "
                       "row-squeezed, not shrunk)", pruner.config.head_widths)
    origins = squeeze_model(module, masks, engine_folds(pruner, shrink_attention=False))

    # 3. this rank's balanced shares of the squeezed layers.
    num_heads = int(module.config.num_attention_heads)
    sharded = shard_squeezed_model(module, masks, pruner.folds, num_heads, grid)
    sources: dict[str, ParamOrigin] = {}
    for name, param in module.named_parameters():
        layer, _, leaf = name.rpartition(".")
        origin = origins.get(name, ParamOrigin(name))
        sources[name] = _compose(origin, sharded[layer][1][leaf]) if layer in sharded else origin
    fp32 = {name: param.detach().clone() for name, param in module.named_parameters()}
    del masters

    # 4. the tp x dp engine, masters exact, moments carried.
    grouped: list[list[nn.Parameter]] = [[] for _ in training.group_settings]
    for name, param in module.named_parameters():
        group = old_group.get(sources[name].name)
        if group is not None:
            grouped[group].append(param)
    model_parameters = [{**copy.deepcopy(settings), "params": params}
                        for settings, params in zip(training.group_settings, grouped)]
    module.to(deepspeed.get_accelerator().current_device_name())
    new = build_engine(module, ds_config, model_parameters, optimizer_factory, scheduler_factory,
                       mpu=TensorParallelGrid(grid))
    with torch.no_grad():
        for name, param in new.module.named_parameters():
            if param.requires_grad:
                set_full(param, new, fp32[name])
        training.seed_optimizer_state(new, keys)
        for key in keys:
            for name, param in new.module.named_parameters():
                origin = sources[name]
                if param.requires_grad and origin.name in states[key]:
                    set_full(param, new, origin_slice(states[key][origin.name], origin), key)
    training.restore(new)
    pruner.last_origins = sources
    adopt_engine(pruner, new)
    _record_shards(pruner, grid, sharded)
    gc.collect()
    after = partition_bytes(new)["total"]
    logger.info("squeezed under tensor parallelism %d x dp %d (ZeRO stage %d): %.3f MB -> %.3f MB per rank",
                grid["tp_size"], grid["dp_size"], zero_stage(new), before / 2**20, after / 2**20)
    return new


def shard_for_resume(pruner, tensor_parallel: int) -> TensorParallelGrid:
    """Resume: shard `pruner.model` (plain, squeezed in place with the saved masks and the engine's
    folds) into this rank's tensor-parallel layers exactly as `rebuild_tensor_parallel_squeezed`
    did (the layout is a deterministic function of the masks and the TP size); returns the mpu for
    `deepspeed.initialize`, whose `load_checkpoint` then fills the parameters and ZeRO state.
    Creates DeepSpeed's tp x dp groups if AutoTP has not (collective)."""
    init_tensor_parallel_groups(tensor_parallel)
    grid = tensor_parallel_groups()
    masks = {name: kept.cpu() for name, kept in pruner.masks_on_device().items()}
    sharded = shard_squeezed_model(pruner.model, masks, pruner.folds, int(pruner.model.config.num_attention_heads),
                                   grid)
    _record_shards(pruner, grid, sharded)
    return TensorParallelGrid(grid)


def _record_shards(pruner, grid: dict, sharded: dict) -> None:
    """What the pruner keeps of a TP squeeze: the TP size and each sharded layer's slices."""
    pruner.tensor_parallel_squeezed = grid["tp_size"]
    pruner.tensor_parallel_slices = {name: slices for name, (_, slices) in sharded.items()}


@torch.no_grad()
def unsharded_squeezed_copy(pruner) -> nn.Module:
    """A plain, single-process copy of a TP-squeezed model: the squeezed layers whole, as the 1-rank
    squeeze builds them (`squeeze_model` with the engine's folds), each filled from every TP rank's
    share; replicated parameters and buffers from this rank. For the exports. Collective over the
    TP group (every rank calls it and gets the copy), in the module's dtype, on the CPU."""
    from ..pruner import prepare_model
    model = pruner.engine.module
    grid = tensor_parallel_groups()
    slices = pruner.tensor_parallel_slices
    whole_model = prepare_model(type(model)(model.config.__class__.from_dict(model.config.to_dict())), pruner.config)
    masks = {name: kept.cpu() for name, kept in pruner.masks_on_device().items()}
    squeeze_model(whole_model, masks, engine_folds(pruner, shrink_attention=False))
    whole_model.to(next(model.parameters()).dtype)
    replicated = {name: tensor.detach().cpu() for name, tensor in model.state_dict().items()
                  if name.rpartition(".")[0] not in slices}
    missing, unexpected = whole_model.load_state_dict(replicated, strict=False)
    missing = [name for name in missing if name.rpartition(".")[0] not in slices]
    tied = set(getattr(whole_model, "all_tied_weights_keys", {}) or {})
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"TP-squeezed model does not fit its squeezed copy: missing "
                           f"{sorted(set(missing) - tied)[:5]}, unexpected {unexpected[:5]}")
    for layer, parts in slices.items():
        local, whole = model.get_submodule(layer), whole_model.get_submodule(layer)
        for leaf, local_slice in parts.items():
            shares = [None] * grid["tp_size"]
            dist.all_gather_object(shares, (local_slice, getattr(local, leaf).detach().cpu()), group=grid["tp_group"])
            target = getattr(whole, leaf)
            for share, value in shares:
                if value.numel() == 0:
                    continue
                if share.rows is not None and share.cols is not None:
                    target[share.rows.unsqueeze(1), share.cols.unsqueeze(0)] = value.to(target.dtype)
                elif share.rows is not None:
                    target[share.rows] = value.to(target.dtype)
                elif share.cols is not None:
                    target[:, share.cols] = value.to(target.dtype)
                else:
                    target.copy_(value)
    return whole_model.eval()


def tensor_parallel_parameter_count(model: nn.Module) -> int:
    """Parameters of the whole model whose tensor-parallel layers `model` holds this rank's share
    of: parameters marked `tensor_model_parallel` summed over the TP group, the replicated ones
    once. Collective over the TP group."""
    grid = tensor_parallel_groups()
    params = list({id(p): p for p in model.parameters()}.values())
    sharded = torch.tensor([sum(p.numel() for p in params if getattr(p, "tensor_model_parallel", False))],
                           dtype=torch.float64, device=collective_device(grid["tp_group"]))
    dist.all_reduce(sharded, group=grid["tp_group"])
    return int(sharded.item()) + sum(p.numel() for p in params if not getattr(p, "tensor_model_parallel", False))
