"""Proof that pruned rows are zero where DeepSpeed keeps them (SPEC 4), for the run's report.

At every pruning, before any squeeze: the largest |value| over all pruned weight rows, in the fp32
masters and every optimizer state (full tensors gathered from the ZeRO partitions of every rank)
and in the low-precision weights the forward reads (max over ranks: stages 1-2 hold one full copy
per rank). Rows pruned at earlier events have by then been through optimizer steps, so this also
checks that their gradients were masked. All zeros is the pass; every rank calls it.
"""
from __future__ import annotations

import torch
import torch.distributed as dist

from ..distributed.devices import collective_device
from ..distributed.zero import get_full, optimizer_state_keys

KINDS = ("module_weight", "fp32_master")


def pruned_rows_max_abs(pruner, engine) -> dict[str, float]:
    """{"module_weight", "fp32_master", <optimizer state key>...: max |value| over pruned rows}."""
    from ..export.exporters import gathered
    state_keys = optimizer_state_keys(engine)
    largest = dict.fromkeys((*KINDS, *state_keys), 0.0)
    # Under tensor parallelism each rank checks the rows of its own shard (the max is over all ranks).
    masks = [pruner.held_kept(index).cpu() for index in range(len(pruner.layers))]
    with gathered(engine.module):  # ZeRO-3: the low-precision module weights, whole, for the block
        for layer, kept in zip(pruner.layers, masks):
            pruned = ~kept
            weight = layer.module.weight
            largest["module_weight"] = max(largest["module_weight"], _max_abs(weight.detach(), pruned))
    for layer, kept in zip(pruner.layers, masks):
        pruned = ~kept
        weight = layer.module.weight
        for kind, key in (("fp32_master", None), *((k, k) for k in state_keys)):
            value = get_full(weight, engine, key)  # a collective at ZeRO >= 1: same order on every rank
            if value is not None:
                largest[kind] = max(largest[kind], _max_abs(value, pruned))
    values = torch.tensor(list(largest.values()), dtype=torch.float64, device=collective_device())
    if dist.is_initialized():
        dist.all_reduce(values, op=dist.ReduceOp.MAX)
    return dict(zip(largest, values.tolist()))


def _max_abs(value: torch.Tensor, pruned: torch.Tensor) -> float:
    if not bool(pruned.any()) or value.numel() == 0:
        return 0.0
    rows = value.reshape(pruned.numel(), -1)[pruned.to(value.device)]
    return float(rows.abs().max())
