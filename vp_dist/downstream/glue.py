"""GLUE tasks: a declarative task table, loading (local TSV/JSON files or the hub), tokenisation.

Every loader returns rows with the column names and label ids of the HF `glue` dataset (text
columns, `label`, `idx`), whatever the source, so the rest of the pipeline sees one format:

    splits = load_glue("mnli", data_dir="glue_data/MNLI")      # train, validation_matched, ...
    train = tokenize_glue(splits["train"], "mnli", tokenizer, max_seq_len=128)
    ...
    scores = glue_metrics("mnli", predictions_from_logits("mnli", logits), labels)
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import datasets
import numpy as np
from datasets import ClassLabel, Dataset, DatasetDict, Features, Value

from vp_dist.downstream.records import (
    find_split_file,
    read_json_records,
    read_tsv_rows,
    require_columns,
    tsv_header,
)

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

GLUE_HUB_PATH = "nyu-mll/glue"  # the canonical `glue` dataset; the bare name "glue" redirects here

# Split names follow the HF `glue` dataset; the original GLUE download names its files like this.
TSV_FILE_OF_SPLIT = {
    "train": "train.tsv",
    "validation": "dev.tsv",
    "validation_matched": "dev_matched.tsv",
    "validation_mismatched": "dev_mismatched.tsv",
}


@dataclass(frozen=True)
class TsvLayout:
    """Where a task's fields live in the original GLUE TSV files."""

    text_columns: tuple[str, ...]  # in the same order as GlueTask.text_columns
    label_column: str
    fixed_columns: tuple[str, ...] | None = None  # names by position, for files with no header


@dataclass(frozen=True)
class GlueTask:
    name: str  # the HF `glue` config name
    text_columns: tuple[str, ...]  # HF column names: one sentence or a sentence pair
    label_names: tuple[str, ...]  # HF ClassLabel order (label id = position); () for regression
    metrics: tuple[str, ...]  # keys of metrics.METRIC_FUNCTIONS, the paper's headline metric first
    tsv: TsvLayout
    eval_splits: tuple[str, ...] = ("validation",)

    @property
    def is_regression(self) -> bool:
        return not self.label_names

    @property
    def num_labels(self) -> int:
        """Width of the classifier head: 1 for regression (STS-B)."""
        return 1 if self.is_regression else len(self.label_names)

    @property
    def headline_metric(self) -> str:
        return self.metrics[0]

    def features(self) -> Features:
        """Column types of the HF `glue` dataset for this task."""
        label = Value("float32") if self.is_regression else ClassLabel(names=list(self.label_names))
        text = {column: Value("string") for column in self.text_columns}
        return Features({**text, "label": label, "idx": Value("int32")})


_ENTAILMENT_2 = ("entailment", "not_entailment")

GLUE_TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in [
        GlueTask(
            "cola", ("sentence",), ("unacceptable", "acceptable"), ("matthews_correlation",),
            TsvLayout(("sentence",), "label",
                      fixed_columns=("source", "label", "original_label", "sentence")),
        ),
        GlueTask(
            "sst2", ("sentence",), ("negative", "positive"), ("accuracy",),
            TsvLayout(("sentence",), "label"),
        ),
        GlueTask(
            "mrpc", ("sentence1", "sentence2"), ("not_equivalent", "equivalent"),
            ("f1", "accuracy"),
            TsvLayout(("#1 String", "#2 String"), "Quality"),
        ),
        GlueTask(
            "stsb", ("sentence1", "sentence2"), (), ("spearman", "pearson"),
            TsvLayout(("sentence1", "sentence2"), "score"),
        ),
        GlueTask(
            "qqp", ("question1", "question2"), ("not_duplicate", "duplicate"), ("accuracy", "f1"),
            TsvLayout(("question1", "question2"), "is_duplicate"),
        ),
        GlueTask(
            "mnli", ("premise", "hypothesis"), ("entailment", "neutral", "contradiction"),
            ("accuracy",), TsvLayout(("sentence1", "sentence2"), "gold_label"),
            eval_splits=("validation_matched", "validation_mismatched"),
        ),
        GlueTask(
            "qnli", ("question", "sentence"), _ENTAILMENT_2, ("accuracy",),
            TsvLayout(("question", "sentence"), "label"),
        ),
        GlueTask(
            "rte", ("sentence1", "sentence2"), _ENTAILMENT_2, ("accuracy",),
            TsvLayout(("sentence1", "sentence2"), "label"),
        ),
    ]
}


def get_glue_task(task: str | GlueTask) -> GlueTask:
    """The table entry for `task`; also accepts GLUE's spellings ("SST-2", "STS-B", "CoLA")."""
    if isinstance(task, GlueTask):
        return task
    key = task.lower().replace("-", "").replace("_", "")
    if key not in GLUE_TASKS:
        raise ValueError(f"unknown GLUE task {task!r}; known tasks: {sorted(GLUE_TASKS)}")
    return GLUE_TASKS[key]


def parse_label(glue_task: GlueTask, raw: Any, where: str) -> int | float:
    """The HF label (class id, or float score) for a raw label from a file.

    Accepts a class name ("entailment") or its id as int or digit string ("1"); a number for STS-B.
    """
    if glue_task.is_regression:
        not_a_number = ValueError(f"label {raw!r} at {where} is not a number (task stsb)")
        if isinstance(raw, bool) or not isinstance(raw, (int, float, str)):
            raise not_a_number
        try:
            return float(raw)
        except ValueError:
            raise not_a_number from None
    n_classes = len(glue_task.label_names)
    if isinstance(raw, str) and raw.strip() in glue_task.label_names:
        return glue_task.label_names.index(raw.strip())
    if isinstance(raw, str) and raw.strip().isdigit():
        raw = int(raw.strip())
    if isinstance(raw, int) and not isinstance(raw, bool) and 0 <= raw < n_classes:
        return raw
    raise ValueError(
        f"unknown label {raw!r} at {where} for task {glue_task.name}; expected one of "
        f"{list(glue_task.label_names)} or an id in 0..{n_classes - 1}"
    )


def read_glue_file(task: str | GlueTask, path: str | Path) -> Dataset:
    """One split from a local file: an original GLUE `.tsv`, or `.json`/`.jsonl` with HF columns."""
    glue_task, path = get_glue_task(task), Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"GLUE {glue_task.name} file {str(path)!r} does not exist")
    if path.suffix == ".tsv":
        rows = _rows_from_tsv(glue_task, path)
    elif path.suffix in (".json", ".jsonl"):
        rows = _rows_from_json(glue_task, path)
    else:
        raise ValueError(
            f"{str(path)!r}: unsupported file type {path.suffix!r}; use .tsv, .json or .jsonl"
        )
    columns = {name: [row[name] for row in rows] for name in glue_task.features()}
    return Dataset.from_dict(columns, features=glue_task.features())


def _rows_from_tsv(glue_task: GlueTask, path: Path) -> list[dict[str, Any]]:
    layout = glue_task.tsv
    if layout.fixed_columns is None:
        require_columns(
            str(path), tsv_header(path), (*layout.text_columns, layout.label_column)
        )
    rows = []
    for line_number, fields in read_tsv_rows(path, layout.fixed_columns):
        row: dict[str, Any] = {
            hf_column: fields[tsv_column]
            for hf_column, tsv_column in zip(glue_task.text_columns, layout.text_columns)
        }
        row["label"] = parse_label(glue_task, fields[layout.label_column], f"{path}:{line_number}")
        row["idx"] = len(rows)
        rows.append(row)
    return rows


def _rows_from_json(glue_task: GlueTask, path: Path) -> list[dict[str, Any]]:
    records = read_json_records(path)
    rows = []
    for index, record in enumerate(records):
        require_columns(f"{path} row {index}", list(record), (*glue_task.text_columns, "label"))
        row = {column: record[column] for column in glue_task.text_columns}
        row["label"] = parse_label(glue_task, record["label"], f"{path} row {index}")
        row["idx"] = record.get("idx", index)
        rows.append(row)
    return rows


def glue_split_candidates(split: str) -> list[str]:
    """File names tried for `split` in a task's data directory, in order."""
    tsv_name = TSV_FILE_OF_SPLIT.get(split)
    return ([tsv_name] if tsv_name else []) + [f"{split}.jsonl", f"{split}.json"]


def load_glue(
    task: str | GlueTask,
    data_dir: str | Path | None = None,
    splits: Sequence[str] | None = None,
) -> DatasetDict:
    """The train and eval splits of a GLUE task, with the HF `glue` columns.

    data_dir: a task's directory from the GLUE download (e.g. `glue_data/MNLI` with `train.tsv`,
      `dev_matched.tsv`, `dev_mismatched.tsv`), or holding `<split>.jsonl`/`<split>.json` in the HF
      format; None downloads from the hub (needs a network).
    splits: defaults to ("train", *task.eval_splits).
    """
    glue_task = get_glue_task(task)
    splits = list(splits) if splits is not None else ["train", *glue_task.eval_splits]
    if data_dir is None:
        return _load_glue_from_hub(glue_task, splits)
    return DatasetDict(
        {
            split: read_glue_file(
                glue_task, find_split_file(data_dir, split, glue_split_candidates(split))
            )
            for split in splits
        }
    )


def _load_glue_from_hub(glue_task: GlueTask, splits: list[str]) -> DatasetDict:
    logger.info("loading GLUE %s from the hub (%s)", glue_task.name, GLUE_HUB_PATH)
    everything = datasets.load_dataset(GLUE_HUB_PATH, glue_task.name)
    missing = [split for split in splits if split not in everything]
    if missing:
        raise ValueError(
            f"hub GLUE {glue_task.name} has no split(s) {missing}; it has {list(everything)}"
        )
    for split in splits:
        require_columns(
            f"hub GLUE {glue_task.name} split {split}",
            everything[split].column_names,
            (*glue_task.text_columns, "label"),
        )
    return DatasetDict({split: everything[split] for split in splits})


def tokenize_glue(
    dataset: Dataset,
    task: str | GlueTask,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int,
) -> Dataset:
    """Model features for one split: `input_ids`, `attention_mask`, `token_type_ids`, `labels`.

    Sequences (pairs truncated longest-first) are padded to `max_seq_len`, so batches have one
    static shape. `labels` is int64 class ids, or float32 scores for STS-B.
    """
    glue_task = get_glue_task(task)
    if max_seq_len < 4:
        raise ValueError(f"max_seq_len={max_seq_len} must be at least 4 ([CLS], 2x[SEP], a token)")
    require_columns(
        f"{glue_task.name} dataset", dataset.column_names, (*glue_task.text_columns, "label")
    )

    def encode(batch: dict[str, list]) -> dict[str, list]:
        encoded = tokenizer(
            *(batch[column] for column in glue_task.text_columns),
            truncation=True,
            max_length=max_seq_len,
            padding="max_length",
            return_attention_mask=True,
            return_token_type_ids=True,
        )
        return {
            "input_ids": encoded["input_ids"],
            "attention_mask": encoded["attention_mask"],
            "token_type_ids": encoded["token_type_ids"],
            "labels": batch["label"],
        }

    features = dataset.map(
        encode, batched=True, remove_columns=dataset.column_names,
        desc=f"tokenizing {glue_task.name}",
    )
    return features.cast_column(
        "labels", Value("float32") if glue_task.is_regression else Value("int64")
    )


def predictions_from_logits(task: str | GlueTask, logits: Any) -> np.ndarray:
    """Class ids (argmax) from logits of shape (N, num_labels); scores (N,) for STS-B."""
    glue_task = get_glue_task(task)
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] != glue_task.num_labels:
        raise ValueError(
            f"logits of shape {logits.shape} for {glue_task.name}; "
            f"expected (N, {glue_task.num_labels})"
        )
    return logits[:, 0] if glue_task.is_regression else logits.argmax(axis=-1)
