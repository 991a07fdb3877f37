"""Downstream tasks for fine-tuning pruned models: GLUE and SQuAD v1.1 data, features and metrics.

No model code here: `launch/finetune.py` builds the model and calls these functions.
"""

from vp_dist.downstream.glue import (
    GLUE_TASKS,
    GlueTask,
    get_glue_task,
    load_glue,
    predictions_from_logits,
    read_glue_file,
    tokenize_glue,
)
from vp_dist.downstream.metrics import glue_metrics, squad_metrics
from vp_dist.downstream.squad import (
    QA_MODEL_INPUTS,
    evaluate_squad,
    load_squad,
    postprocess_qa_predictions,
    prepare_eval_features,
    prepare_train_features,
    read_squad_file,
)

__all__ = [
    "GLUE_TASKS",
    "GlueTask",
    "QA_MODEL_INPUTS",
    "evaluate_squad",
    "get_glue_task",
    "glue_metrics",
    "load_glue",
    "load_squad",
    "postprocess_qa_predictions",
    "predictions_from_logits",
    "prepare_eval_features",
    "prepare_train_features",
    "read_glue_file",
    "read_squad_file",
    "squad_metrics",
    "tokenize_glue",
]
