"""The pre-training loop: phases of MLM (+NSP) with Variance Pruning, on a DeepSpeed engine.

Reads top to bottom: start the process group, tokenizer, model, engine + pruner (or resume from
the latest checkpoint), then for every phase and step: micro-batches inside `pruner.observe`,
`engine.backward/step`, `pruner.step()`; squeeze and re-partition once the target is reached;
checkpoints, logs and the report on the way.
"""
from __future__ import annotations

import json
import logging
import time
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..data.checks import check_corpus_files, check_same_tokenizer, check_tokenizer_fits_model, vocabulary_sha256
from ..distributed import tensor_parallel_groups
from ..distributed.fault_points import fault_point
from ..distributed.memory import RebuildMemory
from ..distributed.rebuild import loss_scale
from ..pruner import VariancePruner
from .config import RunConfig, changed_settings, read_deepspeed_config
from .distributed_env import init_distributed, peer_failures_explained
from .flops import model_flops
from .model import build_model, mlm_head_at
from .preemption import StopRequest
from .verify import pruned_rows_max_abs
from . import artifacts

logger = logging.getLogger(__name__)


def configure_logging(rank: int) -> None:
    level = logging.INFO if rank == 0 else logging.WARNING
    logging.basicConfig(level=level, format=f"[rank {rank}] %(asctime)s %(name)s: %(message)s", force=True)


def deepspeed_config(cfg: RunConfig, world_size: int) -> dict:
    """The DeepSpeed config file with the run's batch shape, learning rate and step counts."""
    ds = read_deepspeed_config(cfg, world_size)  # checked again: the launcher's world size was a guess
    first = cfg.phases[0]
    data_parallel = world_size // cfg.tensor_parallel
    ds["train_micro_batch_size_per_gpu"] = first.micro_batch
    ds["gradient_accumulation_steps"] = first.global_batch // (first.micro_batch * data_parallel)
    if cfg.tensor_parallel > 1:
        # DeepSpeed 0.19 checks train_batch_size against all ranks, TP ones included, when AutoTP
        # comes from the config: leave it out (it follows from the two above); the loop then sets
        # the phase's global batch on the engine, which counts data-parallel ranks only.
        ds.pop("train_batch_size", None)
        ds["tensor_parallel"] = {**(ds.get("tensor_parallel") or {}), "autotp_size": cfg.tensor_parallel}
    else:
        ds["train_batch_size"] = first.global_batch
    accum = grad_accum_dtype(cfg.grad_accum_dtype, ds)
    if accum is not None:
        ds.setdefault("data_types", {})["grad_accum_dtype"] = accum
    if "optimizer" in ds:
        ds["optimizer"].setdefault("params", {}).update(lr=cfg.lr, weight_decay=cfg.weight_decay)
    if "scheduler" in ds:
        params = ds["scheduler"].setdefault("params", {})
        params.update(warmup_max_lr=cfg.lr, warmup_num_steps=cfg.warmup_steps,
                      total_num_steps=max(cfg.total_steps, cfg.warmup_steps + 1))
    return ds


def grad_accum_dtype(setting: str, ds: dict) -> str | None:
    """DeepSpeed's `data_types.grad_accum_dtype` for the run (None: leave DeepSpeed's default).

    "auto": fp32 when the model is bf16 under ZeRO 1-3 (DeepSpeed 0.19 accumulates micro-batch
    gradients in fp32 there: stage 1 through its BF16_Optimizer, stages 2-3 in fp32 gradient
    partitions), unless the DeepSpeed config names one itself; otherwise the model's dtype
    (fp16 accumulates in fp16 under the loss scaler, fp32 in fp32).
    """
    if setting not in ("auto", "fp32", "bf16", "fp16"):
        raise ValueError(f"grad_accum_dtype={setting!r} must be auto, fp32, bf16 or fp16")
    if setting != "auto":
        return setting
    configured = ds.get("data_types", {}).get("grad_accum_dtype")
    stage = ds.get("zero_optimization", {}).get("stage", 0)
    if configured is None and ds.get("bf16", {}).get("enabled") and stage in (1, 2, 3):
        return "fp32"
    return None


def labelled_positions(labels: torch.Tensor) -> torch.Tensor:
    """Flat indices of the labelled (MLM-masked) positions of `labels` [batch, seq]. On the host
    batch, before it moves to the GPU, this costs no device synchronisation (`nonzero` on a GPU
    tensor must wait for the device to learn its size)."""
    return torch.nonzero(labels.reshape(-1) != -100).flatten()


def pretraining_loss(engine, batch: dict, objective: str, masked_positions_only: bool = True,
                     positions: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    """(loss, positions the MLM head ran at). With `masked_positions_only` the MLM head and its
    cross-entropy run at the labelled positions only (the same loss as the full head's: every
    other position is ignored by it). `positions`: `labelled_positions` of the batch's labels,
    taken on the host before the batch moved to the device (the training loop does so); without
    it they are computed here, a host sync per micro-batch where the labels are on a GPU."""
    inputs = dict(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                  token_type_ids=batch.get("token_type_ids"))
    labels = batch["labels"].reshape(-1)
    if masked_positions_only:
        positions = labelled_positions(labels) if positions is None else \
            positions.to(labels.device, non_blocking=True)
        with mlm_head_at(getattr(engine, "module", engine), positions):  # an engine or a plain model
            outputs = engine(**inputs)
        logits, labels = outputs.prediction_logits, labels.index_select(0, positions)
    else:
        outputs = engine(**inputs)
        logits = outputs.prediction_logits.reshape(-1, outputs.prediction_logits.shape[-1])
    loss = F.cross_entropy(logits.float(), labels, ignore_index=-100)
    if objective == "mlm+nsp":
        loss = loss + F.cross_entropy(outputs.seq_relationship_logits.float(), batch["next_sentence_label"])
    return loss, logits.shape[0]


def pretrain(cfg: RunConfig, stop_request: StopRequest | None = None) -> dict:
    """Run (or resume) a pre-training job; returns the final report on every rank.

    stop_request: its SIGUSR1 handler, installed early by the launcher (see train/preemption.py).
    A dead or hung rank makes the others raise PeerFailure within `cfg.dist_timeout_minutes`.
    """
    rank, _ = init_distributed(cfg.dist_timeout_minutes)
    configure_logging(rank)
    with peer_failures_explained(rank, cfg.dist_timeout_minutes, str(Path(cfg.output_dir) / "checkpoints")):
        return _pretrain(cfg, stop_request)


def _pretrain(cfg: RunConfig, stop_request: StopRequest | None = None) -> dict:
    import deepspeed
    from .data import PhaseData, prepare_tokenizer
    from ..distributed.checkpoint import checkpoint_write_error, load_checkpoint, save_checkpoint

    rank, world = dist.get_rank(), dist.get_world_size()
    output_dir = Path(cfg.output_dir)
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
        saved = output_dir / "run_config.json"
        if saved.is_file() and (output_dir / "checkpoints" / "latest").is_file():
            try:
                changes = changed_settings(json.loads(saved.read_text()), cfg.to_dict())
            except ValueError:  # an unreadable record: nothing to compare with
                changes = []
            if changes:  # some may be meant (a new target), some not (a tokenizer the checkpoint outlives)
                logger.warning("resuming with %d settings changed since the run's last start (run_config.json "
                               "now records the new ones): %s", len(changes), "; ".join(changes))
        saved.write_text(json.dumps(cfg.to_dict(), indent=2))
    torch.manual_seed(cfg.seed)

    check_corpus_files(None if cfg.data.corpus == "default" else cfg.data.corpus)  # every rank: all stop together
    tokenizer = prepare_tokenizer(cfg, rank)
    model = build_model(cfg.model, len(tokenizer), max(p.seq_len for p in cfg.phases))
    check_tokenizer_fits_model(tokenizer, model)
    ds_config = deepspeed_config(cfg, world)
    vp_config = cfg.vp_config()
    run = artifacts.RunRecord.start(cfg, model, world, ds_config)

    checkpoint_dir = output_dir / "checkpoints"
    if (checkpoint_dir / "latest").is_file():  # written last: names a complete checkpoint only
        engine, pruner, client_state = load_checkpoint(model, ds_config, str(checkpoint_dir), vp_config=vp_config)
        check_same_tokenizer(client_state.get("tokenizer_sha256"), tokenizer, str(checkpoint_dir))
        run.restore(client_state["run"])
        position = client_state["position"]
        if not artifacts.restore_rng_states(client_state.get("rng")):
            logger.warning("resuming on %d ranks from a checkpoint of %d: dropout randomness restarts",
                           world, len(client_state.get("rng") or []))
        logger.info("resumed from %s at phase %d step %d", checkpoint_dir, position["phase"], position["step"])
    else:
        engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=ds_config)
        pruner = VariancePruner(engine, vp_config)
        position = {"phase": 0, "step": 0, "data": None}

    stop_request = stop_request or StopRequest()  # SIGUSR1 (Slurm's time-limit warning): checkpoint, exit
    rebuild_memory = RebuildMemory(engine.device)  # steady-state peak before/after, the rebuild's own

    def checkpoint(step: int) -> None:
        nonlocal saved_at
        tag = f"step{step}"
        # The report goes in first: `latest`, written last by save_checkpoint, names complete tags only.
        if rank == 0:
            try:
                artifacts.write_run_outputs(run, pruner, checkpoint_dir / tag, render=False)
            except OSError as error:  # a full disk or an unwritable folder: say so, `latest` is untouched
                raise checkpoint_write_error(error, str(checkpoint_dir), tag) from error
        state = {"run": run.state_dict(), "position": position, "rng": artifacts.gather_rng_states(),
                 "tokenizer_sha256": vocabulary_sha256(tokenizer)}
        save_checkpoint(engine, pruner, str(checkpoint_dir), tag, client_state=state)
        saved_at = step

    global_step = sum(p.steps for p in cfg.phases[:position["phase"]]) + position["step"]
    # Global step of the last checkpoint written or resumed from (`latest` is never written over).
    saved_at = global_step if (checkpoint_dir / "latest").is_file() else None
    progress = artifacts.progress_bar(rank, cfg.total_steps, global_step)
    # The ranks of one TP group read the same batch: the data is split over data-parallel ranks only.
    grid = tensor_parallel_groups()
    data_rank, data_world = grid["dp_rank"], grid["dp_size"]
    if grid["tp_size"] != cfg.tensor_parallel:
        raise RuntimeError(f"the engine runs tensor parallelism {grid['tp_size']}, the run asked for "
                           f"{cfg.tensor_parallel}")
    flops = model_flops(engine.module)  # matmul FLOPs of the model as it is (recounted after the squeeze)
    for phase_index in range(position["phase"], len(cfg.phases)):
        phase = cfg.phases[phase_index]
        data = PhaseData(cfg, phase, tokenizer, data_rank, data_world, output_dir)
        if position["phase"] == phase_index and position["data"] is not None:
            data.load_state_dict(position["data"])
        engine.set_train_micro_batch_size(phase.micro_batch)
        engine.set_train_batch_size(phase.global_batch)
        observe = pruner.observe if phase.prune else (lambda mask: nullcontext())
        if not phase.prune and pruner.collecting:
            logger.warning("phase %s does not prune but the schedule is not finished (%d more prunings)",
                           phase.name, len([s for s, _ in pruner.schedule.pruning_steps() if s > pruner.steps_done]))
        start_step = position["step"] if position["phase"] == phase_index else 0
        for step in range(start_step, phase.steps):
            started, tokens, step_flops, losses = time.perf_counter(), 0, 0, []
            for batch in data.next_step():
                positions = labelled_positions(batch["labels"]) if cfg.model.masked_positions_only else None
                batch = {k: v.to(engine.device, non_blocking=True) for k, v in batch.items()}
                with observe(batch["attention_mask"]):
                    loss, predicted = pretraining_loss(engine, batch, phase.objective, cfg.model.masked_positions_only,
                                                       positions)
                engine.backward(loss)
                engine.step()
                losses.append(loss.detach())
                tokens = tokens + batch["attention_mask"].sum()  # stays on the device: no sync per micro-batch
                sequences, seq_len = batch["input_ids"].shape
                step_flops += flops.training(sequences, seq_len, predicted)
            event = pruner.step()
            if rebuild_memory.pending and (rebuild_figures := rebuild_memory.step_done()) is not None:
                run.record_rebuild(rebuild_figures)  # a step trained by the squeezed engine closes the window
            if event is not None and rank == 0:
                artifacts.save_prune_event(pruner, event, output_dir)
            if event is not None and cfg.verify_pruned_rows:
                run.record_pruned_rows(event.step, pruned_rows_max_abs(pruner, engine))
            if not pruner.squeezed:  # optimizer state exists from the first step on
                run.record_memory("before_squeeze", engine, only_if_missing=True)
            if event is not None and cfg.squeeze_at_target and pruner.schedule.is_finished(pruner.steps_done):
                run.record_memory("before_squeeze", engine)
                scale_before = loss_scale(engine)
                fault_point("squeeze:start", rank)
                engine = rebuild_memory.rebuild(pruner)  # pruner.squeeze(), measured
                fault_point("squeeze:done", rank)
                run.record_squeeze(pruner, scale_before, loss_scale(engine))
                run.record_memory("after_squeeze", engine)
                flops = model_flops(engine.module)
            global_step += 1
            position = {"phase": phase_index, "step": step + 1, "data": data.state_dict()}
            log = global_step % cfg.log_every == 0 or event is not None
            if log and torch.cuda.is_available():
                torch.cuda.synchronize()  # the window's time includes its last kernels
            run.record_step(global_step, phase.name, torch.stack(losses).mean(), tokens, step_flops,
                            time.perf_counter() - started, engine, pruner, event, log=log)
            progress.update(1)
            fault_point(f"step:{global_step}", rank)
            # From the last logged step (every pruning is logged): no device sync on other steps.
            last = run.history[-1] if run.history else None
            progress.set_postfix(phase=phase.name, loss=f"{last['loss']:.3f}" if last else "-",
                                 sparsity=f"{last['sparsity']:.2f}" if last else "-")
            stop = bool(cfg.stop_after) and global_step >= cfg.stop_after
            signalled = stop_request.due()
            if stop or signalled or (cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0):
                checkpoint(global_step)
            if stop or signalled:
                logger.info("%s: checkpointed at step %d; re-run to resume",
                            "stop requested" if signalled else f"stop_after={cfg.stop_after} reached", global_step)
                progress.close()
                dist.barrier()
                return run.report(pruner)
        position = {"phase": phase_index + 1, "step": 0, "data": None}
    progress.close()
    if rebuild_memory.pending:  # the run ended fewer than `after_steps` steps after the squeeze
        run.record_rebuild(rebuild_memory.finish())
    if saved_at != global_step:  # the last step may have been checkpointed already
        checkpoint(global_step)
    # Every rank calls the exporters (ZeRO-3 gathers parameters); rank 0 writes.
    from ..export import export_masked, export_squeezed
    export_masked(pruner, output_dir / "export_masked", tokenizer)      # stock transformers loads it
    export_squeezed(pruner, output_dir / "export_squeezed", tokenizer)  # compact, vp_dist Auto classes
    if rank == 0:
        artifacts.write_run_outputs(run, pruner, output_dir, render=cfg.render_report)
        logger.info("done: %s", output_dir)
    dist.barrier()
    return run.report(pruner)
