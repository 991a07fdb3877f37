"""BERT shapes for pre-training, built from a preset, a local HF config, or a hub name; the MLM
head computed at the labelled positions only."""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
import torch.nn as nn
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
    if spec.gradient_checkpointing:
        # Non-reentrant: works with inputs that need no grad and with ZeRO-3's parameter hooks.
        # Recomputed forwards run inside backward, outside `pruner.observe`: never observed (SPEC 1).
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return prepare_model(model)


def masked_lm_head(model: nn.Module) -> nn.Module | None:
    """The MLM prediction head (transform + decoder) of a BERT pre-training model, else None."""
    head = getattr(getattr(model, "cls", None), "predictions", None)
    return head if isinstance(head, nn.Module) else None


@contextlib.contextmanager
def mlm_head_at(model: nn.Module, positions: torch.Tensor):
    """Inside the block, `model`'s MLM head sees only the hidden states at `positions` (int64
    indices into the flattened [batch * seq] positions): its logits come out as [len(positions),
    vocab] instead of [batch, seq, vocab]. For BERT-large at 15% masking this skips 85% of the
    decoder's FLOPs and of the logits' memory. A forward pre-hook, so the engine's own forward
    (ZeRO-3 parameter fetching, autocast) runs unchanged; removed on exit."""
    head = masked_lm_head(model)
    if head is None:
        raise ValueError(f"{type(model).__name__} has no `cls.predictions` MLM head: set "
                         "model.masked_positions_only=false")

    def gather(module, args):
        hidden = args[0]
        return (hidden.reshape(-1, hidden.shape[-1]).index_select(0, positions), *args[1:])
    handle = head.register_forward_pre_hook(gather)
    try:
        yield
    finally:
        handle.remove()
