"""vp-dist: distributed Variance Pruning for transformer pre-training on DeepSpeed."""
__version__ = "0.1.0"
