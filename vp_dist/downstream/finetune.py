"""Fine-tuning a dense, masked or squeezed BERT on a GLUE task or SQuAD v1.1, masks held fixed.

    metrics = finetune(FinetuneConfig(task="mrpc", model="runs/x/export_masked",
                                      data_dir="glue_data/MRPC", output_dir="runs/x/mrpc"))

Plain PyTorch (AdamW, linear warm-up and decay) on one process, or DeepSpeed (any ZeRO stage,
`deepspeed --num_gpus N launch/finetune.py ... --deepspeed_config ds_configs/zero2_bf16.json`)
with a DistributedSampler. Pruned rows of a masked model (masks from `--masks` or the export's
`masks.safetensors`) get their weight gradient masked, so they stay exactly zero under AdamW and
under ZeRO's fp32 master copy alike; their biases train, as in pre-training (SPEC 4). A squeezed
model has no pruned rows left to hold. Optional knowledge distillation from a dense teacher.
Writes `metrics.json` (paper Table 1 metrics) and, unless told not to, the fine-tuned model.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from vp_dist.downstream import tasks
from vp_dist.downstream.masks import MaskedRows

logger = logging.getLogger(__name__)


@dataclass
class FinetuneConfig:
    """task: GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte) or "squad".
    model: HF directory (dense), masked export, squeezed export, or a model fine-tuned from one of
        them (`output_dir/model`); a pre-training checkpoint is exported first (`launch/pretrain.py` writes both exports).
    masks: masks.safetensors of a masked model (default: `<model>/masks.safetensors` if present).
    batch_size: per-process micro-batch; the global batch is batch_size x grad_accum x world size.
    max_steps: optimizer steps (overrides epochs).
    pad_ffn: pad a squeezed model's FFN inner widths with zero units to a multiple of this for
        training (exact; VPConfig.pad_ffn; the saved model holds the unpadded widths); 1: off.
    head_widths: rebuild a squeezed model's shrunk attention with this head layout for training
        (exact; VPConfig.head_widths: split, equal or grouped); unset: the layout it was exported with.

    With a `teacher` (dense, fine-tuned on the task) the loss is distilled:
    (1 - kd_alpha) task loss + kd_alpha soft-target loss.
    """

    task: str
    model: str
    output_dir: str  # where metrics.json, predictions and the fine-tuned model go
    data_dir: str | None = None  # local GLUE TSV folder / SQuAD JSON(L) folder; None: the hub
    masks: str | None = None
    tokenizer: str | None = None  # tokenizer path or hub name; None: the one saved with the model
    max_seq_len: int | None = None  # tokens per example; None: 128 for GLUE, 384 for SQuAD
    doc_stride: int = 128  # SQuAD: overlap between windows of a long context
    batch_size: int = 32
    eval_batch_size: int = 64  # per-process batch for evaluation
    gradient_accumulation_steps: int = 1  # micro-batches per optimizer step
    lr: float = 2e-5  # peak learning rate (AdamW, linear warmup and decay)
    weight_decay: float = 0.01  # AdamW weight decay
    epochs: float = 3.0  # passes over the training set (max_steps overrides)
    max_steps: int | None = None
    warmup_ratio: float = 0.1  # fraction of the steps with a linear LR warmup
    max_grad_norm: float = 1.0  # gradient clipping norm
    seed: int = 42  # seed of initialisation, dropout and data order
    teacher: str | None = None  # dense model fine-tuned on the task, for distillation; None: no KD
    kd_alpha: float = 0.5  # weight of the soft-target (KD) loss: (1 - a) task loss + a KD loss
    kd_temperature: float = 2.0  # softmax temperature of the KD loss (scaled by T^2)
    deepspeed_config: str | None = None  # DeepSpeed config JSON; None: plain PyTorch
    max_train_samples: int | None = None  # use the first N training examples (quick runs)
    max_eval_samples: int | None = None  # use the first N evaluation examples (quick runs)
    save_model: bool = True  # save the fine-tuned model in output_dir/model
    pad_ffn: int = 1
    head_widths: str | None = None
    device: str | None = None  # cpu | cuda | cuda:N; None: cuda if available
    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ValueError(f"FinetuneConfig: {message}")
        need(self.batch_size >= 1, f"batch_size={self.batch_size} must be >= 1")
        need(self.gradient_accumulation_steps >= 1,
             f"gradient_accumulation_steps={self.gradient_accumulation_steps} must be >= 1")
        need(self.lr > 0, f"lr={self.lr} must be > 0")
        need(self.max_steps is None or self.max_steps >= 1, f"max_steps={self.max_steps} must be >= 1")
        need(self.epochs > 0, f"epochs={self.epochs} must be > 0")
        need(0 <= self.warmup_ratio < 1, f"warmup_ratio={self.warmup_ratio} must be in [0, 1)")
        need(0 <= self.kd_alpha <= 1, f"kd_alpha={self.kd_alpha} must be in [0, 1]")
        need(self.kd_temperature > 0, f"kd_temperature={self.kd_temperature} must be > 0")
        need(self.pad_ffn >= 1, f"pad_ffn={self.pad_ffn} must be >= 1 (1: off)")
        need(self.head_widths in (None, "split", "equal", "grouped"),
             f"head_widths={self.head_widths!r} must be 'split', 'equal' or 'grouped' (or unset)")
        tasks.check_task_config(self, need)
        need(not self.masks or self.masks.endswith(".safetensors"),
             f"masks={self.masks!r} must be a .safetensors file (an export's masks.safetensors)")


def _parameter_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """No weight decay on biases and LayerNorm weights (BERT's fine-tuning recipe)."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if param.requires_grad:
            (no_decay if param.ndim < 2 or "LayerNorm" in name else decay).append(param)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def _deepspeed_config(cfg: FinetuneConfig, world: int, total_steps: int, warmup_steps: int) -> dict:
    ds = json.loads(Path(cfg.deepspeed_config).read_text())
    ds["train_micro_batch_size_per_gpu"] = cfg.batch_size
    ds["gradient_accumulation_steps"] = cfg.gradient_accumulation_steps
    ds["train_batch_size"] = cfg.batch_size * cfg.gradient_accumulation_steps * world
    ds["gradient_clipping"] = cfg.max_grad_norm
    if "optimizer" in ds:
        ds["optimizer"].setdefault("params", {}).update(lr=cfg.lr, weight_decay=cfg.weight_decay)
    if "scheduler" in ds:
        ds["scheduler"].setdefault("params", {}).update(
            warmup_min_lr=0.0, warmup_max_lr=cfg.lr, warmup_num_steps=max(1, warmup_steps),
            total_num_steps=max(total_steps, warmup_steps + 2))
    return ds


def _linear_schedule(optimizer, warmup_steps: int, total_steps: int):
    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / (warmup_steps + 1)
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup_steps))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def model_kind(model: torch.nn.Module, masks: MaskedRows | None) -> str:
    if getattr(model.config, "model_type", None) == "vp_bert":
        return "squeezed"
    return "masked" if masks is not None and masks.pruned_rows else "dense"


def finetune(cfg: FinetuneConfig) -> dict:
    """Fine-tune and evaluate; returns the metrics written to `<output_dir>/metrics.json`."""
    from torch.utils.data import DataLoader, RandomSampler
    from torch.utils.data.distributed import DistributedSampler
    from tqdm.auto import tqdm

    use_deepspeed = cfg.deepspeed_config is not None
    rank, world = _start_processes(use_deepspeed)
    output_dir = Path(cfg.output_dir)
    if rank == 0:
        output_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)

    tokenizer, task, model = tasks.load_tokenizer_task_and_model(cfg)
    masks = MaskedRows.for_model(model, cfg.masks, cfg.model)
    kind = model_kind(model, masks)
    if cfg.pad_ffn > 1 and kind == "squeezed":  # a dense or masked model keeps its full-size layers
        from vp_dist.adapters import fold_sites
        from vp_dist.export.structure import VP_BERT_FAMILY
        from vp_dist.squeeze import pad_folded_ffn
        added = pad_folded_ffn(model, fold_sites(model, (VP_BERT_FAMILY,)), cfg.pad_ffn)
        logger.info("FFN inner widths padded to multiples of %d: %d zero units", cfg.pad_ffn, added)
    if cfg.head_widths is not None and kind == "squeezed":
        from vp_dist.squeeze import relayout_attention
        rebuilt = relayout_attention(model, cfg.head_widths)
        logger.info("attention head layout %r: %d shrunk blocks rebuilt", cfg.head_widths, rebuilt)
    logger.info("fine-tuning %s model %s on %s: %d training features, world size %d", kind, cfg.model,
                task.name, len(task.train), world)
    teacher = _load_teacher(task, cfg) if cfg.teacher else None

    train_columns = task.train.select_columns([*task.model_inputs, *task.label_columns]).with_format("torch")
    generator = torch.Generator().manual_seed(cfg.seed)
    sampler = (DistributedSampler(train_columns, num_replicas=world, rank=rank, shuffle=True, seed=cfg.seed)
               if use_deepspeed else RandomSampler(train_columns, generator=generator))
    loader = DataLoader(train_columns, batch_size=cfg.batch_size, sampler=sampler, drop_last=False)
    steps_per_epoch = max(1, len(loader) // cfg.gradient_accumulation_steps)
    total_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * steps_per_epoch))
    warmup_steps = int(cfg.warmup_ratio * total_steps)

    if use_deepspeed:
        import deepspeed
        ds_config = _deepspeed_config(cfg, world, total_steps, warmup_steps)
        groups = _parameter_groups(model, cfg.weight_decay)
        # The config's optimizer and scheduler when it names them, else AdamW with linear decay.
        optimizer = None if "optimizer" in ds_config else torch.optim.AdamW(groups, lr=cfg.lr)
        schedule = None if "scheduler" in ds_config else (
            lambda opt: _linear_schedule(opt, warmup_steps, total_steps))
        engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, optimizer=optimizer,
                                               lr_scheduler=schedule, config=ds_config)
        from vp_dist.distributed.zero import engine_dtype
        from vp_dist.squeeze import cast_squeezed_buffers
        cast_squeezed_buffers(engine.module, engine_dtype(engine))  # buffers squeezing added
        device = engine.device
    else:
        device = torch.device(cfg.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        engine = model.to(device)
        optimizer = torch.optim.AdamW(_parameter_groups(model, cfg.weight_decay), lr=cfg.lr)
        scheduler = _linear_schedule(optimizer, warmup_steps, total_steps)
    if teacher is not None:
        teacher.to(device)

    progress = tqdm(total=total_steps, desc=f"fine-tuning {task.name}", disable=rank != 0, dynamic_ncols=True)
    engine.train()
    step, micro, epoch, losses, started = 0, 0, 0, [], time.perf_counter()
    while step < total_steps:
        if use_deepspeed:
            sampler.set_epoch(epoch)
        for batch in loader:
            batch = {k: v.to(device) for k, v in batch.items()}
            outputs = engine(**{k: batch[k] for k in task.model_inputs})
            loss = tasks.task_loss(task, outputs, batch)
            if teacher is not None:
                with torch.no_grad():
                    teacher_outputs = teacher(**{k: batch[k] for k in task.model_inputs})
                distill = tasks.distillation_loss(task, outputs, teacher_outputs, cfg.kd_temperature)
                loss = (1 - cfg.kd_alpha) * loss + cfg.kd_alpha * distill
            losses.append(float(loss.detach()))
            micro += 1
            if use_deepspeed:
                engine.backward(loss)
                engine.step()  # steps the optimizer (and scheduler) at accumulation boundaries only
                stepped = micro % cfg.gradient_accumulation_steps == 0
            else:
                (loss / cfg.gradient_accumulation_steps).backward()
                stepped = micro % cfg.gradient_accumulation_steps == 0
                if stepped:
                    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    optimizer.zero_grad(set_to_none=True)
            if stepped:
                step += 1
                progress.update(1)
                progress.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
                if step >= total_steps:
                    break
        epoch += 1
    progress.close()
    train_seconds = time.perf_counter() - started

    module = engine.module if use_deepspeed else model
    pruned_rows_zero = masks.pruned_rows_are_zero(module) if masks is not None else None
    if pruned_rows_zero is False:
        raise RuntimeError("pruned rows moved during fine-tuning: the gradient mask did not hold")
    scores = tasks.evaluate(engine, task, cfg.eval_batch_size, device, show_progress=True)
    metrics = {
        "task": task.name, "model": str(cfg.model), "model_kind": kind, "eval": scores,
        "headline_metric": task.headline_metric, "headline": tasks.headline(task, scores),
        "train": {"steps": step, "epochs_started": epoch, "features": len(task.train),
                  "first_loss": losses[0], "final_loss": sum(losses[-20:]) / len(losses[-20:]),
                  "seconds": train_seconds},
        "masks": None if masks is None else {"pruned_rows": masks.pruned_rows, "total_rows": masks.total_rows,
                                             "pruned_rows_zero": pruned_rows_zero},
        "distillation": None if teacher is None else {"teacher": cfg.teacher, "alpha": cfg.kd_alpha,
                                                       "temperature": cfg.kd_temperature},
        "world_size": world, "deepspeed": use_deepspeed,
        "config": asdict(cfg),
    }
    if cfg.save_model:
        _save(module, tokenizer, masks, output_dir / "model", rank)
    if rank == 0:
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
        logger.info("%s %s: %s", task.name, kind, scores)
    if use_deepspeed:
        torch.distributed.barrier()  # no rank leaves (and closes its connections) while rank 0 still writes
    return metrics


def _start_processes(use_deepspeed: bool) -> tuple[int, int]:
    if not use_deepspeed:
        return 0, 1
    from vp_dist.train.distributed_env import init_distributed
    return init_distributed()


def _load_teacher(task, cfg: FinetuneConfig) -> torch.nn.Module:
    from transformers import AutoConfig

    import vp_dist.export  # noqa: F401  registers model_type "vp_bert" with the Auto classes
    labels = getattr(AutoConfig.from_pretrained(cfg.teacher), "num_labels", None)
    if not task.is_squad and labels is not None and labels != task.glue.num_labels:  # from_pretrained: a size error
        raise ValueError(f"teacher {cfg.teacher!r} has a head of {labels} labels, task {task.name} needs "
                         f"{task.glue.num_labels}: a teacher must be fine-tuned on {task.name}")
    teacher, loading = tasks.load_task_model(task, cfg.teacher, output_loading_info=True)
    if loading["missing_keys"]:
        raise ValueError(f"teacher {cfg.teacher!r} lacks {sorted(loading['missing_keys'])[:4]}: a teacher must be "
                         f"fine-tuned on {task.name} already (its head would be random)")
    teacher.eval()
    for param in teacher.parameters():
        param.requires_grad_(False)
    logger.info("distilling from %s (alpha %.2f, temperature %.1f)", cfg.teacher, cfg.kd_alpha, cfg.kd_temperature)
    return teacher


def _save(module: torch.nn.Module, tokenizer, masks: MaskedRows | None, directory: Path, rank: int) -> None:
    from vp_dist.export.exporters import gathered, strip_inner_padding
    from vp_dist.export.structure import base_model_and_prefix, read_structure
    from vp_dist.squeeze import inner_padding
    with gathered(module):
        if rank == 0:
            directory.mkdir(parents=True, exist_ok=True)
            state = {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}
            if any(inner_padding(sub) for sub in module.modules()):  # pad_ffn's zero units: not saved
                base, prefix = base_model_and_prefix(module)
                strip_inner_padding(base, state, prefix, read_structure(base).folded_ffn)
            module.save_pretrained(str(directory), state_dict=state)
            tokenizer.save_pretrained(str(directory))
            if masks is not None:
                masks.save(directory)
