"""The squeezed structure of a BERT: read it off a model, rebuild it in a fresh model, undo it.

Names are relative to the base `BertModel` (`encoder.layer.0.intermediate.dense`), so one
structure serves every head (`BertForPreTraining`, `...ForSequenceClassification`, ...).

Three shapes a prunable layer can have (SPEC 5):
- full `nn.Linear`: nothing pruned;
- `SqueezedLinear`: `k` kept rows stored densely, full-width bias, `kept_rows` positions;
- folded FFN: FFN-in is an `nn.Linear` with `k` outputs (its pruned rows were constants folded
  into FFN-out's bias), FFN-out an `nn.Linear` or `SqueezedLinear` with `k` input columns.
  Which intermediate positions survived does not change the function; when known they ride along
  as a `kept_rows` buffer on FFN-in, otherwise positions `0..k-1` are used.
A shrunk attention block (`SqueezedBertAttention`, see `vp_dist.squeeze.attention`) replaces the
whole `attention` module; its layout is a pure function of the query, key, value and attn_out
masks, which the structure records (as hex strings) in place of row counts.
"""
from __future__ import annotations

import dataclasses
import logging

import torch
import torch.nn as nn

from .. import adapters
from ..squeeze import inner_padding
from ..squeeze.attention import SqueezedBertAttention
from ..squeeze.layers import SqueezedLinear
from .compact import (ATTENTION_KINDS, FFN_IN, FFN_OUT, SqueezedStructure, apply_structure, hex_to_mask,  # noqa: F401
                      mask_to_hex, partner)

logger = logging.getLogger(__name__)

_BERT = next(f for f in adapters.FAMILIES if f.name == "bert")
# The squeezed model's own model_type maps onto the same projections as BERT.
VP_BERT_FAMILY = dataclasses.replace(_BERT, name="vp_bert", model_types=("vp_bert",))
if (FFN_IN, FFN_OUT) != (_BERT.ffn_fold[0], _BERT.ffn_fold[2]):
    raise ImportError("vp_dist.export.compact's FFN names differ from the bert family's ffn_fold")


def _shrunk_blocks(base: nn.Module) -> dict[str, SqueezedBertAttention]:
    return {name: module for name, module in base.named_modules() if isinstance(module, SqueezedBertAttention)}


def _inside(name: str, blocks) -> str | None:
    return next((block for block in blocks if name.startswith(block + ".")), None)


def base_model_and_prefix(model: nn.Module) -> tuple[nn.Module, str]:
    """The base `BertModel` inside `model` and its name prefix ("bert." or "")."""
    model = getattr(model, "module", model) if not hasattr(model, "config") else model
    base = getattr(model, "base_model", model)
    if base is model:
        return model, ""
    return base, f"{model.base_model_prefix}."


def full_shape(config, projection_type: str) -> tuple[int, int]:
    """(d_out, d_in) of an unpruned BERT projection."""
    if projection_type == "ffn_in":
        return config.intermediate_size, config.hidden_size
    if projection_type == "ffn_out":
        return config.hidden_size, config.intermediate_size
    return config.hidden_size, config.hidden_size


def _layers(base: nn.Module) -> list[adapters.PrunableLayer]:
    return adapters.prunable_layers(base, (VP_BERT_FAMILY,))


def read_structure(model: nn.Module) -> SqueezedStructure:
    """The squeezed structure of a (possibly) squeezed BERT; empty for a full-size model."""
    base, _ = base_model_and_prefix(model)
    kept, folded = {}, []
    blocks = _shrunk_blocks(base)
    attention = {name: {**{kind: mask_to_hex(m.mask) for kind, m in zip(ATTENTION_KINDS, (
        block.self.query, block.self.key, block.self.value, block.output.dense))}, "widths": block.widths_record()}
        for name, block in blocks.items()}
    for layer in _layers(base):
        if _inside(layer.name, blocks):
            continue
        module = layer.module
        d_out, d_in = full_shape(base.config, layer.projection_type)
        if isinstance(module, SqueezedLinear):
            kept[layer.name] = int(module.weight.shape[0])
        elif layer.projection_type == "ffn_in" and (module.weight.shape[0] != d_out or inner_padding(module)):
            kept[layer.name] = int(module.weight.shape[0]) - inner_padding(module)  # zero units not counted
            folded.append(layer.name)
        elif tuple(module.weight.shape) != (d_out, d_in) and layer.projection_type != "ffn_out":
            raise ValueError(f"{layer.name}: weight {tuple(module.weight.shape)} is neither the full "
                             f"{(d_out, d_in)} nor a squeezed layer")
    return SqueezedStructure(kept, tuple(folded), attention)


def without_zero_units(weight: torch.Tensor, bias: torch.Tensor | None, pad: int, ffn_in: bool):
    """(weight, bias) of a folded FFN layer without its `pad` zero units (`squeeze_model`'s
    `pad_ffn`): FFN-in's last rows and bias entries, FFN-out's last input columns."""
    if not pad:
        return weight, bias
    return (weight[:-pad], bias[:-pad]) if ffn_in else (weight[:, :-pad], bias)


def _positions(module: nn.Module, name: str, masks: dict[str, torch.Tensor] | None) -> torch.Tensor:
    """Kept row positions of a squeezed layer: its buffer, else the given masks, else 0..k-1."""
    positions = getattr(module, "kept_rows", None)
    if positions is not None:
        return positions.cpu()
    if masks is not None and name in masks:
        return torch.nonzero(masks[name].cpu(), as_tuple=False).flatten()
    logger.info("%s: kept positions unknown (folded FFN without masks); using 0..k-1, same function", name)
    return torch.arange(module.weight.shape[0] - inner_padding(module))


@torch.no_grad()
def expanded_layers(model: nn.Module, masks: dict[str, torch.Tensor] | None = None,
                    ) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Full-size (weight, bias, kept mask) of every prunable layer, computing the same function.

    masks: base-relative layer name -> bool kept: the kept mask of a full-size layer, and the
    positions a squeezed model does not carry itself. A full-size layer without a mask counts its
    all-zero rows as pruned (a trained row is never exactly zero).
    Squeezed rows come back as zero rows holding their bias. A folded FFN comes back with its
    pruned FFN-in rows all zero (weight and bias) and FFN-out's matching input columns zero,
    FFN-out's bias keeping the folded constant: FFN-out then sees nothing from those rows
    whatever act(0) is, so the result is exact.
    Tensors are on the CPU in the model's dtype.
    """
    base, _ = base_model_and_prefix(model)
    structure = read_structure(base)
    out = {}
    columns: dict[str, torch.Tensor] = {}
    blocks = _shrunk_blocks(base)
    expanded_blocks = {name: block.expanded() for name, block in blocks.items()}
    for layer in _layers(base):
        module, name = layer.module, layer.name
        block = _inside(name, blocks)
        if block is not None:
            out[name] = expanded_blocks[block][layer.projection_type]
            continue
        d_out, d_in = full_shape(base.config, layer.projection_type)
        weight, bias = without_zero_units(module.weight.detach().cpu(), module.bias.detach().cpu(),
                                          inner_padding(module), name in structure.folded_ffn)
        if name in structure.folded_ffn:
            rows = _positions(module, name, masks)
            columns[partner(name)] = rows
            full_bias = torch.zeros(d_out, dtype=bias.dtype)
            full_bias[rows] = bias
        else:
            rows = module.kept_rows.cpu() if isinstance(module, SqueezedLinear) else torch.arange(d_out)
            full_bias = bias.clone()
        cols = columns.get(name, torch.arange(d_in))
        full_weight = torch.zeros(d_out, d_in, dtype=weight.dtype)
        full_weight[rows.unsqueeze(1), cols.unsqueeze(0)] = weight
        if rows.numel() == d_out:  # full-size layer: masked in place, or not at all
            kept = masks[name].cpu().bool() if masks is not None and name in masks else full_weight.any(1)
        else:
            kept = torch.zeros(d_out, dtype=torch.bool)
            kept[rows] = True
        out[name] = (full_weight, full_bias, kept)
    return out
