"""The two exports of a pruned BERT (SPEC 6).

- `export_masked`: the full-size model with pruned rows zero (and their means in the biases),
  saved as a stock `transformers` BERT: `BertFor*.from_pretrained(dir)` needs no vp_dist. A
  squeezed model is expanded back to full size first (exactly: see `structure.expanded_layers`).
- `export_squeezed`: the compact checkpoint, squeezed tensors only, model_type "vp_bert":
  `import vp_dist; AutoModelFor*.from_pretrained(dir)`, or without vp_dist
  `AutoModelFor*.from_pretrained(dir, trust_remote_code=True)` (the model code is copied in).

Both write `masks.safetensors` (full module name -> bool kept rows, the pre-training run's format)
next to the weights, and the tokenizer when given one. Under ZeRO-3 and under tensor parallelism
every rank must call them (parameters are gathered; TP shards are consolidated onto rank 0); only
rank 0 writes.
"""
from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import torch
import torch.nn as nn

from ..adapters import fold_sites
from ..squeeze import inner_padding, squeeze_model
from .remote_code import auto_map, bundle_remote_code
from .structure import base_model_and_prefix, expanded_layers, read_structure, without_zero_units

logger = logging.getLogger(__name__)

MASKS_FILE = "masks.safetensors"
# state-dict entries of squeezed layers that a full-size model has no place for
SQUEEZED_ONLY = (".kept_rows", ".mask", ".collapsed_bias", ".collapsed_weight", ".folded_bias", ".folded_weight",
                 ".qkv_rows", ".qkv_base", ".out_cols", ".out_rows", ".t_onehot", ".pv_onehot")


def _model_and_masks(model_or_pruner) -> tuple[nn.Module, dict[str, torch.Tensor] | None, object]:
    """(model, masks keyed by full module name or None, pruner or None) of what was passed."""
    if hasattr(model_or_pruner, "masks") and hasattr(model_or_pruner, "layers"):
        pruner = model_or_pruner
        model = pruner.engine.module if getattr(pruner, "engine", None) is not None else pruner.model
        if getattr(pruner, "tensor_parallel_squeezed", 0):  # vp-dist's own TP layers: gathered whole
            from ..distributed.tp_squeeze import unsharded_squeezed_copy
            model = unsharded_squeezed_copy(pruner)
        elif getattr(pruner, "shards", None) is not None:  # AutoTP shards: DeepSpeed consolidates them
            model = _consolidated_copy(pruner.engine, model)
        return model, pruner.masks(), pruner
    model = model_or_pruner
    if not hasattr(model, "config") and hasattr(model, "module"):  # a DeepSpeed engine
        model = model.module
    return model, None, None


def _consolidated_copy(engine, model: nn.Module) -> nn.Module:
    """Under tensor parallelism: a plain full-size copy of the engine's model, holding the
    consolidated weights on rank 0 (the writer); other ranks get a freshly initialised copy of the
    same shape, which nothing writes. Collective: every rank calls it."""
    from ..distributed.zero import consolidated_tp_state_dict
    state = consolidated_tp_state_dict(engine)
    dtype = next(model.parameters()).dtype
    copy = type(model)(model.config.__class__.from_dict(model.config.to_dict())).to(dtype)
    if state is not None:
        missing, unexpected = copy.load_state_dict(state, strict=False)
        tied = set(getattr(copy, "all_tied_weights_keys", {}) or {})
        if unexpected or set(missing) - tied - {name for name, _ in copy.named_buffers()}:
            raise RuntimeError(f"consolidated TP state does not fit {type(model).__name__}: missing "
                               f"{sorted(set(missing) - tied)[:5]}, unexpected {unexpected[:5]}")
    return copy.eval()


def _relative(masks: dict[str, torch.Tensor] | None, prefix: str) -> dict[str, torch.Tensor] | None:
    if masks is None:
        return None
    return {name.removeprefix(prefix): kept for name, kept in masks.items()}


@contextlib.contextmanager
def gathered(model: nn.Module):
    """Full parameters inside the block, also under ZeRO-3 (a no-op otherwise)."""
    partitioned = [p for p in model.parameters() if hasattr(p, "ds_id")]
    if not partitioned:
        yield
        return
    import deepspeed
    with deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None):
        yield


def _is_writer() -> bool:
    import torch.distributed as dist
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _save_side_files(out_dir: Path, masks: dict[str, torch.Tensor], tokenizer) -> None:
    from safetensors.torch import save_file
    save_file({name: kept.contiguous().cpu() for name, kept in masks.items()}, str(out_dir / MASKS_FILE))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out_dir))


@torch.no_grad()
def masked_model(model_or_pruner) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """A stock full-size `transformers` BERT computing the same function, and its masks.

    Masks are keyed by the returned model's module names (True = kept row).
    """
    import transformers

    model, masks, _ = _model_and_masks(model_or_pruner)
    base, prefix = base_model_and_prefix(model)
    config = base.config
    if getattr(config, "model_type", None) == "vp_bert":
        config = config.to_bert_config()
    elif getattr(config, "model_type", None) != "bert":
        raise ValueError(f"export_masked supports BERT (model_type 'bert' or 'vp_bert'), got "
                         f"{getattr(config, 'model_type', None)!r}")
    class_name = type(model).__name__.removeprefix("VP")
    stock_class = getattr(transformers, class_name, None)
    if stock_class is None or not class_name.startswith("Bert"):
        raise ValueError(f"{type(model).__name__}: no stock transformers BERT class to export to")
    with gathered(model):
        layers = expanded_layers(model, _relative(masks, prefix))
        state = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()
                 if not name.endswith(SQUEEZED_ONLY)}
    full_masks = {}
    for name, (weight, bias, kept) in layers.items():
        state[f"{prefix}{name}.weight"], state[f"{prefix}{name}.bias"] = weight, bias
        full_masks[f"{prefix}{name}"] = kept
    config = config.__class__.from_dict(config.to_dict())
    config.architectures = [class_name]
    return _instantiate(stock_class, config, state, "masked export"), full_masks


def _instantiate(model_class, config, state: dict, what: str) -> nn.Module:
    """`model_class(config)` in the state's dtype, holding exactly `state` (tied weights aside)."""
    exported = model_class(config).to(next(iter(state.values())).dtype)
    missing, unexpected = exported.load_state_dict(state, strict=False)
    tied = set(getattr(exported, "all_tied_weights_keys", {}) or {})
    if unexpected or set(missing) - tied:
        raise RuntimeError(f"{what} does not fit {model_class.__name__}: missing "
                           f"{sorted(set(missing) - tied)[:5]}, unexpected {unexpected[:5]}")
    return exported.eval()


def export_masked(model_or_pruner, out_dir: str | Path, tokenizer=None) -> Path:
    """Save the full-size masked BERT with `save_pretrained`; stock `transformers` loads it.

    model_or_pruner: a VariancePruner (its model and masks), a masked or squeezed BERT (stock
    class or a vp_dist VP class), or a DeepSpeed engine around one.
    """
    out_dir = Path(out_dir)
    exported, masks = masked_model(model_or_pruner)
    if _is_writer():
        out_dir.mkdir(parents=True, exist_ok=True)
        exported.save_pretrained(str(out_dir))
        _save_side_files(out_dir, masks, tokenizer)
        pruned = sum(int((~k).sum()) for k in masks.values())
        logger.info("masked export (%s, %d of %d rows pruned) written to %s", type(exported).__name__,
                    pruned, sum(k.numel() for k in masks.values()), out_dir)
    return out_dir


@torch.no_grad()
def squeezed_model(model_or_pruner) -> nn.Module:
    """The matching `VPBert*` model (model_type "vp_bert") holding the squeezed tensors."""
    from .config import VPBertConfig
    from .modeling import squeezed_class_for

    model, masks, pruner = _model_and_masks(model_or_pruner)
    if pruner is not None and not pruner.squeezed:
        # Squeeze a fresh full-size copy (never the pruner's own model or engine, which train on).
        model, masks = masked_model(pruner)
        folds = fold_sites(model) if pruner.config.fold_ffn else []
        squeeze_model(model, masks, folds)
    base, prefix = base_model_and_prefix(model)
    if getattr(base.config, "model_type", None) not in ("bert", "vp_bert"):
        raise ValueError(f"export_squeezed supports BERT, got model_type {getattr(base.config, 'model_type', None)!r}")
    relative = _relative(masks, prefix)
    with gathered(model):
        structure = read_structure(base)
        if not structure.kept_rows:
            logger.warning("export_squeezed: the model has no squeezed layer (nothing pruned?)")
        state = {name: tensor.detach().cpu().clone() for name, tensor in model.state_dict().items()}
    strip_inner_padding(base, state, prefix, structure.folded_ffn)
    for name in structure.folded_ffn:  # carry the kept positions of folded FFN-in rows when known
        key = f"{prefix}{name}.kept_rows"
        if key not in state:
            if relative is not None and name in relative:
                state[key] = torch.nonzero(relative[name], as_tuple=False).flatten()
            else:
                state[key] = torch.arange(state[f"{prefix}{name}.weight"].shape[0])
    vp_class = squeezed_class_for(model)
    bert_config = base.config.to_bert_config() if base.config.model_type == "vp_bert" else base.config
    config = VPBertConfig.from_bert_config(bert_config, structure.kept_rows, list(structure.folded_ffn),
                                           structure.attention)
    config.architectures = [vp_class.__name__]
    return _instantiate(vp_class, config, state, "squeezed export")


def strip_inner_padding(base: nn.Module, state: dict[str, torch.Tensor], prefix: str, folded_ffn) -> None:
    """Drop the zero units of padded folded FFNs (`squeeze_model`'s `pad_ffn`) from `state`, the
    state dict of the model around `base` (names under `prefix`; `folded_ffn`: the FFN-in names,
    `read_structure`'s): FFN-in's last rows, FFN-out's last columns. The export then holds what an
    unpadded squeeze holds (the same function: the units were zero)."""
    for name, module in base.named_modules():
        pad = inner_padding(module)
        if pad:
            weight, bias = f"{prefix}{name}.weight", f"{prefix}{name}.bias"
            state[weight], state[bias] = (t.clone() for t in without_zero_units(
                state[weight], state[bias], pad, name in folded_ffn))


def _remote_auto_map() -> dict[str, str]:
    from . import REMOTE_CONFIG_MODULE, REMOTE_MODELING_MODULE
    from .config import VPBertConfig
    from .registry import AUTO_CLASSES
    return auto_map(REMOTE_CONFIG_MODULE, REMOTE_MODELING_MODULE,
                    {auto.__name__: name for auto, name in AUTO_CLASSES.items()}, VPBertConfig.__name__)


def export_squeezed(pruner_or_squeezed_model, out_dir: str | Path, tokenizer=None) -> Path:
    """Save the compact checkpoint: squeezed tensors (safetensors) and a `VPBertConfig`.

    Accepts a VariancePruner (squeezed or not: an unsqueezed one is squeezed on a copy), a model
    squeezed by `squeeze_model` / `pruner.squeeze()`, or a loaded VP model. Load it back with
    `import vp_dist.export` and any `AutoModelFor*.from_pretrained(out_dir)`.
    """
    out_dir = Path(out_dir)
    exported = squeezed_model(pruner_or_squeezed_model)
    if _is_writer():
        out_dir.mkdir(parents=True, exist_ok=True)
        exported.config.auto_map = _remote_auto_map()
        exported.save_pretrained(str(out_dir))
        bundle_remote_code(out_dir)  # the model code itself: loads where vp_dist is not installed
        _, prefix = base_model_and_prefix(exported)  # the masks masked_model would give, without its model
        masks = {prefix + name: kept for name, (_, _, kept) in expanded_layers(exported).items()}
        _save_side_files(out_dir, masks, tokenizer)
        logger.info("squeezed export (%s, %d parameters) written to %s", type(exported).__name__,
                    sum(p.numel() for p in exported.parameters()), out_dir)
    return out_dir
