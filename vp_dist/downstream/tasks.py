"""One downstream task, end to end around a model: features, the model class, loss, evaluation.

Shared by fine-tuning (`finetune.py`) and the post-hoc pruning sweep (`posthoc.py`):

    task = prepare_task("mrpc", tokenizer, data_dir="glue_data/MRPC")
    model = load_task_model(task, "runs/x/export_masked")
    scores = evaluate(model, task, batch_size=64)        # {"validation": {"f1": .., "accuracy": ..}}

A task is a GLUE task name (any spelling `get_glue_task` accepts) or "squad" (SQuAD v1.1).
Evaluation may run on all ranks of a process group: each rank predicts an equal share (padded,
so ZeRO-3 ranks run the same number of forward passes) and every rank gets all the scores.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from datasets import Dataset

from vp_dist.downstream.glue import GlueTask, get_glue_task, load_glue, predictions_from_logits, tokenize_glue
from vp_dist.downstream.metrics import glue_metrics
from vp_dist.downstream.squad import (QA_MODEL_INPUTS, evaluate_squad, load_squad, prepare_eval_features,
                                      prepare_train_features)

logger = logging.getLogger(__name__)

SQUAD = "squad"
GLUE_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class EvalSet:
    features: Dataset               # model inputs (+ labels for GLUE, example_id/offsets for SQuAD)
    examples: Dataset | None = None  # SQuAD only: the questions, for answer decoding


@dataclass
class TaskData:
    """A task's training features and evaluation sets, tokenized, ready for a model."""

    name: str                        # GLUE config name ("mnli") or "squad"
    train: Dataset | None
    evals: dict[str, EvalSet] = field(default_factory=dict)
    glue: GlueTask | None = None

    @property
    def is_squad(self) -> bool:
        return self.glue is None

    @property
    def model_inputs(self) -> tuple[str, ...]:
        return QA_MODEL_INPUTS if self.is_squad else GLUE_INPUTS

    @property
    def label_columns(self) -> tuple[str, ...]:
        return ("start_positions", "end_positions") if self.is_squad else ("labels",)

    @property
    def headline_metric(self) -> str:
        return "f1" if self.is_squad else self.glue.headline_metric

    @property
    def metric_names(self) -> tuple[str, ...]:
        return ("exact_match", "f1") if self.is_squad else self.glue.metrics


def normalize_task_name(task: str) -> str:
    """"squad" for SQuAD v1.1 ("SQuAD", "squad_v1.1", ...), else the GLUE config name ("SST-2" -> "sst2")."""
    key = "".join(char for char in task.lower() if char.isalnum())
    return SQUAD if key in ("squad", "squad11", "squadv11") else get_glue_task(task).name


def prepare_task(task: str, tokenizer, data_dir: str | None = None, *, max_seq_len: int | None = None,
                 doc_stride: int = 128, max_train_samples: int | None = None,
                 max_eval_samples: int | None = None, splits: str = "all") -> TaskData:
    """Load and tokenize a task. data_dir: local GLUE/SQuAD files (None: the hub).

    max_seq_len defaults to 128 for GLUE and 384 for SQuAD (the paper's Table 2 shape).
    splits: "all", "train" or "eval" (skip tokenizing what a caller does not need).
    """
    name = normalize_task_name(task)
    want_train, want_eval = splits in ("all", "train"), splits in ("all", "eval")
    if name == SQUAD:
        max_seq_len = max_seq_len or 384
        raw = load_squad(data_dir, splits=[s for s, w in (("train", want_train), ("validation", want_eval)) if w])
        train = None
        if want_train:
            train = prepare_train_features(_first(raw["train"], max_train_samples), tokenizer, max_seq_len, doc_stride)
        evals = {}
        if want_eval:
            examples = _first(raw["validation"], max_eval_samples)
            evals["validation"] = EvalSet(prepare_eval_features(examples, tokenizer, max_seq_len, doc_stride), examples)
        return TaskData(name, train, evals)
    glue = get_glue_task(name)
    max_seq_len = max_seq_len or 128
    wanted = (["train"] if want_train else []) + (list(glue.eval_splits) if want_eval else [])
    raw = load_glue(glue, data_dir, splits=wanted)
    train = tokenize_glue(_first(raw["train"], max_train_samples), glue, tokenizer, max_seq_len) if want_train else None
    evals = {split: EvalSet(tokenize_glue(_first(raw[split], max_eval_samples), glue, tokenizer, max_seq_len))
             for split in (glue.eval_splits if want_eval else ())}
    return TaskData(name, train, evals, glue)


def _first(dataset: Dataset, count: int | None) -> Dataset:
    return dataset if count is None or count >= len(dataset) else dataset.select(range(count))


def auto_class(task: TaskData):
    from transformers import AutoModelForQuestionAnswering, AutoModelForSequenceClassification
    return AutoModelForQuestionAnswering if task.is_squad else AutoModelForSequenceClassification


def load_task_model(task: TaskData, path: str, **kwargs) -> torch.nn.Module:
    """A dense / masked (stock BERT) or squeezed (vp_bert) model with the task's head.

    A checkpoint with another head (e.g. pre-training) loads its encoder; the head is new.
    With `output_loading_info=True` returns (model, loading info) as `from_pretrained` does.
    """
    import vp_dist.export  # noqa: F401  registers model_type "vp_bert" with the Auto classes

    if not task.is_squad:
        glue = task.glue
        kwargs.setdefault("num_labels", glue.num_labels)
        if glue.is_regression:
            kwargs.setdefault("problem_type", "regression")
        else:
            kwargs.setdefault("id2label", dict(enumerate(glue.label_names)))
            kwargs.setdefault("label2id", {n: i for i, n in enumerate(glue.label_names)})
    loaded = auto_class(task).from_pretrained(path, **kwargs)
    model = loaded[0] if kwargs.get("output_loading_info") else loaded
    if not task.is_squad and model.config.num_labels != task.glue.num_labels:
        raise ValueError(f"{path}: head has {model.config.num_labels} labels, task {task.name} needs "
                         f"{task.glue.num_labels}")
    return loaded


def check_task_config(cfg, need) -> None:
    """What a fine-tuning or post-hoc config shares, checked before any model or data is loaded:
    the task name, example counts, lengths, the device, and that local paths exist (model, tokenizer,
    data, teacher, masks, DeepSpeed config, those `cfg` has; a model folder with a `config.json`).
    `need(ok, message)` raises the config's error."""
    try:
        name = normalize_task_name(cfg.task)
    except ValueError as error:
        need(False, f"task={cfg.task!r}: {error}")
    for field in ("batch_size", "eval_batch_size", "max_train_samples", "max_eval_samples"):
        value = getattr(cfg, field)
        need(value is None or value >= 1, f"{field}={value} must be >= 1")
    max_seq_len = cfg.max_seq_len or (384 if name == SQUAD else 128)
    need(max_seq_len >= 8, f"max_seq_len={cfg.max_seq_len} must be >= 8")
    if name == SQUAD:
        need(0 < cfg.doc_stride < max_seq_len, f"doc_stride={cfg.doc_stride} must be in (0, max_seq_len="
             f"{max_seq_len}) for SQuAD: give a smaller --doc_stride or a larger --max_seq_len")
    device = cfg.device
    need(device is None or re.fullmatch(r"cpu|cuda(:\d+)?", device) is not None,
         f"device={device!r} must be cpu, cuda or cuda:N")
    need(device is None or not device.startswith("cuda") or torch.cuda.is_available(),
         f"device={device!r}: this torch sees no CUDA device")
    for field in ("model", "tokenizer", "data_dir", "teacher", "masks", "deepspeed_config"):  # those cfg has
        value = getattr(cfg, field, None)
        path = Path(value).expanduser() if value else None
        if path is None or not (path.exists() or value.startswith((".", "/", "~")) or value.count("/") > 1):
            continue  # unset, or a hub name ("bert-base-uncased", "org/name")
        need(path.exists(), f"{field}={value!r} does not exist")
        if field in ("model", "teacher"):
            need(path.is_dir() and (path / "config.json").is_file(),
                 f"{field}={value!r} is no model folder (no config.json): give an export of a run "
                 "(export_masked/, export_squeezed/), a Hugging Face model folder or a fine-tuned model/ "
                 "folder; a pre-training run or DeepSpeed checkpoint folder is not one (its exports are)")


# ---------------------------------------------------------------------- losses
def load_tokenizer_task_and_model(cfg):
    """(tokenizer, TaskData, model) for a fine-tuning or post-hoc config (fields: task, model,
    tokenizer, data_dir, max_seq_len, doc_stride, max_train_samples, max_eval_samples)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer or cfg.model)
    task = prepare_task(cfg.task, tokenizer, cfg.data_dir, max_seq_len=cfg.max_seq_len,
                        doc_stride=cfg.doc_stride, max_train_samples=cfg.max_train_samples,
                        max_eval_samples=cfg.max_eval_samples)
    return tokenizer, task, load_task_model(task, cfg.model)


def task_loss(task: TaskData, outputs, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The fine-tuning loss, in float32: cross entropy, MSE for STS-B, mean of start/end CE for SQuAD."""
    if task.is_squad:
        seq_len = outputs.start_logits.shape[1]
        losses = [F.cross_entropy(logits.float(), batch[key].clamp(0, seq_len), ignore_index=seq_len)
                  for logits, key in ((outputs.start_logits, "start_positions"), (outputs.end_logits, "end_positions"))]
        return (losses[0] + losses[1]) / 2
    if task.glue.is_regression:
        return F.mse_loss(outputs.logits.float().squeeze(-1), batch["labels"].float())
    return F.cross_entropy(outputs.logits.float(), batch["labels"])


def distillation_loss(task: TaskData, student, teacher, temperature: float) -> torch.Tensor:
    """Soft-target loss against a teacher's outputs (Hinton et al.): T^2 KL(teacher_T || student_T)
    per distribution, start and end distributions averaged for SQuAD; MSE to the teacher's score
    for STS-B (a regression has no distribution to soften)."""
    def soft(student_logits, teacher_logits):
        log_p = F.log_softmax(student_logits.float() / temperature, dim=-1)
        log_q = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
        return F.kl_div(log_p, log_q, log_target=True, reduction="batchmean") * temperature ** 2

    if task.is_squad:
        return (soft(student.start_logits, teacher.start_logits) + soft(student.end_logits, teacher.end_logits)) / 2
    if task.glue.is_regression:
        return F.mse_loss(student.logits.float(), teacher.logits.float())
    return soft(student.logits, teacher.logits)


# ---------------------------------------------------------------------- evaluation
def _rank_world() -> tuple[int, int]:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


@torch.no_grad()
def predict(model, features: Dataset, input_names: tuple[str, ...], batch_size: int,
            device: torch.device | str | None = None, show_progress: bool = False) -> dict[str, np.ndarray]:
    """Logits of `model` (or a DeepSpeed engine) on every row of `features`, in order, as float32 numpy:
    {"logits"} or {"start_logits", "end_logits"}. Under a process group every rank computes an
    equal share and all ranks receive everything."""
    from tqdm.auto import tqdm

    rank, world = _rank_world()
    module = getattr(model, "module", model)
    device = device or next(module.parameters()).device
    was_training = module.training
    model.eval()
    total = len(features)
    padded = -(-total // world) * world
    order = [min(i, total - 1) for i in range(padded)][rank::world]  # equal shares, padding repeats the last row
    columns = features.select_columns(list(input_names)).with_format("torch")
    chunks: dict[str, list[np.ndarray]] = {}
    for start in tqdm(range(0, len(order), batch_size), desc="evaluating", disable=not show_progress or rank != 0,
                      leave=False):
        batch = columns[order[start:start + batch_size]]
        outputs = model(**{k: v.to(device) for k, v in batch.items()})
        for key in ("logits", "start_logits", "end_logits"):
            value = getattr(outputs, key, None)
            if value is not None:
                chunks.setdefault(key, []).append(value.float().cpu().numpy())
    model.train(was_training)
    mine = {k: np.concatenate(v) for k, v in chunks.items()}
    if world == 1:
        return mine
    import torch.distributed as dist
    gathered: list[dict] = [None] * world
    dist.all_gather_object(gathered, mine)
    out = {}
    for key in mine:
        interleaved = np.empty((padded, *mine[key].shape[1:]), dtype=np.float32)
        for r, part in enumerate(gathered):
            interleaved[r::world] = part[key]
        out[key] = interleaved[:total]
    return out


def evaluate(model, task: TaskData, batch_size: int = 64, device=None, show_progress: bool = False,
             ) -> dict[str, dict[str, float]]:
    """The task's metrics (percent, paper Table 1) on every eval split: {split: {metric: value}}."""
    scores = {}
    for split, eval_set in task.evals.items():
        logits = predict(model, eval_set.features, task.model_inputs, batch_size, device, show_progress)
        if task.is_squad:
            scores[split] = evaluate_squad(eval_set.examples, eval_set.features,
                                           logits["start_logits"], logits["end_logits"])
        else:
            predictions = predictions_from_logits(task.glue, logits["logits"])
            scores[split] = glue_metrics(task.glue.name, predictions, np.asarray(eval_set.features["labels"]))
    return scores


def headline(task: TaskData, scores: dict[str, dict[str, float]]) -> float:
    """The headline metric averaged over eval splits (MNLI: mean of matched and mismatched)."""
    return float(np.mean([split_scores[task.headline_metric] for split_scores in scores.values()]))
