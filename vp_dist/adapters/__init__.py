"""Which linear layers are prunable, and of which projection type (SPEC 3).

A family's differences from BERT are data: where a transformer block sits in the module tree, the
names of its six projections inside the block, and (for a non-gated FFN) how to fold FFN-in rows
into FFN-out. Adding a family is one `Family(...)` entry, no subclass.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

import torch.nn as nn

PROJECTION_TYPES = ("query", "key", "value", "attn_out", "ffn_in", "ffn_out")


@dataclass(frozen=True)
class Family:
    """How one model family maps onto projection types.

    block_pattern: regex matched against a module's full name; group `index` is the block number
        and group `suffix` the module's name inside the block.
    projections:  suffix inside the block -> projection type (in block order).
    ffn_fold:     (ffn_in suffix, activation attribute path, ffn_out suffix) where the FFN is
        `ffn_out(act(ffn_in(x)))` with nothing else between, so a pruned FFN-in row folds exactly
        into the FFN-out bias. None for gated FFNs.
    attention:    suffix of the attention block when it has BERT's layout (`self.query/key/value`,
        `output.dense/LayerNorm/dropout`, no rotary embedding), so that the exact attention shrink
        applies (`vp_dist.squeeze.attention`). None elsewhere (Llama's RoPE mixes dims in pairs).
    ffn_residual: suffix of FFN-out's block when it is BERT's `LayerNorm(dropout(ffn_out(x)) +
        residual)` with exactly the children `dense` (FFN-out), `LayerNorm`, `dropout`, so that a
        row-squeezed FFN-out's expand fuses with the residual add
        (`vp_dist.squeeze.layers.ResidualExpandOutput`). None elsewhere.
    """

    name: str
    model_types: tuple[str, ...]
    block_pattern: str
    projections: dict[str, str]
    ffn_fold: tuple[str, str, str] | None = None
    attention: str | None = None
    ffn_residual: str | None = None


_BERT_PROJECTIONS = {
    "attention.self.query": "query",
    "attention.self.key": "key",
    "attention.self.value": "value",
    "attention.output.dense": "attn_out",
    "intermediate.dense": "ffn_in",
    "output.dense": "ffn_out",
}

_LLAMA_PROJECTIONS = {
    "self_attn.q_proj": "query",
    "self_attn.k_proj": "key",
    "self_attn.v_proj": "value",
    "self_attn.o_proj": "attn_out",
    "mlp.gate_proj": "ffn_in",
    "mlp.up_proj": "ffn_in",
    "mlp.down_proj": "ffn_out",
}

FAMILIES: list[Family] = [
    Family(
        name="bert",
        model_types=("bert", "roberta", "xlm-roberta", "camembert", "electra"),
        block_pattern=r"(?:^|\.)encoder\.layer\.(?P<index>\d+)\.(?P<suffix>.+)$",
        projections=_BERT_PROJECTIONS,
        ffn_fold=("intermediate.dense", "intermediate.intermediate_act_fn", "output.dense"),
        attention="attention",
        ffn_residual="output",
    ),
    Family(
        name="llama",
        model_types=("llama", "mistral", "qwen2"),
        block_pattern=r"(?:^|\.)layers\.(?P<index>\d+)\.(?P<suffix>.+)$",
        projections=_LLAMA_PROJECTIONS,
    ),
]


@dataclass(frozen=True)
class PrunableLayer:
    """One prunable linear layer: its full module name, block number and projection type."""

    name: str
    block: int
    projection_type: str
    module: nn.Module


@dataclass(frozen=True)
class FoldSite:
    """An FFN of one block whose pruned FFN-in rows fold into FFN-out (SPEC 5); `residual`: FFN-out's
    residual block (`Family.ffn_residual`), where its expand fuses with the residual add, or None."""

    ffn_in: str
    activation: str
    ffn_out: str
    residual: str | None = None


@dataclass(frozen=True)
class AttentionSite:
    """A BERT-layout attention block whose pruned Q/K/V rows shrink exactly (SPEC 5)."""

    name: str       # the block (`...attention`), replaced whole by `SqueezedBertAttention`
    query: str
    key: str
    value: str
    attn_out: str


def family_for(model: nn.Module, extra: tuple = ()) -> Family:
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for family in (*extra, *FAMILIES):
        if model_type in family.model_types:
            return family
    supported = sorted(t for f in (*extra, *FAMILIES) for t in f.model_types)
    raise ValueError(
        f"no Variance Pruning map for model_type={model_type!r} ({type(model).__name__}); "
        f"supported: {supported}. Pass VPConfig(families=(Family(...),)) to add one.")


def _unwrap(module: nn.Module) -> nn.Module:
    # Hugging Face models keep the config on the outer module; DeepSpeed engines wrap it in .module.
    return getattr(module, "module", module) if not hasattr(module, "config") else module


def prunable_layers(model: nn.Module, extra: tuple = ()) -> list[PrunableLayer]:
    """The model's prunable layers in (block, projection order) order. Refuses unknown models."""
    model = _unwrap(model)
    family = family_for(model, extra)
    pattern = re.compile(family.block_pattern)
    order = {suffix: i for i, suffix in enumerate(family.projections)}
    found = []
    for name, module in model.named_modules():
        match = pattern.search(name)
        if match is None or match.group("suffix") not in family.projections:
            continue
        # ZeRO-3 keeps a partitioned weight's logical shape in `ds_shape`.
        if not hasattr(module, "weight") or len(getattr(module.weight, "ds_shape", module.weight.shape)) != 2:
            raise TypeError(f"{name} is {type(module).__name__}, expected a linear layer")
        suffix = match.group("suffix")
        found.append((int(match.group("index")), order[suffix],
                      PrunableLayer(name, int(match.group("index")), family.projections[suffix], module)))
    if not found:
        raise ValueError(f"{type(model).__name__} (family {family.name!r}) has no module matching "
                         f"{family.block_pattern!r} with a suffix in {list(family.projections)}")
    found.sort(key=lambda item: (item[0], item[1]))
    return [layer for _, _, layer in found]


def fold_sites(model: nn.Module, extra: tuple = ()) -> list[FoldSite | AttentionSite]:
    """Where pruned constants fold into their consumers when squeezing (SPEC 5), one of each kind
    per block: FFN-in/FFN-out pairs (none for gated FFNs) and BERT-layout attention blocks."""
    model = _unwrap(model)
    family = family_for(model, extra)
    by_type = {t: s for s, t in family.projections.items()}
    sites = []
    for layer in prunable_layers(model, extra):
        if family.ffn_fold is not None and layer.name.endswith("." + family.ffn_fold[0]):
            ffn_in, activation, ffn_out = family.ffn_fold
            prefix = layer.name[: -len(ffn_in)]
            residual = prefix + family.ffn_residual if family.ffn_residual is not None else None
            sites.append(FoldSite(layer.name, prefix + activation, prefix + ffn_out, residual))
        if family.attention is not None and layer.projection_type == "query":
            prefix = layer.name[: -len(by_type["query"])]
            sites.append(AttentionSite(prefix + family.attention, *(prefix + by_type[t]
                                       for t in ("query", "key", "value", "attn_out"))))
    return sites
