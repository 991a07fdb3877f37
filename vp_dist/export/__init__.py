"""Exports of a pruned BERT: full-size masked (stock `transformers`) and compact squeezed.

Importing this package registers model_type "vp_bert" with the `transformers` Auto classes, so
after `import vp_dist` (which imports it) `AutoModelForSequenceClassification.from_pretrained`
and friends load a squeezed export. The model classes themselves live in `vp_dist.export.modeling`
and are imported on first use. The export also carries its own copy of that code
(`SELF_CONTAINED_MODULES`), so a process without vp_dist loads it with `trust_remote_code=True`.
"""
# Copied into every squeezed export (with imports rewritten, see remote_code.py) so that
# `AutoModelFor*.from_pretrained(dir, trust_remote_code=True)` needs no vp_dist. Each may import only
# the standard library, torch, transformers and the others listed; add new squeezed-layer modules here.
SELF_CONTAINED_MODULES = (
    "vp_dist.squeeze.layers",      # SqueezedLinear
    "vp_dist.squeeze.attention",   # SqueezedBertAttention, the exact attention shrink
    "vp_dist.export.config",       # VPBertConfig
    "vp_dist.export.compact",      # SqueezedStructure, apply_structure
    "vp_dist.export.modeling",     # VPBert* classes
)
REMOTE_CONFIG_MODULE = "vp_dist.export.config"
REMOTE_MODELING_MODULE = "vp_dist.export.modeling"

from .config import VPBertConfig  # noqa: E402
from .exporters import MASKS_FILE, export_masked, export_squeezed, masked_model, squeezed_model  # noqa: E402
from .registry import register_auto_classes  # noqa: E402
from .structure import SqueezedStructure, expanded_layers, read_structure  # noqa: E402

register_auto_classes()

__all__ = ["SELF_CONTAINED_MODULES", "VPBertConfig", "MASKS_FILE", "export_masked", "export_squeezed",
           "masked_model", "squeezed_model", "SqueezedStructure", "expanded_layers", "read_structure", "register_auto_classes"]


def __getattr__(name: str):
    if name.startswith("VPBert"):
        from . import modeling
        return getattr(modeling, name)
    raise AttributeError(f"module 'vp_dist.export' has no attribute {name!r}")
