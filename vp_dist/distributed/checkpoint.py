"""Checkpoints that resume Variance Pruning anywhere in its schedule (SPEC 6).

A checkpoint is DeepSpeed's own (module, ZeRO optimizer partitions, LR scheduler, step counters)
plus the pruner's state: meters, masks, schedule position, and whether and how the model was
squeezed. The pruner's state travels twice: in DeepSpeed's `client_state`, and in
`<tag>/variance_pruning.pt`, which a loader reads *before* it builds anything, because a squeezed
checkpoint needs the squeezed module structure before `deepspeed.initialize`. That file also lists
the size and SHA-256 of every file of the checkpoint (flushed to disk), so a truncated or corrupted
checkpoint is refused up front. `latest` is written last, atomically, so it only ever names a
complete checkpoint; a save that fails (full disk, unwritable folder) raises
:class:`CheckpointWriteError` and leaves `latest` and the checkpoint it names as they were.

The statistics are global sums (all-reduced each step), so the pruner state is the same on every
rank and independent of the world size; the ZeRO partitions are not. Resuming on another number
of data-parallel ranks goes through DeepSpeed's universal checkpoint: the loader converts the
checkpoint once (`deepspeed.checkpoint.ds_to_universal`, on rank 0, into `<tag>_universal`) and
loads it with `checkpoint.load_universal`.
"""
from __future__ import annotations

import copy
import dataclasses
import errno
import hashlib
import os
import types
from typing import Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from .. import adapters
from ..config import VPConfig
from ..pruner import VariancePruner, check_state_compatible, prepare_model
from .fault_points import fault_point
from .rebuild import adopt_engine, build_engine, engine_folds
from .zero import full_shape, tensor_parallel_size, zero_stage

VP_FILE = "variance_pruning.pt"
CLIENT_KEY = "variance_pruning"
CHECKPOINT_VERSION = 1


def _rank() -> int:
    return dist.get_rank() if dist.is_initialized() else 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


class CheckpointWriteError(OSError):
    """A checkpoint could not be written; `latest` and the checkpoint it names are unchanged."""


def _atomic_write(path: str, write: Callable[[str], None]) -> None:
    temporary = f"{path}.tmp{os.getpid()}"
    try:
        write(temporary)
        _fsync(temporary)
        os.replace(temporary, path)
    finally:
        if os.path.exists(temporary):
            os.remove(temporary)
    _fsync(os.path.dirname(path) or ".")  # the rename itself


def _fsync(path: str) -> None:
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def _sha256(path: str, sync: bool = False) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
        if sync:  # on disk before `latest` names the checkpoint
            os.fsync(handle.fileno())
    return digest.hexdigest()


def _manifest(directory: str) -> dict[str, dict]:
    """{relative path: {"bytes", "sha256"}} of every file of a checkpoint but the VP file."""
    files = {}
    for root, _, names in os.walk(directory):
        for name in names:
            path = os.path.join(root, name)
            if name != VP_FILE and ".tmp" not in name:
                files[os.path.relpath(path, directory)] = {"bytes": os.path.getsize(path),
                                                           "sha256": _sha256(path, sync=True)}
    return files


def checkpoint_write_error(error: OSError, save_dir: str, tag: str) -> CheckpointWriteError:
    """The clear error for a checkpoint file that could not be written (also for files saved beside it)."""
    return _write_error(error, save_dir, tag, _latest(save_dir))


def _write_error(error: OSError, save_dir: str, tag: str, previous: str | None) -> CheckpointWriteError:
    if isinstance(error, CheckpointWriteError):
        return error
    kept = (f"`latest` still names {previous}, which is intact: re-run to resume from it"
            if previous else "no earlier checkpoint exists")
    fix = {errno.ENOSPC: "free disk space or point output_dir at a larger disk",
           errno.EDQUOT: "free space within the disk quota or point output_dir elsewhere",
           errno.EACCES: f"make {save_dir} writable or point output_dir elsewhere",
           errno.EPERM: f"make {save_dir} writable or point output_dir elsewhere",
           errno.EROFS: "point output_dir at a writable file system"}.get(error.errno, "fix the cause above")
    return CheckpointWriteError(error.errno, f"checkpoint {tag} could not be written to {save_dir} "
                                f"({error.strerror or error}: {error.filename or save_dir}); {kept}. Fix: {fix}.")


def save_checkpoint(engine, pruner: VariancePruner, save_dir: str, tag: str | None = None,
                    client_state: dict | None = None) -> str:
    """Save DeepSpeed's checkpoint plus the pruner's state; every rank calls it. Returns the tag.

    `client_state` (e.g. the data loader's position) comes back from `load_checkpoint`.
    CheckpointWriteError if a file cannot be written; `latest` then still names the previous one.
    """
    tag = str(tag) if tag is not None else f"global_step{engine.global_steps}"
    previous = _latest(save_dir)
    if previous == tag:
        raise ValueError(f"tag={tag!r} is the checkpoint `latest` names: writing over it would leave no complete "
                         "checkpoint if this save failed; save under a new tag")
    try:
        return _save(engine, pruner, save_dir, tag, client_state)
    except (OSError, RuntimeError) as error:
        cause = error if isinstance(error, OSError) else _stream_writer_cause(error, save_dir)
        if cause is None:
            raise
        raise _write_error(cause, save_dir, tag, previous) from error


def _stream_writer_cause(error: RuntimeError, save_dir: str) -> OSError | None:
    """torch.save reports a failed write as `RuntimeError: [enforce fail at inline_container.cc] ...`
    with no errno; find the cause from the folder (full or unwritable), else None (not a write)."""
    if "inline_container" not in str(error) and "PytorchStreamWriter" not in str(error):
        return None
    status = os.statvfs(save_dir)
    if status.f_bavail * status.f_frsize < 16 * 2**20:
        return OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), save_dir)
    if not os.access(save_dir, os.W_OK):
        return OSError(errno.EACCES, os.strerror(errno.EACCES), save_dir)
    return OSError(errno.EIO, f"torch.save failed ({str(error).strip()[:200]})", save_dir)


def _latest(save_dir: str) -> str | None:
    try:
        with open(os.path.join(save_dir, "latest")) as handle:
            return handle.read().strip()
    except FileNotFoundError:
        return None


def _save(engine, pruner: VariancePruner, save_dir: str, tag: str, client_state: dict | None) -> str:
    rank = _rank()
    fault_point("checkpoint:start", rank)
    directory = os.path.join(save_dir, tag)
    if rank == 0 and os.path.exists(os.path.join(directory, VP_FILE)):
        os.remove(os.path.join(directory, VP_FILE))  # from an interrupted save of this tag: its manifest is stale
    vp_state = {
        "version": CHECKPOINT_VERSION,
        "pruner": pruner.state_dict(),
        # What a loader needs to rebuild the squeezed structure before building the engine.
        # shrink_attention: the rebuild shrank attention blocks whole (checkpoints without the key
        # come from engines that row-squeezed them; the tensor-parallel squeeze row-squeezes them too).
        # pad_ffn: the zero units the squeeze appended to folded FFNs (none under the TP squeeze).
        # head_widths: the shrunk attention's head layout (the parameters are the same under any).
        "squeeze": {"squeezed": pruner.squeezed, "fold_ffn": pruner.config.fold_ffn,
                    "shrink_attention": not pruner.tensor_parallel_squeezed,
                    "pad_ffn": 1 if pruner.tensor_parallel_squeezed else pruner.config.pad_ffn,
                    "head_widths": pruner.config.head_widths,
                    "masks": pruner.masks()},
        "dp_world_size": getattr(engine, "seq_dp_world_size", engine.dp_world_size),
        "tensor_parallel": pruner.tensor_parallel_squeezed or tensor_parallel_size(engine.module.modules()),
        # the model is sharded by vp-dist's tensor-parallel squeezed layers (a tp x dp engine, no AutoTP)
        "tensor_parallel_squeezed": bool(pruner.tensor_parallel_squeezed),
        "zero_stage": zero_stage(engine),
        "global_steps": engine.global_steps,
        "input_embedding_rows": _input_embedding_rows(engine.module),
    }
    from deepspeed.checkpoint.constants import (UNIVERSAL_CHECKPOINT_INFO, UNIVERSAL_CHECKPOINT_VERSION_KEY,
                                                UNIVERSAL_CHECKPOINT_VERSION_VALUE)
    # A data-parallel-only model needs no more than the version to convert to a universal checkpoint.
    universal_info = {UNIVERSAL_CHECKPOINT_VERSION_KEY: UNIVERSAL_CHECKPOINT_VERSION_VALUE}
    client_state = {UNIVERSAL_CHECKPOINT_INFO: universal_info, **(client_state or {}), CLIENT_KEY: vp_state}
    engine.save_checkpoint(save_dir, tag=tag, client_state=client_state, save_latest=False)
    _barrier()
    fault_point("checkpoint:files", rank)
    if rank == 0:
        vp_state["manifest"] = _manifest(directory)
        _atomic_write(os.path.join(directory, VP_FILE), lambda path: torch.save(vp_state, path))
        fault_point("checkpoint:manifest", rank)
        _atomic_write(os.path.join(save_dir, "latest"), lambda path: _write_text(path, tag))
    _barrier()
    fault_point("checkpoint:done", rank)
    return tag


def _write_text(path: str, text: str) -> None:
    with open(path, "w") as handle:
        handle.write(text)


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
    file the checkpoint listed at save time is truncated, unreadable or corrupt (SHA-256), before
    anything is loaded. Every rank reads every file once to check it.
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
    for name, expected in state["manifest"].items():
        _check_file(os.path.join(directory, name), expected)
    state["tag"] = tag
    return state


def _check_file(file: str, expected: int | dict) -> None:
    """The file is there with the size and SHA-256 saved (checkpoints before checksums: size only)."""
    expected = {"bytes": expected} if isinstance(expected, int) else expected
    if not os.path.isfile(file):
        raise FileNotFoundError(f"checkpoint file {file} is missing (the save listed it)")
    if os.path.getsize(file) != expected["bytes"]:
        raise ValueError(f"checkpoint file {file} is truncated: {os.path.getsize(file)} bytes, "
                         f"saved {expected['bytes']}")
    if "sha256" in expected and _sha256(file) != expected["sha256"]:
        raise ValueError(f"checkpoint file {file} is corrupt: its SHA-256 differs from the one saved in the manifest "
                         "(resume from an earlier checkpoint with tag=, or restore the file)")


def _input_embedding_rows(model: nn.Module) -> int | None:
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return full_shape(embeddings.weight)[0] if embeddings is not None else None


def check_model_matches(state: dict, model: nn.Module, families: tuple = ()) -> None:
    """ValueError unless `model` (dense) has the prunable layers the checkpoint's masks describe
    and as many input-embedding rows (the tokenizer's vocabulary) as the checkpoint."""
    saved_rows, rows = state.get("input_embedding_rows"), _input_embedding_rows(model)
    if saved_rows is not None and rows is not None and saved_rows != rows:
        raise ValueError(f"the checkpoint's input embedding has {saved_rows} rows, this model {rows}: the tokenizer "
                         "does not match the checkpoint's vocabulary. Resume with the tokenizer the checkpoint was "
                         "trained with (a run's own is in OUTPUT_DIR/tokenizer), or start a new output_dir")
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


def check_tensor_parallel_matches(state: dict, ds_config: dict, load_dir: str) -> int:
    """This run's TP size, if it is the checkpoint's; ValueError otherwise. The pruner state is
    global (full rows), but the weights and ZeRO partitions are saved per TP shard, and converting
    them to another TP size is not implemented."""
    saved = int(state.get("tensor_parallel", 1))
    current = int((ds_config.get("tensor_parallel") or {}).get("autotp_size") or 1)
    if saved != current:
        raise ValueError(
            f"checkpoint {os.path.join(load_dir, state['tag'])} was written with tensor_parallel={saved}, this run "
            f"has tensor_parallel={current}: resume with tensor_parallel={saved}; converting a checkpoint between "
            "TP sizes is not implemented (start a new run from the consolidated masked export instead)")
    data_parallel = dist.get_world_size() // current
    if current > 1 and state["zero_stage"] > 0 and state["dp_world_size"] != data_parallel:
        raise ValueError(
            f"checkpoint {os.path.join(load_dir, state['tag'])} has {state['dp_world_size']} data-parallel ranks "
            f"per TP shard at ZeRO {state['zero_stage']}, this run {data_parallel}: under tensor parallelism resume "
            "on the same tp x dp layout (a universal-checkpoint conversion of TP shards is not implemented)")
    return current


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
        # masks and fold settings, into the structure the engine rebuild made (`engine_folds`: FFN
        # folds and whole shrunk attention blocks); the checkpoint then fills the squeezed parameters.
        pruner = VariancePruner(model, dataclasses.replace(
            config, squeeze_at_target=False, fold_ffn=state["squeeze"]["fold_ffn"],
            pad_ffn=state["squeeze"].get("pad_ffn", 1), head_widths=state["squeeze"].get("head_widths", "split")))
        pruner.load_state_dict(state["pruner"])
        shrink_attention = state["squeeze"].get("shrink_attention", False)
        pruner.squeeze(inplace=True, folds=engine_folds(pruner, shrink_attention))
        pruner.config = config

    ds_config = copy.deepcopy(ds_config)
    load_tag = tag
    tensor_parallel = check_tensor_parallel_matches(state, ds_config, load_dir)
    if state["dp_world_size"] != dist.get_world_size() // tensor_parallel and state["zero_stage"] > 0:
        load_tag = _universal_tag(load_dir, tag)
        ds_config.setdefault("checkpoint", {})["load_universal"] = True
    if state.get("tensor_parallel_squeezed"):  # this rank's balanced shards, built as the squeeze built them
        from .tp_squeeze import shard_for_resume
        mpu = shard_for_resume(pruner, tensor_parallel)
        ds_config.pop("tensor_parallel", None)
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
