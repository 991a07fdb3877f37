"""Squeezing (SPEC 5): pruned rows leave the matrices, plain dense GEMMs remain.

`SqueezedLinear` keeps the kept rows as a dense `[k, d_in]` weight and the full-width bias; its
output is the bias everywhere with the dense product added at the kept positions, which is the
masked layer's function exactly. Where a pruned output is a constant fed straight into the next
matrix (FFN-in -> activation -> FFN-out), the constant folds into FFN-out's bias and both matrices
shrink with no expand.
"""
from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..adapters import AttentionSite, FoldSite
from .attention import SqueezedBertAttention, attention_layout
from .layers import (PaddedLinear, ResidualExpandOutput, SqueezedLinear, freeze_eval_tensors,
                     fuse_residual_expand, replace_module, unfreeze_eval_tensors)

__all__ = ["ParamOrigin", "PaddedLinear", "ResidualExpandOutput", "SqueezedBertAttention", "SqueezedLinear",
           "attention_layers", "attention_shrinks", "cast_squeezed_buffers", "count_parameters",
           "ffn_inner_padding", "freeze_eval_tensors", "fuse_residual_expand", "fuse_residual_outputs",
           "hold_empty_tensors_as_buffers", "inner_padding", "kept_index", "pad_folded_ffn", "relayout_attention",
           "shrunk_attention", "squeeze_model", "unfreeze_eval_tensors"]


@dataclass(frozen=True)
class ParamOrigin:
    """Where a squeezed parameter came from: `old[rows][:, cols]` (None = all), then `pad_rows`
    zero rows and `pad_cols` zero columns appended (a padded FFN's inner width, see
    `squeeze_model`'s `pad_ffn`), for moving optimizer state row by row into the rebuilt engine."""

    name: str
    rows: torch.Tensor | None = None
    cols: torch.Tensor | None = None
    pad_rows: int = 0
    pad_cols: int = 0


def kept_index(kept: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(kept, as_tuple=False).flatten()


def _linear(weight: torch.Tensor, bias: torch.Tensor, cls: type[nn.Linear] = nn.Linear) -> nn.Linear:
    layer = cls(weight.shape[1], weight.shape[0], device=weight.device, dtype=weight.dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        layer.bias.copy_(bias)
    return layer


def _row_squeezed(weight: torch.Tensor, bias: torch.Tensor, kept: torch.Tensor,
                  cls: type[nn.Linear] = nn.Linear) -> nn.Module:
    if bool(kept.all()):
        return _linear(weight, bias, cls)
    rows = kept_index(kept).to(weight.device)
    return SqueezedLinear(weight[rows].clone(), bias.clone(), rows)


def attention_layers(site: AttentionSite) -> dict[str, str]:
    """"query", "key", "value", "attn_out" -> the layer names of an attention site."""
    return {"query": site.query, "key": site.key, "value": site.value, "attn_out": site.attn_out}


def attention_shrinks(site: AttentionSite, masks: dict[str, torch.Tensor]) -> bool:
    """Whether the block is shrunk whole: its query, key or value lost rows (attn_out alone is
    row-squeezed as any layer)."""
    return not all(bool(masks[name].all()) for name in (site.query, site.key, site.value))


def inner_padding(module: nn.Module) -> int:
    """Zero units appended to a folded FFN's inner width (`squeeze_model`'s `pad_ffn`): FFN-in's
    trailing zero rows, FFN-out's trailing zero input columns; 0 for any other layer."""
    return int(getattr(module, "inner_padding", 0))


def ffn_inner_padding(width: int, pad_ffn: int, activation: nn.Module, like: torch.Tensor) -> int:
    """Zero units that round a folded FFN's inner `width` up to a multiple of `pad_ffn`; 0 where
    `pad_ffn` is 1, the width is 0 or already a multiple, or act(0) != 0 (the units would then feed
    FFN-out a nonzero constant and their zero columns a gradient; GELU, ReLU and SiLU give 0)."""
    pad = -width % pad_ffn if pad_ffn > 1 and width > 0 else 0
    if pad and float(activation(torch.zeros(1, dtype=like.dtype, device=like.device))) != 0.0:
        return 0
    return pad


def _set_tensor(module: nn.Module, name: str, value: torch.Tensor) -> None:
    """Replace `module`'s parameter `name` by `value` (same requires_grad), or its buffer (a zero-size
    weight held as a buffer, `hold_empty_tensors_as_buffers`) by `value` as a buffer."""
    if name in module._parameters:
        module._parameters[name] = nn.Parameter(value, requires_grad=module._parameters[name].requires_grad)
    else:
        module._buffers[name] = value


@torch.no_grad()
def pad_folded_ffn(model: nn.Module, sites: list[FoldSite | AttentionSite], pad_ffn: int) -> int:
    """Pad, in place, the inner width of each FFN pair of `sites` in an already squeezed `model` (a
    loaded compact export, say) with zero units up to a multiple of `pad_ffn`, as `squeeze_model`'s
    `pad_ffn` does when squeezing (exact; see there): FFN-in gets zero rows and zero biases, FFN-out
    zero input columns, both record `inner_padding`. Pairs already padded are left alone. Call it
    before an optimizer or engine is built on the model (the parameters are replaced). Returns the
    zero units added."""
    added = 0
    for site in (site for site in sites if isinstance(site, FoldSite)):  # attention sites: not FFNs
        ffn_in, ffn_out = model.get_submodule(site.ffn_in), model.get_submodule(site.ffn_out)
        if inner_padding(ffn_in):
            continue
        activation = operator.attrgetter(site.activation)(model)
        pad = ffn_inner_padding(ffn_in.weight.shape[0], pad_ffn, activation, ffn_in.weight)
        if not pad:
            continue
        _set_tensor(ffn_in, "weight", F.pad(ffn_in.weight, (0, 0, 0, pad)))
        _set_tensor(ffn_in, "bias", F.pad(ffn_in.bias, (0, pad)))
        _set_tensor(ffn_out, "weight", F.pad(ffn_out.weight, (0, pad)))  # [0, k] where FFN-out lost every row
        ffn_in.out_features, ffn_out.in_features = ffn_in.out_features + pad, ffn_out.in_features + pad
        ffn_in.inner_padding = ffn_out.inner_padding = pad
        added += pad
    return added


@torch.no_grad()
def squeeze_model(model: nn.Module, masks: dict[str, torch.Tensor],
                  folds: list[FoldSite | AttentionSite] = (), pad_ffn: int = 1,
                  head_widths: str | None = None) -> dict[str, ParamOrigin]:
    """Replace every masked layer of `model` in place by its squeezed form.

    masks: module name -> bool kept [d_out]. Layers with no pruned row stay as they are.
    folds: FFN sites to fold (only those whose FFN-in lost rows are folded) and attention blocks
        to shrink exactly (only those whose query, key or value lost rows; see `attention`).
    pad_ffn: round each folded FFN's inner width (its kept FFN rows) up to a multiple of `pad_ffn`
        with zero units: FFN-in gets zero rows and zero biases, FFN-out zero input columns
        (`VPConfig.pad_ffn`; 1: none). Exact, in training too: a zero unit outputs act(0) = 0
        (checked; no padding where it is not), which its zero column ignores, so the output is the
        unpadded one, and both gradients of a zero unit are exactly zero (FFN-out's column: act(0)
        times the output gradient; FFN-in's row: the output gradient through its zero column), so
        SGD, Adam and AdamW's decoupled weight decay leave the zeros zero. GEMMs then run at
        aligned widths with no copy per forward (`layers.gemm_padding` copies the weight in every
        forward where it pads). The modules record it (`inner_padding`); exports strip it.
    head_widths: the shrunk attention blocks' head layout (`VPConfig.head_widths`; None: the
        process-wide `attention.HEAD_WIDTHS`, "split" unless changed).
    Returns new parameter name -> ParamOrigin for every parameter that changed shape or value
    (the rebuild carries Adam moments row by row through them).
    """
    modules = dict(model.named_modules())
    replacements: dict[str, nn.Module] = {}
    origins: dict[str, ParamOrigin] = {}

    def record(name: str, module: nn.Module, rows=None, cols=None, bias_rows=None):
        replacements[name] = module
        origins[f"{name}.weight"] = ParamOrigin(f"{name}.weight", rows, cols)
        origins[f"{name}.bias"] = ParamOrigin(f"{name}.bias", bias_rows)

    for site in folds:
        if isinstance(site, AttentionSite) and attention_shrinks(site, masks):
            tensors = {f"{kind}.{t}": getattr(modules[name], t)
                       for kind, name in attention_layers(site).items() for t in ("weight", "bias")}
            replacements[site.name] = shrunk_attention(modules[site.name], site, masks, tensors, origins, head_widths)
            for name in attention_layers(site).values():
                replacements.setdefault(name, None)  # handled by the block
    folded = {site.ffn_in: site for site in folds
              if isinstance(site, FoldSite) and not bool(masks[site.ffn_in].all())}
    for site in folded.values():
        ffn_in, ffn_out = modules[site.ffn_in], modules[site.ffn_out]
        activation = operator.attrgetter(site.activation)(model)
        kept_in, kept_out = masks[site.ffn_in].to(ffn_in.weight.device), masks[site.ffn_out]
        inner = kept_index(kept_in)
        pruned = kept_index(~kept_in)
        # Pruned FFN-in rows output their (trained) bias; act(bias) enters FFN-out as a constant.
        constant = activation(ffn_in.bias[pruned].unsqueeze(0)).squeeze(0)
        out_bias = ffn_out.bias + ffn_out.weight[:, pruned] @ constant
        out_weight = ffn_out.weight[:, inner]
        # The inner width (kept FFN rows) is padded for the GEMMs where that pays: with zero units in
        # the parameters (`pad_ffn`, below), else in each forward (layers.PaddedLinear).
        record(site.ffn_in, _linear(ffn_in.weight[inner], ffn_in.bias[inner], PaddedLinear), inner, None, inner)
        out_rows = None if bool(kept_out.all()) else kept_index(kept_out)
        record(site.ffn_out, _row_squeezed(out_weight, out_bias, kept_out, PaddedLinear), out_rows, inner)

    for name, kept in masks.items():
        if name in replacements or bool(kept.all()):
            continue
        layer = modules[name]
        record(name, _row_squeezed(layer.weight, layer.bias, kept), kept_index(kept))

    for name, module in replacements.items():
        if module is None:
            continue
        hold_empty_tensors_as_buffers(module)
        module.train(model.get_submodule(name).training)  # a squeezed eval model stays in eval
        replace_module(model, name, module)
    if pad_ffn > 1 and pad_folded_ffn(model, list(folded.values()), pad_ffn):
        for site in folded.values():  # the zero units get zero optimizer state in the engine rebuild
            pad = inner_padding(model.get_submodule(site.ffn_in))
            for name, field in ((f"{site.ffn_in}.weight", "pad_rows"), (f"{site.ffn_in}.bias", "pad_rows"),
                                (f"{site.ffn_out}.weight", "pad_cols")):
                origins[name] = dataclasses.replace(origins[name], **{field: pad})
    fuse_residual_outputs(model, folds)
    return origins


def fuse_residual_outputs(model: nn.Module, folds) -> int:
    """`fuse_residual_expand` on the residual block of every FFN site in `folds` (`FoldSite.residual`)
    whose FFN-out is row-squeezed: its expand then fuses with the residual add where no dropout
    stands between them. The parameters and their names stay. Returns how many blocks it fused."""
    return sum(fuse_residual_expand(model, site.residual) for site in folds
               if isinstance(site, FoldSite) and site.residual is not None)


def shrunk_attention(block: nn.Module, site: AttentionSite, masks: dict[str, torch.Tensor],
                     tensors: dict[str, torch.Tensor], origins: dict[str, ParamOrigin],
                     head_widths: str | None = None) -> SqueezedBertAttention:
    """The exact attention shrink of one block (`site.name`), recording in `origins` where each new
    parameter came from (full names, e.g. `<block>.self.key.collapsed_weight`).

    block: the full BERT attention block: its config and attention dropout are read, its
    LayerNorm and hidden dropout modules are *reused* by the new block (their parameters keep
    their names and are not in `origins`). tensors: "query.weight", "query.bias", ...,
    "attn_out.bias": the block's own (plain model) or full fp32 masters gathered from ZeRO
    partitions (the engine rebuild). Every new parameter is `old[rows][:, cols]` of one of them.
    head_widths: the head layout rule (`attention_layout`'s `widths`; None: `attention.HEAD_WIDTHS`).
    """
    kept = {kind: masks[name].cpu().bool() for kind, name in attention_layers(site).items()}
    new = SqueezedBertAttention(block.self.config, kept, tensors, block.output.LayerNorm, block.output.dropout,
                                block.self.dropout.p, head_widths)
    layout = attention_layout(kept["query"], kept["key"], kept["value"], new.num_heads)
    out_rows = None if bool(kept["attn_out"].all()) else kept_index(kept["attn_out"])
    p = site.name
    for new_name, (old, rows, cols) in {
        "self.query.weight": (site.query + ".weight", layout["S"], None),
        "self.query.bias": (site.query + ".bias", layout["S"], None),
        "self.query.collapsed_bias": (site.query + ".bias", layout["T"], None),
        "self.key.weight": (site.key + ".weight", layout["S"], None),
        "self.key.bias": (site.key + ".bias", layout["S"], None),
        "self.key.collapsed_weight": (site.key + ".weight", layout["T"], None),
        "self.value.weight": (site.value + ".weight", layout["kept_v"], None),
        "self.value.bias": (site.value + ".bias", layout["kept_v"], None),
        "self.value.folded_bias": (site.value + ".bias", layout["pruned_v"], None),
        "output.dense.weight": (site.attn_out + ".weight", out_rows, layout["kept_v"]),
        "output.dense.folded_weight": (site.attn_out + ".weight", out_rows, layout["pruned_v"]),
        "output.dense.bias": (site.attn_out + ".bias", None, None),
    }.items():
        origins[f"{p}.{new_name}"] = ParamOrigin(old, rows, cols)
    return new


@torch.no_grad()
def relayout_attention(model: nn.Module, head_widths: str) -> int:
    """Rebuild every shrunk attention block of `model` whose head layout differs from what
    `head_widths` ("split", "equal", "grouped"; `VPConfig.head_widths`) gives, in place; returns how
    many were rebuilt. For a squeezed model loaded from a compact export, which keeps the layout it
    was exported with (fine-tuning's `head_widths`). Call it before an optimizer holds the
    parameters: the rebuilt blocks have new ones.

    Exact: the parameters are the same under every layout (the kept Q, K, V rows, the collapsed
    and folded constants), so each block is rebuilt from its own `expanded()` full-size tensors
    into the same values; only the padded slots and the head order of the fused weights change.
    The new block reuses the old one's LayerNorm and dropout modules and takes its device, dtype,
    buffer dtypes, requires_grad flags and train/eval mode.
    """
    blocks = [(name, module) for name, module in model.named_modules() if isinstance(module, SqueezedBertAttention)]
    rebuilt = 0
    for name, block in blocks:
        masks = {kind: getattr(block.self, kind).mask for kind in ("query", "key", "value")}
        masks["attn_out"] = block.output.dense.mask
        if attention_layout(masks["query"], masks["key"], masks["value"], block.num_heads,
                            head_widths)["groups"] == block.groups:
            continue
        reference = block.self.query.weight
        tensors = {f"{kind}.{t}": value.to(reference.device) for kind, (weight, bias, _) in block.expanded().items()
                   for t, value in (("weight", weight), ("bias", bias))}
        new = SqueezedBertAttention(block.config, masks, tensors, block.output.LayerNorm, block.output.dropout,
                                    block.self.dropout.p, head_widths)
        old_buffers = dict(block.named_buffers())
        for buffer_name, buffer in list(new.named_buffers()):
            old = old_buffers.get(buffer_name)
            if old is not None:
                owner, _, leaf = buffer_name.rpartition(".")
                target = new.get_submodule(owner) if owner else new
                target._buffers[leaf] = buffer.to(old.device, old.dtype if buffer.is_floating_point() else None)
        old_params = dict(block.named_parameters())
        for param_name, param in new.named_parameters():
            if param_name in old_params:
                param.requires_grad_(old_params[param_name].requires_grad)
        new.train(block.training)
        replace_module(model, name, new)
        rebuilt += 1
    return rebuilt


def hold_empty_tensors_as_buffers(module: nn.Module) -> nn.Module:
    """Turn zero-size parameters (a layer that lost every row) into buffers.

    They hold nothing to train, and DeepSpeed ZeRO-3 can neither partition nor gather a
    zero-size parameter. As persistent buffers they stay in the state dict and in `forward`.
    """
    for name, param in list(module.named_parameters(recurse=False)):
        if param.numel() == 0:
            del module._parameters[name]
            module.register_buffer(name, param.detach(), persistent=True)
    return module


def cast_squeezed_buffers(module: nn.Module, dtype: torch.dtype) -> nn.Module:
    """Give the floating buffers squeezing put in `module` `dtype`: the zero-size ones (a layer that
    lost every row, see `hold_empty_tensors_as_buffers`) and the 0/1 constants of shrunk attention
    blocks (`qkv_base`, `t_onehot`, `pv_onehot`, exact in any dtype).

    DeepSpeed casts a module's parameters to its low precision but not its buffers, and a GEMM
    refuses an fp32 weight beside bf16 input even when the weight is empty: an engine built around
    a squeezed model calls this with its own dtype. The model's own buffers are left as they are.
    """
    for sub in module.modules():
        constants = isinstance(sub, SqueezedBertAttention)
        for name, buffer in sub._buffers.items():
            if (buffer is not None and buffer.is_floating_point() and buffer.dtype != dtype
                    and (buffer.numel() == 0 or constants)):
                sub._buffers[name] = buffer.to(dtype)
    return module


def count_parameters(model: nn.Module) -> int:
    """Parameters of `model`, counted at their full size also while ZeRO-3 holds them partitioned
    (`ds_numel`; `numel()` is then 0 on the rank's empty placeholder)."""
    return sum(getattr(p, "ds_numel", p.numel()) for p in model.parameters())
