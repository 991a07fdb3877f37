"""Registration of the "vp_bert" model type with the `transformers` Auto classes.

Runs on `import vp_dist.export`. The config class is registered directly (cheap); each model class
is registered as a small stand-in whose `from_pretrained` / `from_config` import `modeling` (and
with it `modeling_bert`, seconds of import time) only when a squeezed model is actually loaded.
"""
from __future__ import annotations

import importlib

from transformers import (AutoConfig, AutoModel, AutoModelForMaskedLM, AutoModelForPreTraining,
                          AutoModelForQuestionAnswering, AutoModelForSequenceClassification)

from .config import VPBertConfig

AUTO_CLASSES = {
    AutoModel: "VPBertModel",
    AutoModelForPreTraining: "VPBertForPreTraining",
    AutoModelForMaskedLM: "VPBertForMaskedLM",
    AutoModelForSequenceClassification: "VPBertForSequenceClassification",
    AutoModelForQuestionAnswering: "VPBertForQuestionAnswering",
}


def _real_class(name: str) -> type:
    return getattr(importlib.import_module("vp_dist.export.modeling"), name)


def _stand_in(name: str) -> type:
    """A class that the Auto mapping can hold, forwarding to `vp_dist.export.modeling.<name>`."""

    def from_pretrained(cls, *args, **kwargs):
        return _real_class(name).from_pretrained(*args, **kwargs)

    def from_config(cls, *args, **kwargs):
        return _real_class(name)._from_config(*args, **kwargs)

    return type(name, (), {
        "__module__": __name__, "__doc__": f"Lazy handle on vp_dist.export.modeling.{name}.",
        "config_class": VPBertConfig, "from_pretrained": classmethod(from_pretrained),
        "_from_config": classmethod(from_config), "from_config": classmethod(from_config)})


def register_auto_classes() -> None:
    """Idempotent: `AutoConfig` learns "vp_bert", each Auto model class its VP model class."""
    AutoConfig.register(VPBertConfig.model_type, VPBertConfig, exist_ok=True)
    for auto_class, name in AUTO_CLASSES.items():
        auto_class.register(VPBertConfig, _stand_in(name), exist_ok=True)
