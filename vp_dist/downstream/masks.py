"""Pruned rows held fixed while a masked model is fine-tuned.

Masks are the pre-training run's `masks.safetensors` (full module name -> bool kept rows), which
both exports also write. Names may come from another head of the same encoder
(`BertForPreTraining` masks on a `BertForSequenceClassification`): they are matched by the
layer's name inside the base model.
"""
from __future__ import annotations

import logging
from pathlib import Path

import torch

from vp_dist import adapters
from vp_dist.masking import GradientMask

logger = logging.getLogger(__name__)

MASKS_FILE = "masks.safetensors"  # same name as vp_dist.export.MASKS_FILE and the run's artifact


class MaskedRows:
    """The kept-row masks of a full-size model's prunable layers, enforced by gradient masks.

    A gradient mask zeroes the pruned rows' weight gradient before any optimizer (or ZeRO's
    partitioned fp32 master) sees it; Adam moments of those rows then stay zero and the rows stay
    exactly zero. Build it before the optimizer or the DeepSpeed engine.
    """

    def __init__(self, model: torch.nn.Module, masks: dict[str, torch.Tensor]):
        layers = {layer.name: layer.module for layer in adapters.prunable_layers(model)}
        prefix = _prefix(model)
        self.masks: dict[str, torch.Tensor] = {}
        for name, kept in masks.items():
            target = _match(name, layers, prefix)
            weight = layers[target].weight
            if kept.shape != (weight.shape[0],):
                raise ValueError(f"mask {name!r} has shape {tuple(kept.shape)}, layer {target} has "
                                 f"{weight.shape[0]} rows: masks of another model?")
            moved = int(weight.detach()[~kept.to(weight.device)].abs().sum(1).gt(0).sum())
            if moved:
                raise ValueError(f"{target}: {moved} rows pruned by the masks are not zero in the model; "
                                 "pass the masks of the masked export these weights come from")
            self.masks[target] = kept.bool().cpu()
        self._grad_masks = []
        for name, kept in self.masks.items():
            if not bool(kept.all()):
                grad_mask = GradientMask(layers[name].weight)
                grad_mask.update(kept)
                self._grad_masks.append(grad_mask)

    @classmethod
    def for_model(cls, model, masks_path: str | None, model_path: str | None) -> "MaskedRows | None":
        """Masks from `masks_path`, else `<model_path>/masks.safetensors` if there; None for a
        squeezed model (it has no pruned rows) or when there are no masks."""
        from safetensors.torch import load_file

        if getattr(model.config, "model_type", None) == "vp_bert":
            if masks_path:
                logger.warning("--masks ignored: a squeezed model has no pruned rows to hold")
            return None
        path = Path(masks_path) if masks_path else (Path(model_path) / MASKS_FILE if model_path else None)
        if path is None or not path.is_file():
            if masks_path:
                raise FileNotFoundError(f"masks file {masks_path!r} does not exist")
            return None
        logger.info("holding pruned rows fixed with masks from %s", path)
        return cls(model, load_file(str(path)))

    @property
    def pruned_rows(self) -> int:
        return sum(int((~kept).sum()) for kept in self.masks.values())

    @property
    def total_rows(self) -> int:
        return sum(kept.numel() for kept in self.masks.values())

    @torch.no_grad()
    def pruned_rows_are_zero(self, model: torch.nn.Module) -> bool:
        """Whether every pruned row's weight is exactly zero (gathers ZeRO-3 parameters)."""
        from vp_dist.export.exporters import gathered
        with gathered(model):
            return all(bool(model.get_submodule(name).weight[~kept.to(model.get_submodule(name).weight.device)]
                            .eq(0).all()) for name, kept in self.masks.items())

    def save(self, directory: Path) -> None:
        from safetensors.torch import save_file
        save_file({k: v.contiguous() for k, v in self.masks.items()}, str(Path(directory) / MASKS_FILE))

    def remove(self) -> None:
        for grad_mask in self._grad_masks:
            grad_mask.remove()
        self._grad_masks = []


def _prefix(model: torch.nn.Module) -> str:
    base = getattr(model, "base_model", model)
    return "" if base is model else f"{model.base_model_prefix}."


def _match(name: str, layers: dict, prefix: str) -> str:
    """The model's layer for a mask name saved from the same encoder under any head."""
    without_head = name.split(".", 1)[1] if "." in name else name  # "bert.encoder..." -> "encoder..."
    for candidate in (name, prefix + name, without_head, prefix + without_head):
        if candidate in layers:
            return candidate
    raise ValueError(f"mask {name!r} matches no prunable layer of the model (e.g. {next(iter(layers))!r})")
