"""NVIDIA apex kernels where apex is importable (the Docker image has it), PyTorch otherwise.

apex is not on PyPI (the PyPI project named `apex` is unrelated and never a dependency), so it is
only ever used when the environment already provides it.
"""
from __future__ import annotations

import logging

import torch
import torch.nn as nn

from ..squeeze.layers import replace_module

logger = logging.getLogger(__name__)


def apex_fused_layer_norm():
    """apex's FusedLayerNorm class, or None when apex (or its CUDA extension) is not there."""
    try:
        from apex.normalization import FusedLayerNorm
    except Exception:  # ImportError, or apex built without its CUDA extensions
        return None
    return FusedLayerNorm


def fuse_layer_norms(model: nn.Module, mode: str = "auto", layer_norm_class=None) -> int:
    """Replace every nn.LayerNorm by a fused one (same parameters); returns how many were replaced.

    mode: "auto" (fuse when apex is importable and CUDA is available), "on" (fuse or fail),
    "off". `layer_norm_class` overrides the fused class (apex's by default).
    """
    if mode not in ("auto", "on", "off"):
        raise ValueError(f"model.fused_layernorm={mode!r} must be 'auto', 'on' or 'off'")
    if mode == "off":
        return 0
    fused = layer_norm_class or apex_fused_layer_norm()
    usable = fused is not None and (layer_norm_class is not None or torch.cuda.is_available())
    if not usable:
        if mode == "on":
            raise RuntimeError("model.fused_layernorm=on needs NVIDIA apex with its CUDA extensions and a GPU "
                               "(use the Docker image, or set model.fused_layernorm=auto)")
        logger.info("apex FusedLayerNorm not available: using torch.nn.LayerNorm")
        return 0
    replaced = 0
    for name, module in list(model.named_modules()):
        if type(module) is not nn.LayerNorm:
            continue
        new = fused(module.normalized_shape, eps=module.eps, elementwise_affine=module.elementwise_affine)
        if module.elementwise_affine:
            new.load_state_dict(module.state_dict())
        replace_module(model, name, new)
        replaced += 1
    logger.info("replaced %d LayerNorms by %s", replaced, fused.__name__)
    return replaced
