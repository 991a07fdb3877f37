"""`VPConfig.pad_ffn` / `squeeze_model(..., pad_ffn=N)`: each folded FFN's inner width padded with
zero units to a multiple of N, stored in the parameters (no copy per forward).

Exact in training as well as in eval: the padded squeezed model computes the masked model's
logits and every kept parameter's gradient, the zero units' gradients are exactly zero, and
AdamW (weight decay included) trains the padded and the unpadded squeezed model along the same
trajectory with the zero units still zero. Exports strip the units: the compact export equals the
unpadded squeeze's. The engine rebuild, ZeRO 1-3 and resuming are in
tests/distributed/test_repartition.py and test_resume.py (variant `squeeze_padded`).
"""
import copy

import pytest
import torch
import torch.nn as nn

from helpers import loss_of
from models import random_batch
from test_squeeze_attention import _run, masked_model
from vp_dist import VPConfig
from vp_dist.adapters import fold_sites
from vp_dist.distributed.rebuild import origin_slice
from vp_dist.export import masked_model as export_masked_model
from vp_dist.export import read_structure, squeezed_model
from vp_dist.squeeze import ffn_inner_padding, inner_padding, squeeze_model

pytestmark = pytest.mark.usefixtures("one_thread")
FFN_IN, FFN_OUT = "bert.encoder.layer.{}.intermediate.dense", "bert.encoder.layer.{}.output.dense"


def padded_and_plain(case: str, **overrides):
    """(masked model, its masks, squeezed with pad_ffn=8 and its origins, squeezed unpadded)."""
    model, masks = masked_model(case, **overrides)
    padded, plain = copy.deepcopy(model), copy.deepcopy(model)
    origins = squeeze_model(padded, masks, fold_sites(padded), pad_ffn=8)
    squeeze_model(plain, masks, fold_sites(plain))
    return model, masks, padded, origins, plain


def zero_units(model, tensors: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """name -> the zero units of the padded parameters (FFN-in's last rows and bias entries,
    FFN-out's last columns), read from `tensors` (default: the parameters themselves)."""
    tensors = dict(model.named_parameters()) if tensors is None else tensors
    out = {}
    for name, module in model.named_modules():
        pad = inner_padding(module)
        if pad and name.endswith("intermediate.dense"):
            out[f"{name}.weight"] = tensors[f"{name}.weight"][-pad:]
            out[f"{name}.bias"] = tensors[f"{name}.bias"][-pad:]
        elif pad:
            out[f"{name}.weight"] = tensors[f"{name}.weight"][:, -pad:]
    return out


def test_inner_widths_are_padded_to_the_multiple_and_the_masks_keep_their_counts():
    _, masks, padded, origins, plain = padded_and_plain("all_rules_mixed")
    for layer in range(2):
        kept = int(masks[FFN_IN.format(layer)].sum())
        assert kept % 8 != 0, "the case must leave an unaligned FFN width"
        ffn_in, ffn_out = padded.get_submodule(FFN_IN.format(layer)), padded.get_submodule(FFN_OUT.format(layer))
        width = -(-kept // 8) * 8
        assert ffn_in.weight.shape[0] == ffn_in.bias.shape[0] == ffn_out.weight.shape[1] == width
        assert inner_padding(ffn_in) == inner_padding(ffn_out) == width - kept
        assert plain.get_submodule(FFN_IN.format(layer)).weight.shape[0] == kept
        assert origins[FFN_IN.format(layer) + ".weight"].pad_rows == width - kept
        assert origins[FFN_OUT.format(layer) + ".weight"].pad_cols == width - kept
    assert all(bool((unit == 0).all()) for unit in zero_units(padded).values())
    assert len(zero_units(padded)) == 6  # two FFN-in weights and biases, two FFN-out weights


@pytest.mark.parametrize("mode", ["train_no_dropout", "train_seeded_dropout", "eval"])
@pytest.mark.parametrize("case", ["all_rules_mixed", "layer_loses_every_row"])
def test_padded_ffn_matches_the_masked_model_and_its_zero_units_get_zero_gradients(case, mode):
    dropout = 0.1 if mode == "train_seeded_dropout" else 0.0
    model, _, padded, origins, _ = padded_and_plain(case, hidden_dropout_prob=dropout,
                                                    attention_probs_dropout_prob=dropout)
    losses = [_run(m, random_batch(seed=3), mode, 7) for m in (model, padded)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    old = dict(model.named_parameters())
    for name, param in padded.named_parameters():
        origin = origins.get(name)
        reference = old[origin.name if origin else name].grad
        if origin is not None:
            reference = origin_slice(reference, origin)  # the zero units' rows/columns: zeros
        torch.testing.assert_close(param.grad, reference, rtol=1e-4, atol=1e-6, msg=name)
    grads = {name: param.grad for name, param in padded.named_parameters()}
    units = zero_units(padded, grads)
    assert len(units) == 6 and all(bool((grad == 0).all()) for grad in units.values())  # exactly zero


def test_adamw_trains_padded_and_unpadded_alike_and_the_zero_units_stay_zero():
    _, _, padded, _, plain = padded_and_plain("all_rules_mixed", hidden_dropout_prob=0.1,
                                              attention_probs_dropout_prob=0.1)
    optimizers = [torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1) for m in (padded, plain)]
    for step in range(4):
        for m, optimizer in zip((padded, plain), optimizers):
            m.train()
            torch.manual_seed(step)  # the same dropout draws in both (the hidden widths are the same)
            loss_of(m, random_batch(seed=10 + step)).backward()
            optimizer.step()
            optimizer.zero_grad()
    assert all(bool((unit == 0).all()) for unit in zero_units(padded).values())
    ours = dict(padded.named_parameters())
    for name, param in plain.named_parameters():
        torch.testing.assert_close(ours[name][tuple(slice(0, n) for n in param.shape)], param,
                                   rtol=1e-4, atol=1e-5, msg=name)


def test_exports_strip_the_zero_units():
    _, _, padded, _, plain = padded_and_plain("all_rules_mixed")
    exported = squeezed_model(padded)
    reference = squeezed_model(plain)
    assert read_structure(padded) == read_structure(plain) == read_structure(exported)
    theirs = reference.state_dict()
    for name, tensor in exported.state_dict().items():
        torch.testing.assert_close(tensor, theirs[name], rtol=0, atol=0, msg=name)
    full, _ = export_masked_model(padded)
    batch = random_batch(seed=5)
    with torch.no_grad():
        logits = padded.eval()(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        for other in (exported, full):
            torch.testing.assert_close(other.eval()(input_ids=batch["input_ids"],
                                                    attention_mask=batch["attention_mask"]).logits, logits,
                                       rtol=1e-5, atol=1e-5)


def test_no_zero_units_where_the_activation_of_zero_is_not_zero():
    like = torch.zeros(1)
    assert ffn_inner_padding(42, 8, nn.GELU(), like) == 6
    assert ffn_inner_padding(42, 8, nn.Sigmoid(), like) == 0  # sigmoid(0) = 0.5 would feed FFN-out
    assert ffn_inner_padding(40, 8, nn.GELU(), like) == 0
    assert ffn_inner_padding(0, 8, nn.GELU(), like) == 0      # a layer that lost every FFN row
    assert ffn_inner_padding(42, 1, nn.GELU(), like) == 0


def test_pad_ffn_is_validated():
    with pytest.raises(ValueError, match="pad_ffn=0 must be >= 1"):
        VPConfig(pad_ffn=0)
    assert VPConfig.from_dict({"pad_ffn": "8"}).pad_ffn == 8


def test_a_plain_pruner_squeezes_with_its_pad_ffn():
    from vp_dist import VariancePruner
    model, masks = masked_model("all_rules_mixed")
    pruner = VariancePruner(model, VPConfig(start=1, interval=1, increment=0.5, target=0.5, pad_ffn=8))
    pruner.kept = torch.cat([masks[layer.name] for layer in pruner.layers])
    squeezed = pruner.squeeze()
    assert inner_padding(squeezed.get_submodule(FFN_IN.format(0))) > 0


@pytest.mark.parametrize("mode", ["train_no_dropout", "eval"])
def test_an_ffn_out_that_lost_every_row_keeps_its_empty_weight_a_buffer(mode):
    """FFN-in keeps an unaligned width, FFN-out loses every row: its [0, k] weight, held as a buffer
    (ZeRO-3 cannot partition a zero-size parameter), is padded as a buffer."""
    model, masks = masked_model("all_rules_mixed")
    name = FFN_OUT.format(0)
    masks[name] = torch.zeros_like(masks[name])
    with torch.no_grad():
        model.get_submodule(name).weight.zero_()
    padded = copy.deepcopy(model)
    origins = squeeze_model(padded, masks, fold_sites(padded), pad_ffn=8)
    ffn_out = padded.get_submodule(name)
    assert inner_padding(ffn_out) > 0 and "weight" in ffn_out._buffers and ffn_out.weight.shape[0] == 0
    assert all(param.numel() > 0 for param in padded.parameters())
    losses = [_run(m, random_batch(seed=3), mode, 7) for m in (model, padded)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    assert origins[FFN_IN.format(0) + ".weight"].pad_rows == inner_padding(ffn_out)
