"""BERT shapes for pre-training, built from a preset, a local HF config, or a hub name."""
from __future__ import annotations

import logging
from pathlib import Path

from transformers import BertConfig, BertForPreTraining

from ..pruner import prepare_model
from .fused import fuse_layer_norms
from .config import ModelSpec

logger = logging.getLogger(__name__)

# Shapes only (weights are always freshly initialised for pre-training).
PRESETS = {
    "tiny": dict(hidden_size=128, num_hidden_layers=2, num_attention_heads=2, intermediate_size=512),
    "mini": dict(hidden_size=256, num_hidden_layers=4, num_attention_heads=4, intermediate_size=1024),
    "bert-base": dict(hidden_size=768, num_hidden_layers=12, num_attention_heads=12, intermediate_size=3072),
    "bert-large": dict(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
}


def model_config(spec: ModelSpec, vocab_size: int, max_seq_len: int) -> BertConfig:
    if spec.config in PRESETS:
        config = BertConfig(**PRESETS[spec.config])
    elif Path(spec.config).exists():
        config = BertConfig.from_pretrained(spec.config)
    else:
        logger.info("model config %r is no preset or local path: asking the hub", spec.config)
        config = BertConfig.from_pretrained(spec.config)
    for key, value in spec.overrides.items():
        if not hasattr(config, key):
            raise ValueError(f"model.overrides: BertConfig has no field {key!r}")
        setattr(config, key, value)
    config.vocab_size = vocab_size
    config.max_position_embeddings = max(config.max_position_embeddings, max_seq_len)
    return config


def build_model(spec: ModelSpec, vocab_size: int, max_seq_len: int) -> BertForPreTraining:
    """A freshly initialised BertForPreTraining (MLM + NSP heads), prepared for pruning."""
    model = BertForPreTraining(model_config(spec, vocab_size, max_seq_len))
    fuse_layer_norms(model, spec.fused_layernorm)
    return prepare_model(model)
