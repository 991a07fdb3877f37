"""vp-dist: distributed Variance Pruning for transformer pre-training on DeepSpeed."""
from .adapters import PROJECTION_TYPES, Family
from .config import VPConfig
from .pruner import PruneEvent, VariancePruner, prepare_model
from .squeeze import SqueezedLinear

__version__ = "0.1.0"
__all__ = ["VPConfig", "VariancePruner", "PruneEvent", "prepare_model", "SqueezedLinear", "Family", "PROJECTION_TYPES"]
from . import export  # noqa: E402,F401  registers model_type "vp_bert" with the transformers Auto classes
