"""The compact checkpoint's structure, applied to a freshly built BERT (what loading needs).

Self-contained: imports torch and the squeezed layer modules only, so that a compact export can
bundle it with `modeling.py` and `config.py` (see `vp_dist.export.SELF_CONTAINED_MODULES`).
Reading a structure off a model and expanding it back live in `structure.py`.
"""
from __future__ import annotations

import dataclasses

import torch
import torch.nn as nn

from ..squeeze.attention import SqueezedBertAttention
from ..squeeze.layers import PaddedLinear, SqueezedLinear, fuse_residual_expand, replace_module

FFN_IN, FFN_OUT = "intermediate.dense", "output.dense"  # BERT's ffn_fold (checked in structure.py)
ATTENTION_KINDS = ("query", "key", "value", "attn_out")


def partner(ffn_in_name: str) -> str:
    """FFN-out's name for an FFN-in name of the same block."""
    return ffn_in_name[: -len(FFN_IN)] + FFN_OUT


@dataclasses.dataclass(frozen=True)
class SqueezedStructure:
    """kept_rows: layer name -> rows kept (squeezed layers only); folded_ffn: folded FFN-in names;
    attention: shrunk attention block name -> {"query"|"key"|"value"|"attn_out": hex kept mask,
    "widths": [score, value] padded head widths, or [[score, value, [heads]], ...] where the heads
    are grouped (`attention_layout`'s "grouped")} (no "widths", as exports written before the two
    widths were split: one width, the layout of `attention_layout(..., widths="equal")`)."""

    kept_rows: dict[str, int]
    folded_ffn: tuple[str, ...] = ()
    attention: dict[str, dict] = dataclasses.field(default_factory=dict)

    @classmethod
    def from_config(cls, config) -> "SqueezedStructure":
        return cls(dict(getattr(config, "vp_kept_rows", None) or {}),
                   tuple(getattr(config, "vp_folded_ffn", None) or ()),
                   dict(getattr(config, "vp_attention", None) or {}))


ATTENTION_KINDS = ("query", "key", "value", "attn_out")


def mask_to_hex(kept: torch.Tensor) -> str:
    """A bool mask as a hex string, 4 rows per digit, row 0 the highest bit of the first digit."""
    bits = kept.cpu().bool().tolist()
    bits += [False] * (-len(bits) % 4)
    return "".join("%x" % (8 * a + 4 * b + 2 * c + d) for a, b, c, d in zip(*[iter(bits)] * 4))


def hex_to_mask(text: str, rows: int) -> torch.Tensor:
    bits = [bool(int(digit, 16) >> shift & 1) for digit in text for shift in (3, 2, 1, 0)]
    if len(bits) < rows or any(bits[rows:]):
        raise ValueError(f"mask {text[:16]}... does not describe {rows} rows")
    return torch.tensor(bits[:rows], dtype=torch.bool, device="cpu")


@torch.no_grad()
def apply_structure(base: nn.Module, structure: SqueezedStructure) -> None:
    """Give a freshly built full-size `BertModel` the squeezed shapes of `structure`, in place.

    New tensors are slices of the existing (initialised, or meta) ones, so the result is a valid
    model even before a state dict is loaded; `from_pretrained` then fills every tensor.
    """
    names = [*structure.kept_rows, *(partner(n) for n in structure.folded_ffn)]
    try:
        layers = {name: base.get_submodule(name) for name in names}
    except AttributeError as error:
        raise ValueError(f"squeezed structure names layers this model lacks: {error}") from None
    for name, hex_masks in structure.attention.items():
        block = base.get_submodule(name)
        rows = base.config.hidden_size
        masks = {kind: hex_to_mask(hex_masks[kind], rows) for kind in ATTENTION_KINDS}
        modules = (block.self.query, block.self.key, block.self.value, block.output.dense)
        tensors = {f"{kind}.{t}": getattr(m, t) for kind, m in zip(ATTENTION_KINDS, modules) for t in ("weight", "bias")}
        widths = hex_masks.get("widths", "equal")  # [E, Ev] or [[E, Ev, [heads]], ...]: attention_layout reads both
        replace_module(base, name, SqueezedBertAttention(block.self.config, masks, tensors, block.output.LayerNorm,
                                                         block.output.dropout, block.self.dropout.p, widths))
        for layer_name in list(layers):
            if layer_name.startswith(name + "."):
                del layers[layer_name]
    folded_out = {partner(name): structure.kept_rows[name] for name in structure.folded_ffn}
    for name, old in layers.items():
        weight, bias = old.weight, old.bias
        if name in structure.folded_ffn:
            k = structure.kept_rows[name]
            new = PaddedLinear(weight.shape[1], k, device=weight.device, dtype=weight.dtype)
            new.weight.copy_(weight[:k]), new.bias.copy_(bias[:k])
            new.register_buffer("kept_rows", torch.arange(k, device=weight.device))
            replace_module(base, name, new)
            continue
        if name in folded_out:
            weight = weight[:, : folded_out[name]]
        if name in structure.kept_rows:
            k = structure.kept_rows[name]
            new = SqueezedLinear(weight[:k].clone(), bias.clone(), torch.arange(k, device=weight.device))
        elif name in folded_out:
            new = PaddedLinear(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
            new.weight.copy_(weight), new.bias.copy_(bias)
        else:
            continue
        replace_module(base, name, new)
    for name in structure.folded_ffn:  # FFN-out's expand fused with the residual add (BertOutput)
        fuse_residual_expand(base, partner(name).rpartition(".")[0])


