"""ZeRO state access (SPEC 4, 5, 6): write pruned rows where DeepSpeed keeps them, count bytes.

Where one parameter's value lives on a rank, by ZeRO stage (DeepSpeed 0.19):

- stage 1, 2 (`DeepSpeedZeroOptimizer`, also `BF16_Optimizer`): the module parameter is a full
  low-precision tensor on every rank (a view into `bit16_groups_flat`); this rank's slice of the
  fp32 master is `param._hp_mapping.hp_fragment`, at `hp_fragment_address.start` inside the flat
  fp32 partition of its parameter group, and every optimizer state tensor of that flat partition
  holds the same slice at the same offset.
- stage 3: the module parameter is empty outside forward, unless it is *persistent* (small
  parameters stay gathered); this rank's low-precision partition is `param.ds_tensor`, elements
  `[rank * partition_numel, (rank + 1) * partition_numel)` of the flattened parameter (the last
  partition padded); fp32 master and optimizer state partitions are reached with DeepSpeed's
  local API (`safe_{get,set}_local_*`).
- stage 0 without bf16: the module parameters are the masters, the optimizer state is keyed by them.

`deepspeed.utils.safe_set_full_fp32_param` writes only the fp32 master: the low-precision copy the
next forward reads is refreshed at the next optimizer step, one forward too late. The store writes
both, locally (no collective), on every rank.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
from deepspeed.utils import (safe_get_full_fp32_param, safe_get_full_optimizer_state, safe_get_local_fp32_param,
                             safe_get_local_optimizer_state, safe_set_full_fp32_param,
                             safe_set_full_optimizer_state, safe_set_local_fp32_param,
                             safe_set_local_optimizer_state)

from ..masking import TorchParameterStore


def zero_stage(engine) -> int:
    """The engine's ZeRO stage (0-3)."""
    return int(engine.zero_optimization_stage())


def engine_dtype(engine) -> torch.dtype:
    """The dtype DeepSpeed gives the module's parameters: bf16, fp16 or fp32."""
    if engine.bfloat16_enabled():
        return torch.bfloat16
    return torch.float16 if engine.fp16_enabled() else torch.float32


def full_shape(param: torch.Tensor) -> torch.Size:
    """A parameter's logical shape, also while ZeRO-3 holds it partitioned."""
    return getattr(param, "ds_shape", param.shape)


def _fragment_optimizer(engine):
    """The optimizer that maps parameters to fp32 fragments (ZeRO 1/2 or BF16), else None."""
    optimizer = engine.optimizer
    if hasattr(optimizer, "single_partition_of_fp32_groups") or hasattr(optimizer, "fp32_groups_flat_partition"):
        return optimizer
    return None


def flat_fp32_partitions(engine) -> list[torch.Tensor]:
    """This rank's flat fp32 master tensors, the keys of the basic optimizer's state."""
    optimizer = engine.optimizer
    for attribute in ("single_partition_of_fp32_groups", "fp32_groups_flat_partition",
                      "fp32_partitioned_groups_flat"):
        if hasattr(optimizer, attribute):
            return list(getattr(optimizer, attribute))
    return []


def basic_optimizer(engine) -> torch.optim.Optimizer:
    """The torch optimizer that holds the state (ZeRO wraps it as `engine.optimizer.optimizer`)."""
    optimizer = engine.optimizer
    return getattr(optimizer, "optimizer", optimizer)


def optimizer_state_keys(engine) -> list[str]:
    """Keys of per-element optimizer state (e.g. Adam `exp_avg`, `exp_avg_sq`); not `step`."""
    keys: list[str] = []
    for tensor, state in basic_optimizer(engine).state.items():
        for key, value in state.items():
            if torch.is_tensor(value) and value.shape == tensor.shape and key not in keys:
                keys.append(key)
    return keys


def _write_flat(target: torch.Tensor, start: int, rows: torch.Tensor, row_values: torch.Tensor,
                row_width: int) -> None:
    """Write `row_values[r]` into the elements of `target` that belong to a row r with `rows[r]`.

    target: 1-D slice of a flattened parameter (or of a state tensor of it), holding elements
    `[start, start + target.numel())`; elements past the parameter's end are ZeRO padding.
    """
    if target.numel() == 0:
        return
    row = torch.arange(start, start + target.numel(), device=target.device) // row_width
    inside = row < rows.numel()
    row = row.clamp_max(rows.numel() - 1)
    hit = rows.to(target.device)[row] & inside
    target.copy_(torch.where(hit, row_values.to(device=target.device, dtype=target.dtype)[row], target))


def _write_module_rows(tensor: torch.Tensor, rows: torch.Tensor, row_values: torch.Tensor) -> None:
    """tensor[r] = row_values[r] for the rows r with rows[r]; tensor is a full [d_out, ...] parameter."""
    values = row_values[rows].reshape(-1, *[1] * (tensor.dim() - 1))
    tensor[rows.to(tensor.device)] = values.to(device=tensor.device, dtype=tensor.dtype)


class ZeroParameterStore:
    """Writes pruned rows into a DeepSpeed engine's ZeRO state (the pruner's `ParameterStore`).

    Every rank calls `write_rows` with identical arguments; each writes the parts it holds: the
    low-precision module copy (full at stages 1-2, its partition at stage 3, plus the gathered copy
    of a persistent stage-3 parameter), its fp32 master slice and, if asked, the same slice of every
    optimizer state tensor. No collective is needed.
    """

    def __init__(self, engine):
        self.engine = engine
        self.stage = zero_stage(engine)
        config = engine._config.zero_config
        if self.stage == 3 and (getattr(config, "zero_hpz_partition_size", 1) > 1
                                or getattr(config, "mics_shard_size", -1) > 0):
            raise NotImplementedError("Variance Pruning does not write hpZ / MiCS secondary partitions; "
                                      "set zero_hpz_partition_size=1 and mics_shard_size=-1")
        if self.stage == 0 and _fragment_optimizer(engine) is None and (
                engine.fp16_enabled() or engine.bfloat16_enabled()):
            raise NotImplementedError(f"ZeRO stage 0 in mixed precision ({type(engine.optimizer).__name__}) "
                                      "is not supported; use ZeRO stage >= 1, or fp32")

    @torch.no_grad()
    def write_rows(self, param: nn.Parameter, rows: torch.Tensor, values: torch.Tensor | float,
                   zero_optimizer_state: bool) -> None:
        shape = full_shape(param)
        rows = rows.to(torch.bool).cpu()
        row_values = torch.zeros(shape[0], dtype=torch.float64)
        row_values[rows] = values.detach().double().cpu() if torch.is_tensor(values) else float(values)
        row_width = math.prod(shape[1:])
        if hasattr(param, "ds_id"):
            self._write_partitioned(param, rows, row_values, row_width, zero_optimizer_state)
        elif hasattr(param, "_hp_mapping"):
            self._write_fragment(param, rows, row_values, row_width, zero_optimizer_state)
        else:  # stage 0, fp32: the module parameter is the master
            values_at_rows = row_values[rows].reshape(-1, *[1] * (len(shape) - 1))
            TorchParameterStore(basic_optimizer(self.engine)).write_rows(
                param, rows, values_at_rows, zero_optimizer_state)

    def _write_fragment(self, param, rows, row_values, row_width, zero_optimizer_state):
        _write_module_rows(param.data, rows, row_values)
        mapping = param._hp_mapping
        if mapping is None:  # no element of this parameter in this rank's partition
            return
        start = mapping.lp_fragment_address.start
        _write_flat(mapping.hp_fragment.data, start, rows, row_values, row_width)
        if zero_optimizer_state:
            flat = flat_fp32_partitions(self.engine)[mapping.param_group_index]
            address = mapping.hp_fragment_address
            zeros = torch.zeros_like(row_values)
            for value in basic_optimizer(self.engine).state.get(flat, {}).values():
                if torch.is_tensor(value) and value.shape == flat.shape:
                    _write_flat(value.narrow(0, address.start, address.numel), start, rows, zeros, row_width)

    def _write_partitioned(self, param, rows, row_values, row_width, zero_optimizer_state):
        start = dist.get_rank(group=param.ds_process_group) * param.partition_numel()
        _write_flat(param.ds_tensor.data.view(-1), start, rows, row_values, row_width)
        if param.data.numel() == param.ds_numel:  # gathered (persistent) copy the forward reads
            _write_module_rows(param.data, rows, row_values)
        if not param.requires_grad:
            return
        master = safe_get_local_fp32_param(param).clone()
        _write_flat(master, start, rows, row_values, row_width)
        safe_set_local_fp32_param(param, master)
        if zero_optimizer_state:
            zeros = torch.zeros_like(row_values)
            for key in optimizer_state_keys(self.engine):
                state = safe_get_local_optimizer_state(param, key).clone()
                _write_flat(state, start, rows, zeros, row_width)
                safe_set_local_optimizer_state(param, state, key)


# ---------------------------------------------------------------------- full-tensor access
def get_full(param: nn.Parameter, engine, key: str | None = None) -> torch.Tensor | None:
    """The full fp32 master (key None) or optimizer state `key` of `param`. Collective at ZeRO >= 1."""
    if hasattr(param, "ds_id") or hasattr(param, "_hp_mapping"):
        return safe_get_full_fp32_param(param) if key is None else safe_get_full_optimizer_state(param, key)
    if key is None:
        return param.detach().float()
    state = basic_optimizer(engine).state.get(param, {})
    return state[key] if key in state else None


@torch.no_grad()
def set_full(param: nn.Parameter, engine, value: torch.Tensor, key: str | None = None) -> None:
    """Set the fp32 master (key None) or optimizer state `key` of `param` from a full tensor.

    Local on every rank (each keeps its own slice). DeepSpeed's `safe_set_full_*` at stage 3 does
    not handle a padded last partition, so stage 3 goes through the local API here.
    """
    if value.numel() == 0:
        return  # a layer squeezed to zero rows: ZeRO keeps no master or state for it
    if hasattr(param, "ds_id"):
        if not param.requires_grad:
            return
        size = param.partition_numel()
        start = dist.get_rank(group=param.ds_process_group) * size
        flat = value.detach().reshape(-1).float()
        local = torch.zeros(size, dtype=torch.float32, device=flat.device)
        stop = min(start + size, flat.numel())
        if stop > start:
            local[:stop - start] = flat[start:stop]
        if key is None:
            safe_set_local_fp32_param(param, local)
        else:
            safe_set_local_optimizer_state(param, local, key)
    elif hasattr(param, "_hp_mapping"):
        if key is None:
            safe_set_full_fp32_param(param, value)
        else:
            safe_set_full_optimizer_state(param, value, key)
    elif key is None:
        param.data.copy_(value)
    else:
        basic_optimizer(engine).state[param][key].copy_(value)


# ---------------------------------------------------------------------- bytes per rank (SPEC 5, 6)
BYTE_KINDS = ("params_lp", "params_fp32", "gradients", "optimizer_states")


def _nbytes(tensor: torch.Tensor | None) -> int:
    return 0 if tensor is None else tensor.numel() * tensor.element_size()


def _state_bytes_per_element(engine, flat: torch.Tensor | None) -> int:
    state = basic_optimizer(engine).state.get(flat, {}) if flat is not None else {}
    return sum(v.element_size() for v in state.values() if torch.is_tensor(v) and v.shape == flat.shape)


def _engine_bytes(engine) -> dict[str, int]:
    stage = zero_stage(engine)
    optimizer = engine.optimizer
    state_bytes = sum(_nbytes(v) for s in basic_optimizer(engine).state.values() for v in s.values()
                      if torch.is_tensor(v))
    masters = sum(_nbytes(t) for t in flat_fp32_partitions(engine))
    params = list({id(p): p for p in engine.module.parameters()}.values())
    if stage == 3:
        low_precision = sum(_nbytes(p.ds_tensor) for p in params if hasattr(p, "ds_tensor"))
        low_precision += sum(_nbytes(p.data) for p in params if p.data.numel() == getattr(p, "ds_numel", -1))
        buffer = getattr(optimizer, "grad_partitions_flat_buffer", None)
        gradients = _nbytes(buffer) if buffer is not None else sum(
            p.partition_numel() * p.ds_tensor.element_size() for p in params if p.requires_grad)
    elif hasattr(optimizer, "bit16_groups_flat") or hasattr(optimizer, "bf16_groups_flat"):
        flats = getattr(optimizer, "bit16_groups_flat", None) or optimizer.bf16_groups_flat
        low_precision = sum(_nbytes(t) for t in flats)
        element = flats[0].element_size()
        if stage == 2:  # gradients are reduce-scattered into this rank's partition
            gradients = sum(t.numel() for t in flat_fp32_partitions(engine)) * element
        else:  # stage 0/1 keep full gradients until the step
            gradients = sum(t.numel() for t in flats) * element
    else:  # stage 0 fp32: module parameters are the masters
        low_precision = sum(_nbytes(p) for p in params)
        masters = 0
        gradients = sum(_nbytes(p) for p in params if p.requires_grad)
    return {"params_lp": low_precision, "params_fp32": masters, "gradients": gradients,
            "optimizer_states": state_bytes}


def _param_bytes(engine, param: nn.Parameter) -> dict[str, int]:
    stage = zero_stage(engine)
    element = param.element_size()
    if hasattr(param, "ds_id"):
        local = param.partition_numel() if param.requires_grad else 0
        fp32 = flat_fp32_partitions(engine)
        states = _state_bytes_per_element(engine, fp32[0] if fp32 else None)
        gathered = _nbytes(param.data) if param.data.numel() == param.ds_numel else 0
        return {"params_lp": _nbytes(param.ds_tensor) + gathered, "params_fp32": 4 * local,
                "gradients": element * local, "optimizer_states": states * local}
    mapping = getattr(param, "_hp_mapping", None)
    if hasattr(param, "_hp_mapping"):
        local = mapping.hp_fragment_address.numel if mapping is not None else 0
        flat = flat_fp32_partitions(engine)[mapping.param_group_index] if mapping is not None else None
        return {"params_lp": _nbytes(param), "params_fp32": 4 * local,
                "gradients": element * (local if stage == 2 else param.numel()),
                "optimizer_states": _state_bytes_per_element(engine, flat) * local}
    state = basic_optimizer(engine).state.get(param, {})
    return {"params_lp": _nbytes(param), "params_fp32": 0, "gradients": _nbytes(param),
            "optimizer_states": sum(_nbytes(v) for v in state.values() if torch.is_tensor(v) and v.dim() > 0)}


def _with_totals(counts: dict[str, int]) -> dict[str, int]:
    counts = dict(counts)
    counts["params"] = counts["params_lp"] + counts["params_fp32"]
    counts["total"] = counts["params"] + counts["gradients"] + counts["optimizer_states"]
    return counts


def partition_bytes(engine, layer_names=()) -> dict:
    """Bytes this rank holds, read from the engine's own partitions and optimizer state.

    Returns `{"params_lp", "params_fp32", "gradients", "optimizer_states", "params", "total":
    int, "layers": {name: same keys}}` where params_lp is the low-precision (module dtype) copy as
    held (full at stages 0-2; partition, plus gathered persistent parameters, at stage 3),
    params_fp32 this rank's fp32 master partition (0 at stage 0 in fp32: the module holds the
    masters), optimizer_states every tensor of the optimizer state on this rank. Gradient buffers
    come and go within a step, so `gradients` is the size of what the stage keeps per rank: full
    gradients at stages 0-1, this rank's partition at stages 2-3. Engine totals include ZeRO's
    alignment padding; `layers` (for each module name in `layer_names`, summing its parameters)
    counts the elements of each parameter this rank holds. The single byte count used by
    reports and tests.
    """
    out = _with_totals(_engine_bytes(engine))
    modules = dict(engine.module.named_modules())
    layers = {}
    for name in layer_names:
        counts = dict.fromkeys(BYTE_KINDS, 0)
        for param in modules[name].parameters():
            for kind, value in _param_bytes(engine, param).items():
                counts[kind] += value
        layers[name] = _with_totals(counts)
    out["layers"] = layers
    return out


# ---------------------------------------------------------------------- tensors a rank really holds
HELD_KINDS = ("params_lp", "params_fp32", "optimizer_states", "gradients_and_buffers")
_WALKED_PACKAGES = ("deepspeed", "torch.optim", "torch.nn", "vp_dist", "transformers")


def _storage_key(tensor: torch.Tensor) -> tuple | None:
    """(device, address) of the memory a tensor views; None for meta and empty storages."""
    if tensor.device.type == "meta" or tensor.untyped_storage().nbytes() == 0:
        return None
    return str(tensor.device), tensor.untyped_storage().data_ptr()


def _reachable_storages(roots) -> dict[tuple, int]:
    """{storage key: allocated bytes} of every tensor reachable from `roots`, each storage once.

    Follows containers, tensor attributes (`.grad`, DeepSpeed's `ds_tensor`, `_hp_mapping`, ...)
    and the attributes of objects from torch.nn/torch.optim/DeepSpeed/transformers/vp_dist; not
    the DeepSpeed engine itself (it also holds data loaders), functions or C++ handles.
    """
    from deepspeed.runtime.engine import DeepSpeedEngine

    storages: dict[tuple, int] = {}
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        obj = stack.pop()
        if id(obj) in seen or obj is None or isinstance(obj, (str, bytes, int, float, bool, DeepSpeedEngine)):
            continue
        seen.add(id(obj))
        if isinstance(obj, torch.Tensor):
            key = _storage_key(obj)
            if key is not None:
                storages[key] = obj.untyped_storage().nbytes()
            if obj.is_leaf and obj.grad is not None:
                stack.append(obj.grad)
            stack.extend(vars(obj).values())  # Parameter attributes DeepSpeed sets
        elif isinstance(obj, dict):
            stack.extend(obj.keys())
            stack.extend(obj.values())
        elif isinstance(obj, (list, tuple, set, frozenset)) or type(obj).__name__ == "deque":
            stack.extend(obj)
        elif type(obj).__module__.startswith(_WALKED_PACKAGES) and hasattr(obj, "__dict__"):
            stack.extend(vars(obj).values())
    return storages


def held_tensor_bytes(engine) -> dict:
    """Bytes of the tensors this rank's engine holds, measured from their storages.

    A measurement independent of `partition_bytes` (which adds up the sizes each stage implies):
    walks the engine's module and its (ZeRO) optimizer object graph and counts every distinct
    storage once, at its allocated size, wherever it is referenced. Each storage is counted under
    the first kind that owns it: `params_fp32` (the flat fp32 master partitions), `optimizer_states`
    (tensors of the torch optimizer's state), `params_lp` (module parameters, their ZeRO-3
    partitions `ds_tensor`, the flat buffers they view), `gradients_and_buffers` (everything else:
    `.grad` tensors, gradient partitions, reduce buckets). Gradient buffers exist only within a
    step: call it between backward and `engine.step()` to see them. Returns `{kind: bytes,
    "total": bytes, "storages": count}`. Local, no collective.
    """
    def keys(tensors) -> set[tuple]:
        return {_storage_key(t) for t in tensors if t is not None} - {None}

    params = list(engine.module.parameters())
    owners = {
        "params_fp32": keys(flat_fp32_partitions(engine)),
        "optimizer_states": keys(v for state in basic_optimizer(engine).state.values() for v in state.values()
                                 if torch.is_tensor(v)),
        "params_lp": keys([p.data for p in params] + [getattr(p, "ds_tensor", None) for p in params]),
    }
    held = dict.fromkeys(HELD_KINDS, 0)
    storages = _reachable_storages([engine.module, engine.optimizer])
    for key, nbytes in storages.items():
        kind = next((kind for kind, owned in owners.items() if key in owned), "gradients_and_buffers")
        held[kind] += nbytes
    held["total"] = sum(held[kind] for kind in HELD_KINDS)
    held["storages"] = len(storages)
    return held


# ---------------------------------------------------------------------- tensor parallelism (AutoTP)
# DeepSpeed AutoTP training (`"tensor_parallel": {"autotp_size": N}`, DeepSpeed 0.19) replaces, in
# `deepspeed.initialize`, each BERT projection with one of two layers of
# `deepspeed.module_inject.layers`:
#
# - `LinearLayer` (column-parallel: Q, K, V, FFN-in): this TP rank holds output rows
#   `[sum(_partition_sizes[:tp_index]), + _partition_sizes[tp_index])` of the weight and of the
#   bias; its output (what a forward hook sees) is that slice of the full output.
# - `LinearAllreduce` (row-parallel: attn-out, FFN-out): this TP rank holds input columns of the
#   weight (all output rows) and the full, replicated bias; its output is all-reduced over the TP
#   group, so a hook sees the full output, identical on every TP rank.
#
# `_orig_weight_shape` is the layer's shape before sharding; the split is frozen when the engine is
# built. All ranks of one TP group see the same tokens, so the statistics of a column-parallel row
# come from the one TP rank that computes it, and those of a row-parallel layer (and the token
# counts) from TP rank 0 alone; see `VariancePruner` and `LayerShard`.
@dataclass(frozen=True)
class LayerShard:
    """What one rank holds and observes of one prunable layer under tensor parallelism.

    full_rows: the layer's output rows before sharding (d_out of the meters and masks).
    held:      the layer's global output rows that this rank's weight and bias rows are (row i of the
               local weight is global row held.start + i): a slice for column-parallel layers, all
               rows otherwise.
    observed:  the global output rows whose statistics this rank contributes: `held` for
               column-parallel layers; all rows on TP rank 0 and None (nothing) on the other TP ranks
               for row-parallel or replicated layers, whose outputs every TP rank sees whole.
    counts_tokens: whether this rank contributes the layer's token count (TP rank 0 only).
    """

    full_rows: int
    held: slice
    observed: slice | None
    counts_tokens: bool


def _autotp_classes() -> tuple[type, type]:
    from deepspeed.module_inject.layers import LinearAllreduce, LinearLayer
    return LinearLayer, LinearAllreduce


def tensor_parallel_size(modules) -> int:
    """The TP degree of AutoTP layers among `modules` (1 when none is sharded)."""
    column, row = _autotp_classes()
    sizes = {int(getattr(m, "tp_world_size", 1)) for m in modules if isinstance(m, (column, row))}
    if len(sizes) > 1:
        raise ValueError(f"AutoTP layers with different TP sizes {sorted(sizes)}")
    return sizes.pop() if sizes else 1


def layer_shard(module: nn.Module) -> LayerShard:
    """How `module` (an AutoTP layer or a plain linear layer) is sharded on this rank."""
    column, row = _autotp_classes()
    if isinstance(module, (column, row)) and module.tp_world_size > 1 and hasattr(module.weight, "ds_id"):
        raise NotImplementedError("ZeRO stage 3 under AutoTP tensor parallelism is not supported by Variance "
                                  "Pruning (the TP shard is itself partitioned; not tried): use ZeRO stage 0-2")
    if isinstance(module, column) and module.tp_world_size > 1:
        full_rows = int(module._orig_weight_shape[0])
        start = sum(module._partition_sizes[:module.tp_index])
        held = slice(start, start + int(module._partition_sizes[module.tp_index]))
        if module.weight.shape[0] != held.stop - held.start:
            raise RuntimeError(f"AutoTP layer holds {module.weight.shape[0]} rows, its split says "
                               f"{tuple(module._partition_sizes)} (DeepSpeed version change?)")
        return LayerShard(full_rows, held, held, module.tp_index == 0)
    full_rows = int(full_shape(module.weight)[0])
    tp_index = int(getattr(module, "tp_index", 0)) if isinstance(module, (column, row)) else \
        tensor_parallel_groups()["tp_rank"]
    observes = tp_index == 0
    return LayerShard(full_rows, slice(0, full_rows), slice(0, full_rows) if observes else None, observes)


def tensor_parallel_groups() -> dict:
    """This rank's place in the tp x dp grid: `{"tp_rank", "tp_size", "dp_rank", "dp_size",
    "tp_group", "dp_group"}`, from DeepSpeed's groups (set up by `deepspeed.initialize` with
    `tensor_parallel.autotp_size`). The data split uses dp_rank/dp_size: ranks of one TP group must
    read the same batch."""
    from deepspeed.utils import groups
    try:
        tp_size = groups.get_tensor_model_parallel_world_size()
    except (AssertionError, AttributeError, RuntimeError):
        tp_size = 1
    if tp_size <= 1:
        world = dist.get_world_size() if dist.is_initialized() else 1
        rank = dist.get_rank() if dist.is_initialized() else 0
        return {"tp_rank": 0, "tp_size": 1, "dp_rank": rank, "dp_size": world, "tp_group": None,
                "dp_group": None}
    return {"tp_rank": groups.get_tensor_model_parallel_rank(), "tp_size": tp_size,
            "dp_rank": groups.get_data_parallel_rank(), "dp_size": groups.get_data_parallel_world_size(),
            "tp_group": groups.get_tensor_model_parallel_group(), "dp_group": groups.get_data_parallel_group()}


def consolidated_tp_state_dict(engine) -> dict | None:
    """The full (unsharded) parameters of an AutoTP engine's module, on CPU, in the module dtype:
    a dict on global rank 0, None on the other ranks. Collective: every rank must call it."""
    return engine._consolidated_16bit_state_dict()


def tensor_parallel_full(module: nn.Module, param_name: str, shard: torch.Tensor) -> torch.Tensor:
    """The full tensor of parameter `param_name` ("weight" or "bias") of `module` from this TP
    rank's `shard` of it (its fp32 master or an optimizer state: same split as the parameter).
    Column-parallel weights and biases are split along dim 0, row-parallel weights along dim 1
    (row-parallel biases and plain modules are whole already). Collective over the TP group for
    sharded parameters; DeepSpeed pads uneven shards for the gather and trims them back."""
    column, row = _autotp_classes()
    if not isinstance(module, (column, row)) or module.tp_world_size <= 1:
        return shard
    if isinstance(module, row) and param_name != "weight":
        return shard
    dim = 0 if isinstance(module, column) else 1
    return module._all_gather_shards(shard.contiguous(), module._partition_sizes, dim=dim).contiguous()


class TensorParallelGrid:
    """The `mpu` DeepSpeed reads for a tp x dp run whose model is sharded by our own layers (no
    AutoTP): ZeRO 1/2 partition and reduce over the data-parallel group, the gradient norm sums
    parameters marked `tensor_model_parallel` over the TP group (the others counted on TP rank 0).
    DeepSpeed 0.19 asks both the `model_parallel` and the `tensor_model_parallel` names."""

    def __init__(self, grid: dict):
        self.grid = grid

    def get_model_parallel_rank(self):
        return self.grid["tp_rank"]

    def get_model_parallel_world_size(self):
        return self.grid["tp_size"]

    def get_model_parallel_group(self):
        return self.grid["tp_group"]

    get_tensor_model_parallel_rank = get_model_parallel_rank
    get_tensor_model_parallel_world_size = get_model_parallel_world_size
    get_tensor_model_parallel_group = get_model_parallel_group

    def get_tensor_model_parallel_src_rank(self):
        return dist.get_global_rank(self.grid["tp_group"], 0)

    def get_data_parallel_rank(self):
        return self.grid["dp_rank"]

    def get_data_parallel_world_size(self):
        return self.grid["dp_size"]

    def get_data_parallel_group(self):
        return self.grid["dp_group"]

    def get_data_parallel_group_ranks(self):
        return dist.get_process_group_ranks(self.grid["dp_group"])

    def get_pipeline_model_parallel_world_size(self):
        return 1

    def get_pipeline_model_parallel_rank(self):
        return 0


def autotp_layer_names(module: nn.Module) -> list[str]:
    """Names of the AutoTP layers (`LinearLayer`, `LinearAllreduce`) inside `module`."""
    column, row = _autotp_classes()
    return [name for name, sub in module.named_modules() if isinstance(sub, (column, row))]


def init_tensor_parallel_groups(tensor_parallel: int) -> None:
    """DeepSpeed's tp x dp process groups (the layout AutoTP makes: TP groups of consecutive ranks),
    for a run whose model is sharded by vp-dist's own layers; nothing if they exist. Collective."""
    from deepspeed.utils import groups
    groups._init_tp_mesh_device(tensor_model_parallel_size=tensor_parallel)
