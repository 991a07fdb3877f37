"""SQuAD v1.1: loading, features for training and evaluation, and logits back to answer text.

The feature preparation and post-processing follow the HF `run_qa.py` example (question first,
context split into windows of `max_seq_len` tokens overlapping by `doc_stride`):

    splits = load_squad(data_dir="squad")                        # train-v1.1.json, dev-v1.1.json
    train = prepare_train_features(splits["train"], tokenizer)   # + start_positions, end_positions
    eval_features = prepare_eval_features(splits["validation"], tokenizer)
    ... model(**eval_features.select_columns(QA_MODEL_INPUTS)) -> start_logits, end_logits ...
    scores = evaluate_squad(splits["validation"], eval_features, start_logits, end_logits)
"""

from __future__ import annotations

import json
import logging
from collections import Counter, defaultdict
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import datasets
import numpy as np
from datasets import Dataset, DatasetDict, Features, List, Value

from vp_dist.downstream.metrics import squad_metrics
from vp_dist.downstream.records import find_split_file, read_json_records, require_columns

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = logging.getLogger(__name__)

SQUAD_HUB_PATH = "rajpurkar/squad"  # the canonical `squad` dataset; the bare name redirects here
SQUAD_FEATURES = Features(
    {
        "id": Value("string"),
        "title": Value("string"),
        "context": Value("string"),
        "question": Value("string"),
        "answers": {"text": List(Value("string")), "answer_start": List(Value("int32"))},
    }
)
SQUAD_SPLIT_CANDIDATES = {
    "train": ("train-v1.1.json", "train.jsonl", "train.json"),
    "validation": ("dev-v1.1.json", "validation.jsonl", "validation.json"),
}
QA_MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


def _field(container: Any, key: str, where: str) -> Any:
    if not isinstance(container, dict) or key not in container:
        raise ValueError(f"{where} lacks field {key!r}")
    return container[key]


def _rows_from_official_json(document: dict, path: Path) -> list[dict[str, Any]]:
    rows = []
    for article_index, article in enumerate(_field(document, "data", str(path))):
        for paragraph_index, paragraph in enumerate(
            _field(article, "paragraphs", f"{path}: data[{article_index}]")
        ):
            where = f"{path}: data[{article_index}].paragraphs[{paragraph_index}]"
            context = _field(paragraph, "context", where)
            for qa_index, qa in enumerate(_field(paragraph, "qas", where)):
                qa_where = f"{where}.qas[{qa_index}]"
                answers = _field(qa, "answers", qa_where)
                rows.append(
                    {
                        "id": _field(qa, "id", qa_where),
                        "title": article.get("title", ""),
                        "context": context,
                        "question": _field(qa, "question", qa_where),
                        "answers": {
                            "text": [_field(a, "text", f"{qa_where}.answers") for a in answers],
                            "answer_start": [
                                _field(a, "answer_start", f"{qa_where}.answers") for a in answers
                            ],
                        },
                    }
                )
    return rows


def _rows_from_records(records: list[dict[str, Any]], path: Path) -> list[dict[str, Any]]:
    rows = []
    for index, record in enumerate(records):
        where = f"{path} row {index}"
        require_columns(where, list(record), ("id", "context", "question", "answers"))
        answers = record["answers"]
        texts = _field(answers, "text", f"{where} answers")
        starts = _field(answers, "answer_start", f"{where} answers")
        if len(texts) != len(starts):
            raise ValueError(f"{where}: {len(texts)} answer texts but {len(starts)} answer_start")
        rows.append({**record, "title": record.get("title", ""), "answers": answers})
    return rows


def read_squad_file(path: str | Path) -> Dataset:
    """One split from the official SQuAD v1.1 JSON, or JSON/JSONL rows in the HF `squad` columns."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"SQuAD file {str(path)!r} does not exist")
    if path.suffix not in (".json", ".jsonl"):
        raise ValueError(
            f"{str(path)!r}: unsupported file type {path.suffix!r}; use .json or .jsonl"
        )
    document = None
    if path.suffix == ".json":
        try:
            with open(path, encoding="utf-8") as json_file:
                document = json.load(json_file)
        except json.JSONDecodeError:
            document = None  # JSON lines named .json
    if isinstance(document, dict) and "data" in document:
        rows = _rows_from_official_json(document, path)
    else:
        rows = _rows_from_records(read_json_records(path), path)
    _check_rows(rows, path)
    columns = {name: [row[name] for row in rows] for name in SQUAD_FEATURES}
    return Dataset.from_dict(columns, features=SQUAD_FEATURES)


def _check_rows(rows: list[dict[str, Any]], path: Path) -> None:
    id_counts = Counter(row["id"] for row in rows)
    if len(id_counts) != len(rows):
        duplicates = sorted(qid for qid, count in id_counts.items() if count > 1)[:3]
        raise ValueError(f"{path}: question ids must be unique; repeated: {duplicates}")
    misplaced = 0
    for row in rows:
        for text, start in zip(row["answers"]["text"], row["answers"]["answer_start"]):
            if not isinstance(start, int) or isinstance(start, bool):
                raise ValueError(
                    f"{path}: question {row['id']!r} has answer_start={start!r}, not an int"
                )
            misplaced += row["context"][start : start + len(text)] != text
    if misplaced:
        logger.warning("%s: %d answers do not match context[answer_start:]", path, misplaced)


def load_squad(
    data_dir: str | Path | None = None, splits: Sequence[str] = ("train", "validation")
) -> DatasetDict:
    """SQuAD v1.1 splits with the HF `squad` columns (id, title, context, question, answers).

    data_dir holds `train-v1.1.json` / `dev-v1.1.json` (or `<split>.jsonl` / `<split>.json`);
    None downloads from the hub (needs a network).
    """
    unknown = [split for split in splits if split not in SQUAD_SPLIT_CANDIDATES]
    if unknown:
        raise ValueError(f"unknown SQuAD split(s) {unknown}; known: {list(SQUAD_SPLIT_CANDIDATES)}")
    if data_dir is not None:
        return DatasetDict(
            {
                split: read_squad_file(
                    find_split_file(data_dir, split, SQUAD_SPLIT_CANDIDATES[split])
                )
                for split in splits
            }
        )
    logger.info("loading SQuAD v1.1 from the hub (%s)", SQUAD_HUB_PATH)
    everything = datasets.load_dataset(SQUAD_HUB_PATH)
    missing = [split for split in splits if split not in everything]
    if missing:
        raise ValueError(f"hub SQuAD has no split(s) {missing}; it has {list(everything)}")
    for split in splits:
        require_columns(
            f"hub SQuAD split {split}", everything[split].column_names, list(SQUAD_FEATURES)
        )
    return DatasetDict({split: everything[split] for split in splits})


def _check_window_setup(
    tokenizer: PreTrainedTokenizerBase, max_seq_len: int, doc_stride: int
) -> None:
    if not tokenizer.is_fast:
        raise ValueError(f"{type(tokenizer).__name__} is not a fast tokenizer; offsets need one")
    if tokenizer.padding_side != "right":
        raise ValueError(f"padding_side={tokenizer.padding_side!r}; SQuAD features need 'right'")
    if not 0 < doc_stride < max_seq_len:
        raise ValueError(f"doc_stride={doc_stride} must be in (0, max_seq_len={max_seq_len})")


def _encode_windows(
    batch: dict[str, list],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int,
    doc_stride: int,
) -> Any:
    return tokenizer(
        # Some SQuAD questions start with long runs of spaces that would only waste room.
        [question.lstrip() for question in batch["question"]],
        batch["context"],
        truncation="only_second",
        max_length=max_seq_len,
        stride=doc_stride,
        return_overflowing_tokens=True,
        return_offsets_mapping=True,
        return_token_type_ids=True,
        padding="max_length",
    )


def answer_token_span(
    offsets: Sequence[tuple[int, int]],
    sequence_ids: Sequence[int | None],
    answer_start: int,
    answer_text: str,
) -> tuple[int, int] | None:
    """First and last token (inclusive) of the answer in one window; None if not wholly inside it.

    offsets: the tokenizer's (start_char, end_char) per token; sequence_ids: 1 for context tokens.
    """
    answer_end = answer_start + len(answer_text)
    context_tokens = [index for index, seq_id in enumerate(sequence_ids) if seq_id == 1]
    if not context_tokens:
        return None
    window_start, window_end = offsets[context_tokens[0]][0], offsets[context_tokens[-1]][1]
    if not (window_start <= answer_start and answer_end <= window_end):
        return None
    start_token = max(index for index in context_tokens if offsets[index][0] <= answer_start)
    end_token = min(index for index in context_tokens if offsets[index][1] >= answer_end)
    return start_token, end_token


def prepare_train_features(
    examples: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int = 384,
    doc_stride: int = 128,
) -> Dataset:
    """Training windows: QA_MODEL_INPUTS plus `start_positions` / `end_positions`.

    One example may give several windows. A window that does not hold the (first) answer points
    both positions at its [CLS] token, as in BERT's and HF's SQuAD training.
    """

    def encode(batch: dict[str, list]) -> dict[str, list]:
        encoded = _encode_windows(batch, tokenizer, max_seq_len, doc_stride)
        start_positions, end_positions = [], []
        for window, example_index in enumerate(encoded["overflow_to_sample_mapping"]):
            cls_index = encoded["input_ids"][window].index(tokenizer.cls_token_id)
            answers = batch["answers"][example_index]
            span = None
            if answers["text"]:
                span = answer_token_span(
                    encoded["offset_mapping"][window], encoded.sequence_ids(window),
                    answers["answer_start"][0], answers["text"][0],
                )
            start, end = span if span is not None else (cls_index, cls_index)
            start_positions.append(start)
            end_positions.append(end)
        model_inputs = {name: encoded[name] for name in QA_MODEL_INPUTS}
        return {**model_inputs, "start_positions": start_positions, "end_positions": end_positions}

    _check_window_setup(tokenizer, max_seq_len, doc_stride)
    return examples.map(
        encode, batched=True, remove_columns=examples.column_names, desc="SQuAD train features"
    )


def prepare_eval_features(
    examples: Dataset,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int = 384,
    doc_stride: int = 128,
) -> Dataset:
    """Evaluation windows: QA_MODEL_INPUTS plus `example_id` and `offset_mapping`.

    `offset_mapping` is None on question and special tokens, so post-processing only picks
    spans inside the context.
    """

    def encode(batch: dict[str, list]) -> dict[str, list]:
        encoded = _encode_windows(batch, tokenizer, max_seq_len, doc_stride)
        example_ids, context_offsets = [], []
        for window, example_index in enumerate(encoded["overflow_to_sample_mapping"]):
            example_ids.append(batch["id"][example_index])
            context_offsets.append(
                [
                    list(offset) if seq_id == 1 else None
                    for offset, seq_id in zip(
                        encoded["offset_mapping"][window], encoded.sequence_ids(window)
                    )
                ]
            )
        model_inputs = {name: encoded[name] for name in QA_MODEL_INPUTS}
        return {**model_inputs, "example_id": example_ids, "offset_mapping": context_offsets}

    _check_window_setup(tokenizer, max_seq_len, doc_stride)
    return examples.map(
        encode, batched=True, remove_columns=examples.column_names, desc="SQuAD eval features"
    )


def postprocess_qa_predictions(
    examples: Dataset,
    features: Dataset,
    start_logits: Any,
    end_logits: Any,
    n_best_size: int = 20,
    max_answer_length: int = 30,
) -> dict[str, str]:
    """Question id -> answer text: the best-scoring valid span over all windows of the question.

    start_logits / end_logits: (num_features, max_seq_len), rows in the order of `features`
    (from `prepare_eval_features`). Candidates are the top `n_best_size` starts x ends of each
    window; a span is valid if it lies in the context, ends after it starts and is at most
    `max_answer_length` tokens. Its score is start_logit + end_logit.
    """
    start_logits, end_logits = np.asarray(start_logits), np.asarray(end_logits)
    expected_rows = len(features)
    for name, logits in (("start_logits", start_logits), ("end_logits", end_logits)):
        if logits.ndim != 2 or logits.shape[0] != expected_rows:
            raise ValueError(
                f"{name} has shape {logits.shape}; expected ({expected_rows}, seq_len), "
                "one row per feature"
            )
    windows_of_example: dict[str, list[int]] = defaultdict(list)
    for feature_index, example_id in enumerate(features["example_id"]):
        windows_of_example[example_id].append(feature_index)
    all_offsets = list(features["offset_mapping"])

    predictions = {}
    for example_id, context in zip(examples["id"], examples["context"]):
        best_score, best_text = -np.inf, ""
        for window in windows_of_example.get(example_id, []):
            offsets = all_offsets[window]
            top_starts = np.argsort(start_logits[window])[::-1][:n_best_size]
            top_ends = np.argsort(end_logits[window])[::-1][:n_best_size]
            for start in top_starts:
                for end in top_ends:
                    if start >= len(offsets) or end >= len(offsets):
                        continue
                    if offsets[start] is None or offsets[end] is None:
                        continue
                    if end < start or end - start + 1 > max_answer_length:
                        continue
                    score = start_logits[window, start] + end_logits[window, end]
                    if score > best_score:
                        best_score, best_text = score, context[offsets[start][0] : offsets[end][1]]
        if example_id not in windows_of_example:
            logger.warning("question %r has no features; predicting the empty answer", example_id)
        predictions[example_id] = best_text
    return predictions


def squad_references(examples: Dataset) -> dict[str, list[str]]:
    """Question id -> its ground-truth answer texts."""
    return {qid: answers["text"] for qid, answers in zip(examples["id"], examples["answers"])}


def evaluate_squad(
    examples: Dataset,
    features: Dataset,
    start_logits: Any,
    end_logits: Any,
    n_best_size: int = 20,
    max_answer_length: int = 30,
) -> dict[str, float]:
    """Exact match and F1 (percent) of the answers decoded from the logits."""
    predictions = postprocess_qa_predictions(
        examples, features, start_logits, end_logits, n_best_size, max_answer_length
    )
    return squad_metrics(predictions, squad_references(examples))
