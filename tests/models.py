"""Tiny models of each supported family, built offline from configs."""
from __future__ import annotations

import torch
from transformers import (BertConfig, BertForMaskedLM, BertForPreTraining, BertForQuestionAnswering,
                          BertForSequenceClassification, LlamaConfig, LlamaForCausalLM, RobertaConfig,
                          RobertaForMaskedLM)

VOCAB = 97


def tiny_bert_config(**overrides) -> BertConfig:
    values = dict(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=64, type_vocab_size=2)
    values.update(overrides)
    return BertConfig(**values)


def tiny_model(kind: str, seed: int = 0, **overrides) -> torch.nn.Module:
    torch.manual_seed(seed)
    if kind == "bert-mlm":
        return BertForMaskedLM(tiny_bert_config(**overrides))
    if kind == "bert-pretraining":
        return BertForPreTraining(tiny_bert_config(**overrides))
    if kind == "bert-cls":
        return BertForSequenceClassification(tiny_bert_config(num_labels=3, **overrides))
    if kind == "bert-qa":
        return BertForQuestionAnswering(tiny_bert_config(**overrides))
    if kind == "roberta-mlm":
        return RobertaForMaskedLM(RobertaConfig(**{**tiny_bert_config(**overrides).to_dict(),
                                                    "max_position_embeddings": 70, "pad_token_id": 1,
                                                    "model_type": "roberta"}))
    if kind == "llama":
        return LlamaForCausalLM(LlamaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                                            num_attention_heads=4, num_key_value_heads=2,
                                            intermediate_size=48, max_position_embeddings=64, **overrides))
    raise ValueError(kind)


def random_batch(batch: int = 3, seq: int = 12, seed: int = 0, pad_from: tuple = (12, 7, 4)) -> dict:
    """Token ids, an attention mask with padding from `pad_from[i]` on, and MLM labels."""
    g = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(5, VOCAB, (batch, seq), generator=g)
    attention_mask = torch.ones(batch, seq, dtype=torch.long)
    for row, start in enumerate(pad_from[:batch]):
        attention_mask[row, start:] = 0
    input_ids = input_ids.masked_fill(attention_mask == 0, 0)
    labels = input_ids.masked_fill(attention_mask == 0, -100)
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}
