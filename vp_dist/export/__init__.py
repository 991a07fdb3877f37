"""Exports of a pruned BERT: full-size masked (stock `transformers`) and compact squeezed.

Importing this package registers model_type "vp_bert" with the `transformers` Auto classes, so
after `import vp_dist` (which imports it) `AutoModelForSequenceClassification.from_pretrained`
and friends load a squeezed export. The model classes themselves live in
`vp_dist.export.modeling` and are imported on first use.
"""
from .config import VPBertConfig
from .exporters import MASKS_FILE, export_masked, export_squeezed, masked_model, squeezed_model
from .registry import register_auto_classes
from .structure import SqueezedStructure, expanded_layers, read_structure

register_auto_classes()

__all__ = ["VPBertConfig", "MASKS_FILE", "export_masked", "export_squeezed", "masked_model", "squeezed_model",
           "SqueezedStructure", "expanded_layers", "read_structure", "register_auto_classes"]


def __getattr__(name: str):
    if name.startswith("VPBert"):
        from . import modeling
        return getattr(modeling, name)
    raise AttributeError(f"module 'vp_dist.export' has no attribute {name!r}")
