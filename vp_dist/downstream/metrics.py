"""Evaluation metrics for the downstream tasks (GLUE and SQuAD v1.1).

Two levels:
- primitives (`accuracy`, `f1_binary`, `matthews_corrcoef`, `pearson`, `spearman`) return values in
  their natural range ([0, 1] or [-1, 1]) and take 1-D array-likes (lists, numpy arrays, tensors);
- report-level dicts (`glue_metrics`, `squad_metrics`) return percentages, the units of the paper's
  Table 1, the GLUE leaderboard and the official SQuAD v1.1 `evaluate-v1.1.py` script.

Implemented with numpy only; `tests/test_metrics.py` cross-checks them against scipy.
"""

from __future__ import annotations

import logging
import re
import string
from collections import Counter
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from vp_dist.downstream.glue import get_glue_task

logger = logging.getLogger(__name__)


def _paired_arrays(predictions: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    predictions, labels = np.asarray(predictions), np.asarray(labels)
    if predictions.ndim != 1 or labels.ndim != 1:
        raise ValueError(
            f"predictions and labels must be 1-D, got shapes {predictions.shape} and {labels.shape}"
        )
    if len(predictions) != len(labels):
        raise ValueError(
            f"predictions has {len(predictions)} values but labels has {len(labels)}; "
            "they must be paired one to one"
        )
    if len(labels) == 0:
        raise ValueError("cannot compute a metric on 0 examples")
    return predictions, labels


def accuracy(predictions: Any, labels: Any) -> float:
    """Fraction of predictions equal to their label."""
    predictions, labels = _paired_arrays(predictions, labels)
    return float(np.mean(predictions == labels))


def f1_binary(predictions: Any, labels: Any, positive_label: int = 1) -> float:
    """F1 of the positive class: 2 TP / (2 TP + FP + FN); 0.0 when there are no positives at all."""
    predictions, labels = _paired_arrays(predictions, labels)
    predicted_positive, actual_positive = predictions == positive_label, labels == positive_label
    true_positives = np.sum(predicted_positive & actual_positive)
    false_positives = np.sum(predicted_positive & ~actual_positive)
    false_negatives = np.sum(~predicted_positive & actual_positive)
    denominator = 2 * true_positives + false_positives + false_negatives
    return float(2 * true_positives / denominator) if denominator > 0 else 0.0


def matthews_corrcoef(predictions: Any, labels: Any) -> float:
    """Matthews correlation (multi-class R_K form, equal to the phi coefficient for two classes).

    0.0 when the predictions or the labels hold a single class (the denominator vanishes), as in
    scikit-learn.
    """
    predictions, labels = _paired_arrays(predictions, labels)
    classes, class_ids = np.unique(np.concatenate([labels, predictions]), return_inverse=True)
    label_ids, prediction_ids = class_ids[: len(labels)], class_ids[len(labels) :]
    confusion = np.zeros((len(classes), len(classes)), dtype=np.float64)
    np.add.at(confusion, (label_ids, prediction_ids), 1.0)
    # Floats, not ints: n_samples**4 overflows int64 from about 55k examples (QQP dev has 40k).
    true_counts, predicted_counts = confusion.sum(axis=1), confusion.sum(axis=0)
    n_samples, n_correct = confusion.sum(), np.trace(confusion)
    covariance_true_pred = n_correct * n_samples - true_counts @ predicted_counts
    covariance_pred_pred = n_samples**2 - predicted_counts @ predicted_counts
    covariance_true_true = n_samples**2 - true_counts @ true_counts
    denominator = np.sqrt(covariance_true_true * covariance_pred_pred)
    return float(covariance_true_pred / denominator) if denominator > 0 else 0.0


def pearson(predictions: Any, labels: Any) -> float:
    """Pearson correlation; NaN (with a warning) when either side is constant, as in scipy."""
    predictions, labels = _paired_arrays(predictions, labels)
    prediction_dev = predictions.astype(np.float64) - predictions.mean(dtype=np.float64)
    label_dev = labels.astype(np.float64) - labels.mean(dtype=np.float64)
    denominator = np.sqrt(np.sum(prediction_dev**2) * np.sum(label_dev**2))
    if denominator == 0:
        logger.warning("correlation is undefined for constant input; returning NaN")
        return float("nan")
    return float(np.clip(np.sum(prediction_dev * label_dev) / denominator, -1.0, 1.0))


def average_ranks(values: Any) -> np.ndarray:
    """1-based ranks, tied values sharing the mean of their ranks (scipy's `rankdata` 'average')."""
    values = np.asarray(values)
    sorter = np.argsort(values, kind="mergesort")
    sorted_values = values[sorter]
    starts_group = np.concatenate([[True], sorted_values[1:] != sorted_values[:-1]])
    group_of_position = np.cumsum(starts_group) - 1
    group_starts = np.flatnonzero(starts_group)
    group_ends = np.append(group_starts[1:], len(values))
    # Positions start..end-1 hold ranks start+1..end, whose mean is (start + 1 + end) / 2.
    group_rank = (group_starts + 1 + group_ends) / 2.0
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[sorter] = group_rank[group_of_position]
    return ranks


def spearman(predictions: Any, labels: Any) -> float:
    """Spearman rank correlation: Pearson correlation of the average ranks (ties handled)."""
    predictions, labels = _paired_arrays(predictions, labels)
    return pearson(average_ranks(predictions), average_ranks(labels))


METRIC_FUNCTIONS: dict[str, Callable[[Any, Any], float]] = {
    "accuracy": accuracy,
    "f1": f1_binary,
    "matthews_correlation": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}


def glue_metrics(task: str, predictions: Any, labels: Any) -> dict[str, float]:
    """The metrics of the paper's Table 1 for one GLUE task, in percent.

    `predictions` are class ids (see `glue.predictions_from_logits`), or scores for STS-B. The first
    key is the task's headline metric (`GlueTask.metrics[0]`): CoLA Matthews, SST-2 accuracy,
    MRPC F1 (+ accuracy), STS-B Spearman (+ Pearson), QQP accuracy (+ F1), MNLI accuracy (call
    once per eval split for MNLI-m and MNLI-mm), QNLI accuracy, RTE accuracy.
    """
    glue_task = get_glue_task(task)
    return {
        name: 100.0 * METRIC_FUNCTIONS[name](predictions, labels) for name in glue_task.metrics
    }


_PUNCTUATION = frozenset(string.punctuation)


def normalize_answer(text: str) -> str:
    """SQuAD v1.1 normalisation: lowercase, drop punctuation, drop a/an/the, collapse whitespace.

    Same steps in the same order as the official `evaluate-v1.1.py`.
    """
    text = text.lower()
    text = "".join(char for char in text if char not in _PUNCTUATION)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())



def squad_exact_match(prediction: str, ground_truths: Sequence[str]) -> float:
    """1.0 if the normalised prediction equals any normalised ground truth, else 0.0."""
    _require_ground_truths(ground_truths)
    normalized = normalize_answer(prediction)
    return max(float(normalized == normalize_answer(truth)) for truth in ground_truths)


def squad_f1(prediction: str, ground_truths: Sequence[str]) -> float:
    """Best token-level F1 (bag of normalised tokens) between the prediction and a ground truth."""
    _require_ground_truths(ground_truths)
    return max(_token_f1(prediction, truth) for truth in ground_truths)


def _token_f1(prediction: str, ground_truth: str) -> float:
    prediction_tokens = normalize_answer(prediction).split()
    truth_tokens = normalize_answer(ground_truth).split()
    n_common = sum((Counter(prediction_tokens) & Counter(truth_tokens)).values())
    if n_common == 0:
        return 0.0
    precision, recall = n_common / len(prediction_tokens), n_common / len(truth_tokens)
    return 2 * precision * recall / (precision + recall)


def _require_ground_truths(ground_truths: Sequence[str]) -> None:
    if isinstance(ground_truths, str) or len(ground_truths) == 0:
        raise ValueError(
            f"ground_truths={ground_truths!r} must be a non-empty list of answer strings"
        )


def squad_metrics(
    predictions: Mapping[str, str], references: Mapping[str, Sequence[str]]
) -> dict[str, float]:
    """SQuAD v1.1 exact match and F1 in percent, averaged over the questions in `references`.

    predictions: question id -> predicted answer text; references: question id -> its answers.
    Every referenced question needs a prediction (the official script would score a missing one 0;
    here it is a bug upstream, so it is an error). Extra predictions are ignored.
    """
    if not references:
        raise ValueError("references is empty: nothing to evaluate")
    missing = [question_id for question_id in references if question_id not in predictions]
    if missing:
        raise ValueError(
            f"{len(missing)} of {len(references)} questions have no prediction, e.g. {missing[:3]}"
        )
    exact_match = sum(squad_exact_match(predictions[qid], refs) for qid, refs in references.items())
    f1 = sum(squad_f1(predictions[qid], refs) for qid, refs in references.items())
    return {
        "exact_match": 100.0 * exact_match / len(references),
        "f1": 100.0 * f1 / len(references),
    }
