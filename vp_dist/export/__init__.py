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

# What a compact export needs to load without vp_dist: these modules import only torch,
# transformers and each other (relatively), so they can be bundled with the checkpoint for
# `trust_remote_code=True` loading. Keep it so: nothing else of vp_dist may be imported from them.
SELF_CONTAINED_MODULES = (
    "vp_dist.squeeze.layers",      # SqueezedLinear
    "vp_dist.squeeze.attention",   # SqueezedBertAttention, the exact attention shrink
    "vp_dist.export.config",       # VPBertConfig
    "vp_dist.export.compact",      # SqueezedStructure, apply_structure
    "vp_dist.export.modeling",     # VPBert* classes
)

__all__ = ["SELF_CONTAINED_MODULES", "VPBertConfig", "MASKS_FILE", "export_masked", "export_squeezed", "masked_model", "squeezed_model",
           "SqueezedStructure", "expanded_layers", "read_structure", "register_auto_classes"]


def __getattr__(name: str):
    if name.startswith("VPBert"):
        from . import modeling
        return getattr(modeling, name)
    raise AttributeError(f"module 'vp_dist.export' has no attribute {name!r}")
