"""Checkpoints that resume Variance Pruning anywhere in its schedule (SPEC 6).

A checkpoint is DeepSpeed's own (module, ZeRO optimizer partitions, LR scheduler, step counters)
plus the pruner's state: meters, masks, schedule position, and whether and how the model was
squeezed. The pruner's state travels twice: in DeepSpeed's `client_state`, and in
`<tag>/variance_pruning.pt`, which a loader reads *before* it builds anything, because a squeezed
checkpoint needs the squeezed module structure before `deepspeed.initialize`. That file also lists
the size of every file of the checkpoint, so a truncated checkpoint is refused up front. `latest`
is written last, so it only ever names a complete checkpoint.

The statistics are global sums (all-reduced each step), so the pruner state is the same on every
rank and independent of the world size; the ZeRO partitions are not. Resuming on another number
of data-parallel ranks goes through DeepSpeed's universal checkpoint: the loader converts the
checkpoint once (`deepspeed.checkpoint.ds_to_universal`, on rank 0, into `<tag>_universal`) and
loads it with `checkpoint.load_universal`.
"""
from __future__ import annotations

import copy
import dataclasses
import os
import types
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from .. import adapters
from ..config import VPConfig
from ..pruner import VariancePruner, check_state_compatible, prepare_model
from .rebuild import adopt_engine, build_engine
from .zero import full_shape, zero_stage

VP_FILE = "variance_pruning.pt"
CLIENT_KEY = "variance_pruning"
CHECKPOINT_VERSION = 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    temporary = f"{path}.tmp{os.getpid()}"
    write(temporary)
    os.replace(temporary, path)


def _manifest(directory: str) -> dict[str, int]:
    sizes = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            if name != VP_FILE and ".tmp" not in name:
                sizes[os.path.relpath(path, directory)] = os.path.getsize(path)
    return sizes


def save_checkpoint(engine, pruner: VariancePruner, save_dir: str, tag: str | None = None,
                    client_state: dict | None = None) -> str:
    """Save DeepSpeed's checkpoint plus the pruner's state; every rank calls it. Returns the tag.

    `client_state` (e.g. the data loader's position) comes back from `load_checkpoint`.
    """
    tag = str(tag) if tag is not None else f"global_step{engine.global_steps}"
    vp_state = {
        "version": CHECKPOINT_VERSION,
        "pruner": pruner.state_dict(),
        # What a loader needs to rebuild the squeezed structure before building the engine.
        "squeeze": {"squeezed": pruner.squeezed, "fold_ffn": pruner.config.fold_ffn, "masks": pruner.masks()},
        "dp_world_size": getattr(engine, "seq_dp_world_size", engine.dp_world_size),
        "zero_stage": zero_stage(engine),
        "global_steps": engine.global_steps,
    }
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)
    # A data-parallel-only model needs no more than the version to convert to a universal checkpoint.
    universal_info = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
    client_state = {UNIVERSAL_CHECKPOINT_INFO: universal_info, **(client_state or {}), CLIENT_KEY: vp_state}
    engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)
    _barrier()
    directory = os.path.join(save_dir, tag)
    if _rank() == 0:
        vp_state["manifest"] = _manifest(directory)
        _atomic_write(os.path.join(directory, VP_FILE), lambda path: torch.save(vp_state, path))
        _atomic_write(os.path.join(save_dir, "latest"), lambda path: open(path, "w").write(tag))
    _barrier()
    return tag


def resolve_tag(load_dir: str, tag: str | None = None) -> str:
    if tag is not None:
        return str(tag)
    latest = os.path.join(load_dir, "latest")
    if not os.path.isfile(latest):
        raise FileNotFoundError(f"no checkpoint to resume in {load_dir}: {latest} does not exist "
                                "(pass tag= to name one)")
    with open(latest) as handle:
        return handle.read().strip()


def read_vp_state(load_dir: str, tag: str | None = None) -> dict:
    """The Variance Pruning state of a checkpoint, checked for completeness; touches nothing else.

    FileNotFoundError if the checkpoint or its VP file is missing; ValueError if the VP file or any
    file the checkpoint listed at save time is truncated or unreadable.
    """
    tag = resolve_tag(load_dir, tag)
    directory = os.path.join(load_dir, tag)
    path = os.path.join(directory, VP_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} does not exist: {directory} is not a complete vp-dist checkpoint "
                                "(saved without vp_dist.distributed.save_checkpoint, or the save was interrupted)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as error:  # torch raises several types for a cut zip archive
        raise ValueError(f"{path} is truncated or corrupt and cannot be read ({type(error).__name__}: {error})") from error
    missing = [key for key in ("version", "pruner", "squeeze", "dp_world_size", "zero_stage", "manifest")
               if key not in state]
    if missing:
        raise ValueError(f"{path} lacks {missing}: truncated or written by another version")
    if state["version"] != CHECKPOINT_VERSION:
        raise ValueError(f"{path} has checkpoint version {state['version']}, this vp-dist reads {CHECKPOINT_VERSION}")
    for name, size in state["manifest"].items():
        file = os.path.join(directory, name)
        if not os.path.isfile(file):
            raise FileNotFoundError(f"checkpoint file {file} is missing (the save listed it)")
        if os.path.getsize(file) != size:
            raise ValueError(f"checkpoint file {file} is truncated: {os.path.getsize(file)} bytes, saved {size}")
    state["tag"] = tag
    return state


def check_model_matches(state: dict, model: nn.Module, families: tuple = ()) -> None:
    """ValueError unless `model` (dense) has the prunable layers the checkpoint's masks describe."""
    layers = adapters.prunable_layers(model, families)
    check_state_compatible(state["pruner"], [layer.name for layer in layers],
                           [full_shape(layer.module.weight)[0] for layer in layers])


def _universal_tag(load_dir: str, tag: str) -> str:
    """Convert `tag` to DeepSpeed's universal format once (rank 0), for another world size."""
    universal = f"{tag}_universal"
    folder = os.path.join(load_dir, universal)
    done = os.path.join(folder, ".converted")
    if _rank() == 0 and not os.path.isfile(done):
        from deepspeed.checkpoint.ds_to_universal import main as ds_to_universal
        ds_to_universal(types.SimpleNamespace(
            input_folder=os.path.join(load_dir, tag), output_folder=folder, num_extract_workers=1,
            num_merge_workers=1, keep_temp_folder=False, strict=True, inject_missing_state=True))
        open(done, "w").close()
    _barrier()
    return universal


def load_checkpoint(model: nn.Module, ds_config: dict, load_dir: str, tag: str | None = None,
                    vp_config: VPConfig | None = None,
                    model_parameters: Callable[[nn.Module], object] | None = None,
                    optimizer=None, lr_scheduler=None, mpu=None):
    """Resume: returns `(engine, pruner, client_state)`. Every rank calls it.

    model: the *dense* Hugging Face model, freshly built (its weights are replaced by the
    checkpoint's). The VP state is read and checked against it before anything is built; a
    squeezed checkpoint gets the model squeezed to the saved masks before `deepspeed.initialize`.
    ds_config: the DeepSpeed config for *this* run (its batch sizes fit the current world size).
    vp_config: defaults to the saved one. model_parameters: `model -> parameters or param groups`
    (default `model.parameters()`), applied to the model as built (squeezed if it was).
    A different data-parallel world size than at save time (pure data parallelism: the world size)
    goes through a universal checkpoint, written next to the checkpoint (`<tag>_universal`).
    """
    state = read_vp_state(load_dir, tag)
    tag = state["tag"]
    config = vp_config or VPConfig.from_dict(state["pruner"]["config"])
    check_model_matches(state, model, config.families)
    if not dist.is_initialized():
        import deepspeed
        deepspeed.init_distributed()
    prepare_model(model, config)

    pruner = None
    if state["squeeze"]["squeezed"]:
        # The pruner is built on the dense model, restored, and squeezes it in place with the saved
        # masks and fold setting; the checkpoint then fills the squeezed parameters.
        pruner = VariancePruner(model, dataclasses.replace(
            config, squeeze_at_target=False, fold_ffn=state["squeeze"]["fold_ffn"]))
        pruner.load_state_dict(state["pruner"])
        pruner.squeeze(inplace=True)
        pruner.config = config

    ds_config = copy.deepcopy(ds_config)
    load_tag = tag
    if state["dp_world_size"] != dist.get_world_size() and state["zero_stage"] > 0:
        load_tag = _universal_tag(load_dir, tag)
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    parameters = model_parameters(model) if model_parameters is not None else model.parameters()
    engine = build_engine(model, ds_config, parameters, optimizer, lr_scheduler, mpu=mpu)
    load_path, client_state = engine.load_checkpoint(load_dir, tag=load_tag)
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load the checkpoint {os.path.join(load_dir, load_tag)}")
    if pruner is None:
        pruner = VariancePruner(engine, config)
        pruner.load_state_dict(state["pruner"])
    else:
        adopt_engine(pruner, engine)
    client_state = dict(client_state or {})
    client_state.pop(CLIENT_KEY, None)
    client_state.pop("universal_checkpoint_info", None)
    return engine, pruner, client_state
