"""Metrics for GLUE and SQuAD v1.1, checked on hand-computed values (and against scipy)."""

import math

import numpy as np
import pytest
import torch
from scipy import stats

from vp_dist.downstream.glue import GLUE_TASKS
from vp_dist.downstream.metrics import (
    METRIC_FUNCTIONS,
    accuracy,
    average_ranks,
    f1_binary,
    glue_metrics,
    matthews_corrcoef,
    normalize_answer,
    pearson,
    spearman,
    squad_exact_match,
    squad_f1,
    squad_metrics,
)


def pairs_from_confusion(tp: int, tn: int, fp: int, fn: int) -> tuple[list[int], list[int]]:
    """(predictions, labels) realising a binary confusion matrix."""
    predictions = [1] * tp + [0] * tn + [1] * fp + [0] * fn
    labels = [1] * tp + [0] * tn + [0] * fp + [1] * fn
    return predictions, labels


# --- classification ----------------------------------------------------------------------------


def test_accuracy_is_the_fraction_of_matches():
    assert accuracy([1, 0, 1, 1], [1, 1, 1, 0]) == 0.5


def test_metrics_accept_tensors():
    assert accuracy(torch.tensor([1, 0, 2]), torch.tensor([1, 1, 2])) == pytest.approx(2 / 3)


def test_f1_binary_counts_the_positive_class():
    # TP=2, FP=1, FN=1 -> 2*2 / (2*2 + 1 + 1)
    assert f1_binary([1, 1, 0, 0, 1], [1, 0, 0, 1, 1]) == pytest.approx(4 / 6)


def test_f1_binary_is_zero_without_any_positive():
    assert f1_binary([0, 0, 0], [0, 0, 0]) == 0.0


def test_matthews_on_a_known_confusion_matrix():
    predictions, labels = pairs_from_confusion(tp=5, tn=3, fp=1, fn=2)
    # (TP*TN - FP*FN) / sqrt((TP+FP)(TP+FN)(TN+FP)(TN+FN)) = 13 / sqrt(6*7*4*5)
    assert matthews_corrcoef(predictions, labels) == pytest.approx(13 / math.sqrt(840))


def test_matthews_is_one_for_perfect_and_minus_one_for_inverted_predictions():
    labels = [0, 1, 1, 0, 1]
    assert matthews_corrcoef(labels, labels) == pytest.approx(1.0)
    assert matthews_corrcoef([1 - label for label in labels], labels) == pytest.approx(-1.0)


def test_matthews_is_zero_when_predictions_hold_one_class():
    assert matthews_corrcoef([1, 1, 1, 1], [0, 1, 1, 0]) == 0.0


def test_matthews_multiclass_by_hand():
    # Confusion (rows true): [[2,0,0],[0,0,1],[0,0,1]]; t=[2,1,1], p=[2,0,2], n=4, correct=3.
    # (3*4 - t.p) / sqrt((16 - t.t)(16 - p.p)) = 6 / sqrt(10 * 8)
    assert matthews_corrcoef([0, 2, 2, 0], [0, 1, 2, 0]) == pytest.approx(6 / math.sqrt(80))


def test_matthews_equals_pearson_of_binary_vectors():
    rng = np.random.default_rng(0)
    predictions, labels = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    assert matthews_corrcoef(predictions, labels) == pytest.approx(pearson(predictions, labels))


def test_mismatched_lengths_are_an_error_naming_both():
    with pytest.raises(ValueError, match="3 values but labels has 4"):
        accuracy([1, 0, 1], [1, 0, 1, 1])


def test_empty_input_is_an_error():
    with pytest.raises(ValueError, match="0 examples"):
        f1_binary([], [])


# --- correlation -------------------------------------------------------------------------------


def test_pearson_by_hand():
    # dx=[-1,0,1], dy=[-4/3,-1/3,5/3]: sum(dx*dy)=3, sum(dx^2)=2, sum(dy^2)=42/9
    assert pearson([1, 2, 3], [1, 2, 4]) == pytest.approx(3 / math.sqrt(2 * 42 / 9))


def test_average_ranks_share_ties():
    assert average_ranks([10, 20, 10, 30, 20, 20]).tolist() == [1.5, 4.0, 1.5, 6.0, 4.0, 4.0]


def test_spearman_with_ties_by_hand():
    # ranks x=[1,2.5,2.5,4], y=[1,3,2,4]: sum(dx*dy)=4.5, sum(dx^2)=4.5, sum(dy^2)=5
    assert spearman([1, 2, 2, 3], [1, 3, 2, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))


def test_spearman_is_one_for_any_increasing_map():
    scores = [0.1, 0.5, 0.3, 4.0]
    assert spearman(scores, np.exp(scores)) == pytest.approx(1.0)


def test_correlations_agree_with_scipy_on_tied_data():
    rng = np.random.default_rng(1)
    predictions = rng.integers(0, 6, 300).astype(float)  # many ties
    labels = predictions + rng.normal(0, 2, 300).round()
    assert pearson(predictions, labels) == pytest.approx(stats.pearsonr(predictions, labels)[0])
    assert spearman(predictions, labels) == pytest.approx(stats.spearmanr(predictions, labels)[0])
    assert average_ranks(labels).tolist() == stats.rankdata(labels).tolist()


def test_correlation_of_constant_input_is_nan():
    assert math.isnan(pearson([2.0, 2.0, 2.0], [1.0, 2.0, 3.0]))
    assert math.isnan(spearman([1.0, 2.0, 3.0], [0.0, 0.0, 0.0]))


# --- GLUE --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "task, keys",
    [
        ("cola", ["matthews_correlation"]),
        ("sst2", ["accuracy"]),
        ("mrpc", ["f1", "accuracy"]),
        ("stsb", ["spearman", "pearson"]),
        ("qqp", ["accuracy", "f1"]),
        ("mnli", ["accuracy"]),
        ("qnli", ["accuracy"]),
        ("rte", ["accuracy"]),
    ],
)
def test_glue_metrics_report_the_table_1_metric_first(task, keys):
    assert list(glue_metrics(task, [1, 0, 1, 1], [1, 0, 0, 1])) == keys


def test_every_task_metric_has_an_implementation():
    for task in GLUE_TASKS.values():
        assert set(task.metrics) <= set(METRIC_FUNCTIONS), task.name


def test_glue_metrics_are_percentages():
    # TP=2, FP=1, FN=1, TN=1
    scores = glue_metrics("MRPC", [1, 1, 0, 0, 1], [1, 0, 0, 1, 1])
    assert scores == {"f1": pytest.approx(100 * 4 / 6), "accuracy": pytest.approx(60.0)}
    predictions, labels = pairs_from_confusion(tp=5, tn=3, fp=1, fn=2)
    assert glue_metrics("CoLA", predictions, labels)["matthews_correlation"] == pytest.approx(
        100 * 13 / math.sqrt(840)
    )


def test_glue_metrics_for_sts_b_take_scores():
    scores = glue_metrics("sts-b", [1.0, 2.0, 2.0, 3.0], [1.0, 3.0, 2.0, 4.0])
    assert scores["spearman"] == pytest.approx(100 * 4.5 / math.sqrt(22.5))
    assert scores["pearson"] == pytest.approx(100 * pearson([1, 2, 2, 3], [1, 3, 2, 4]))


def test_glue_metrics_for_an_unknown_task_names_it():
    with pytest.raises(ValueError, match="unknown GLUE task 'wnli'"):
        glue_metrics("wnli", [1], [1])


# --- SQuAD -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, normalized",
    [
        ("The  Cat!", "cat"),
        ("An apple, a day.", "apple day"),
        ("Theatre and anthem", "theatre and anthem"),  # articles only as whole words
        ("Levi's Stadium", "levis stadium"),  # punctuation removed, not split on
        ("  Santa\tClara,\nCalifornia ", "santa clara california"),
    ],
)
def test_normalize_answer_follows_the_official_script(text, normalized):
    assert normalize_answer(text) == normalized


def test_exact_match_after_normalisation():
    assert squad_exact_match("The  Cat!", ["cat"]) == 1.0
    assert squad_exact_match("cats", ["cat"]) == 0.0


def test_exact_match_takes_the_best_ground_truth():
    assert squad_exact_match("Denver", ["Denver Broncos", "denver"]) == 1.0


def test_f1_on_partial_overlap_by_hand():
    # tokens: [cat, sat, on, mat] vs [cat, on, mat] -> 3 common, P=3/4, R=1, F1=6/7
    assert squad_f1("the cat sat on the mat", ["a cat on a mat"]) == pytest.approx(6 / 7)


def test_f1_counts_repeated_tokens_once_per_occurrence():
    # [cat, cat] vs [cat, dog]: 1 common, P=1/2, R=1/2
    assert squad_f1("the cat cat", ["cat dog"]) == pytest.approx(0.5)


def test_f1_takes_the_best_ground_truth():
    # vs "cat": P=1/2, R=1 -> 2/3; vs "dog": 0
    assert squad_f1("cat sat", ["dog", "cat"]) == pytest.approx(2 / 3)


def test_f1_of_an_empty_prediction_is_zero():
    assert squad_f1("", ["Denver Broncos"]) == 0.0


def test_ground_truths_must_be_a_list():
    with pytest.raises(ValueError, match="ground_truths='cat'"):
        squad_f1("cat", "cat")


def test_squad_metrics_average_in_percent():
    predictions = {"q1": "Denver Broncos", "q2": "Broncos"}
    references = {"q1": ["Denver Broncos"], "q2": ["Denver Broncos", "The Denver Broncos"]}
    # q1 EM 1, F1 1; q2 EM 0, F1 = 2 * 1 * 1/2 / (1 + 1/2) = 2/3
    assert squad_metrics(predictions, references) == {
        "exact_match": pytest.approx(50.0),
        "f1": pytest.approx(100 * (1 + 2 / 3) / 2),
    }


def test_squad_metrics_need_a_prediction_for_every_question():
    with pytest.raises(ValueError, match=r"1 of 2 questions have no prediction, e.g. \['q2'\]"):
        squad_metrics({"q1": "a"}, {"q1": ["a"], "q2": ["b"]})
