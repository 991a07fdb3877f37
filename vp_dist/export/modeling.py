"""Model classes of the compact (squeezed) checkpoint.

Each is the stock `transformers` BERT class, built full size from the config and then given the
squeezed shapes recorded in it (`apply_structure`), so `from_pretrained` loads the squeezed
tensors by their usual names. Importing this module costs the import of `modeling_bert`; the
`transformers` Auto classes reach it lazily (see `registry`).
"""
from __future__ import annotations

import torch
from transformers import (BertForMaskedLM, BertForPreTraining, BertForQuestionAnswering,
                          BertForSequenceClassification, BertModel)
from transformers import initialization as init

from ..squeeze.layers import SqueezedLinear
from .config import VPBertConfig
from .compact import SqueezedStructure, apply_structure


class _Squeezed:
    """Mixin: after the stock `__init__`, reshape the base model to the config's structure."""

    config_class = VPBertConfig

    def __init__(self, config: VPBertConfig, *args, **kwargs):
        super().__init__(config, *args, **kwargs)
        apply_structure(self.base_model, SqueezedStructure.from_config(config))

    def _init_weights(self, module):
        # Only for tensors a checkpoint does not provide, as for any HF module.
        super()._init_weights(module)
        if isinstance(module, SqueezedLinear):
            init.normal_(module.weight, mean=0.0, std=self.config.initializer_range)
            init.zeros_(module.bias)


class VPBertModel(_Squeezed, BertModel):
    """Squeezed `BertModel`."""


class VPBertForPreTraining(_Squeezed, BertForPreTraining):
    """Squeezed `BertForPreTraining` (MLM + NSP heads)."""


class VPBertForMaskedLM(_Squeezed, BertForMaskedLM):
    """Squeezed `BertForMaskedLM`."""


class VPBertForSequenceClassification(_Squeezed, BertForSequenceClassification):
    """Squeezed `BertForSequenceClassification`."""


class VPBertForQuestionAnswering(_Squeezed, BertForQuestionAnswering):
    """Squeezed `BertForQuestionAnswering`."""


# stock class name -> squeezed class, and back
SQUEEZED_CLASSES = {
    "BertModel": VPBertModel,
    "BertForPreTraining": VPBertForPreTraining,
    "BertForMaskedLM": VPBertForMaskedLM,
    "BertForSequenceClassification": VPBertForSequenceClassification,
    "BertForQuestionAnswering": VPBertForQuestionAnswering,
}


def squeezed_class_for(model: torch.nn.Module) -> type:
    """The VP class matching a stock (or VP) BERT model's class."""
    name = type(model).__name__.removeprefix("VP")
    if name not in SQUEEZED_CLASSES:
        raise ValueError(f"{type(model).__name__} has no squeezed export class; supported: "
                         f"{sorted(SQUEEZED_CLASSES)}")
    return SQUEEZED_CLASSES[name]
