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
from .zero import ZeroParameterStore, full_shape, partition_bytes, zero_stage

__all__ = ["DataParallelReducer", "ZeroParameterStore", "collective_device", "engine_collaborators", "full_shape",
           "on_collective_device", "partition_bytes", "zero_stage"]


def engine_collaborators(engine):
    """(reducer, parameter store) for a DeepSpeed engine: its data-parallel group, its ZeRO state."""
    return DataParallelReducer.for_engine(engine), ZeroParameterStore(engine)
