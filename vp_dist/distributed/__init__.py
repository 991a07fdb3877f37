"""Distributed collaborators of the pruner: DeepSpeed data-parallel collectives, ZeRO state access,
engine rebuild after squeezing, checkpoints.

    model = vp_dist.prepare_model(BertForPreTraining(config))   # biases exist before the engine
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
    pruner = VariancePruner(engine, VPConfig(...))   # uses engine_collaborators(engine)
    for batch in loader:
        with pruner.observe(batch["attention_mask"]):
            loss = engine(**batch).loss
        engine.backward(loss)
        engine.step()
        pruner.step()
        engine = pruner.engine     # a new, smaller engine once squeezed (squeeze_at_target)
"""
from __future__ import annotations

from .devices import collective_device, on_collective_device
from .reducer import DataParallelReducer
from .zero import (LayerShard, ZeroParameterStore, full_shape, layer_shard, partition_bytes, tensor_parallel_groups,
                   tensor_parallel_size, zero_stage)

__all__ = ["DataParallelReducer", "LayerShard", "ZeroParameterStore", "collective_device", "engine_collaborators",
           "engine_layer_shards", "full_shape", "on_collective_device", "partition_bytes", "tensor_parallel_groups",
           "zero_stage"]


def engine_collaborators(engine):
    """(reducer, parameter store) for a DeepSpeed engine: its data-parallel group, its ZeRO state.

    Under AutoTP (tp x dp) the reducer spans the whole world: each rank places its share of the
    statistics in the global flat layout (zeros elsewhere, see `engine_layer_shards`), so one sum
    over all tp x dp ranks both assembles the TP slices and adds the data-parallel batches.
    """
    if tensor_parallel_size(engine.module.modules()) > 1:
        return DataParallelReducer(None), ZeroParameterStore(engine)
    return DataParallelReducer.for_engine(engine), ZeroParameterStore(engine)


def engine_layer_shards(modules) -> list[LayerShard] | None:
    """Per prunable module, what this rank holds and observes under AutoTP; None without TP."""
    modules = list(modules)
    if tensor_parallel_size(modules) <= 1:
        return None
    return [layer_shard(module) for module in modules]
