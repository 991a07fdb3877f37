"""GEMM width padding (`vp_dist.squeeze.layers.GEMM_PAD_MULTIPLE`) and frozen eval tensors.

Padding is on for CUDA only (where unaligned bf16 widths fall back to slow kernels); these tests
switch it on for the CPU, so the exactness they check is the one a GPU run relies on: the padded
squeezed model computes the masked model's logits and the gradients of every kept parameter, in
train and eval mode, through the eval cache, frozen, and in the compact export.
"""
import copy

import pytest
import torch
import torch.nn as nn

from helpers import loss_of
from models import random_batch
from test_squeeze_attention import CASES, _assert_same, masked_model
from vp_dist.adapters import fold_sites
from vp_dist.squeeze import PaddedLinear, SqueezedLinear, freeze_eval_tensors, squeeze_model, unfreeze_eval_tensors
from vp_dist.squeeze import layers as squeeze_layers
from vp_dist.squeeze.attention import SqueezedBertAttention

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def pad_on_cpu(monkeypatch):
    """Padding on the CPU, in every forward (training too: `GEMM_PAD_UNCACHED`)."""
    monkeypatch.setattr(squeeze_layers, "GEMM_PAD_DEVICES", {"cpu"})
    monkeypatch.setattr(squeeze_layers, "GEMM_PAD_UNCACHED", {"cpu"})


def _gemm_widths(model, batch) -> dict[str, tuple[int, int]]:
    """name -> (input width, output width) of every squeezed linear's forward."""
    seen, handles = {}, []
    for name, module in model.named_modules():
        if isinstance(module, (PaddedLinear, SqueezedLinear)):
            handles.append(module.register_forward_hook(
                lambda m, args, out, name=name: seen.__setitem__(name, (args[0].shape[-1], out.shape[-1]))))
    try:
        with torch.no_grad():
            loss_of(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return seen


@pytest.mark.parametrize("mode", ["train_no_dropout", "train_seeded_dropout", "eval"])
@pytest.mark.parametrize("case", list(CASES))
def test_padded_squeezed_model_matches_the_masked_model(pad_on_cpu, case, mode):
    dropout = 0.1 if mode == "train_seeded_dropout" else 0.0
    model, masks = masked_model(case, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    small = copy.deepcopy(model)
    origins = squeeze_model(small, masks, fold_sites(small))
    _assert_same(model, small, origins, random_batch(seed=3), mode)


def test_the_folded_ffn_runs_at_a_padded_inner_width_and_parameters_keep_their_shapes(monkeypatch):
    monkeypatch.setattr(squeeze_layers, "GEMM_PAD_DEVICES", {"cpu"})
    monkeypatch.setattr(squeeze_layers, "GEMM_PAD_UNCACHED", set())  # as on a GPU
    model, masks = masked_model("all_rules_mixed")
    small = copy.deepcopy(model)
    squeeze_model(small, masks, fold_sites(small))
    ffn_in, ffn = "bert.encoder.layer.0.intermediate.dense", "bert.encoder.layer.0.output.dense"
    kept = int(masks[ffn_in].sum())
    assert kept % 8 != 0, "the case must leave an unaligned FFN width"
    assert isinstance(small.get_submodule(ffn_in), PaddedLinear)
    assert small.get_submodule(ffn_in).weight.shape[0] == kept  # exact parameter shapes
    padded = -(-kept // 8) * 8
    # eval: the padded weights are built once (cached), the GEMMs run at the padded width
    widths = _gemm_widths(small.eval(), random_batch(seed=1))
    assert widths[ffn_in] == (32, padded) and widths[ffn][0] == padded
    # training rebuilds them in every forward: unpadded by default, padded with GEMM_PAD_UNCACHED
    assert _gemm_widths(small.train(), random_batch(seed=1))[ffn_in] == (32, kept)
    monkeypatch.setattr(squeeze_layers, "GEMM_PAD_UNCACHED", {"cpu"})
    assert _gemm_widths(small, random_batch(seed=1))[ffn_in] == (32, padded)
    # padding off (not a padded device): nn.Linear's widths in eval too
    monkeypatch.setattr(squeeze_layers, "GEMM_PAD_DEVICES", set())
    assert _gemm_widths(small.eval(), random_batch(seed=2))[ffn_in] == (32, kept)


def test_attn_out_rows_are_padded_in_the_shrunk_attention(monkeypatch):
    monkeypatch.setattr(squeeze_layers, "GEMM_PAD_DEVICES", {"cpu"})
    monkeypatch.setattr(squeeze_layers, "GEMM_PAD_UNCACHED", set())
    model, masks = masked_model("value_dims_pruned")  # attn_out "okkk": 28 kept rows
    small = copy.deepcopy(model)
    squeeze_model(small, masks, fold_sites(small))
    block = small.bert.encoder.layer[1].attention
    assert isinstance(block, SqueezedBertAttention) and block.out_rows.numel() == 28
    assert block.out_weight(cached=True).shape[0] == 32 and block.output.dense.weight.shape[0] == 28
    assert block.out_weight(cached=True)[28:].abs().sum() == 0
    assert block.out_weight(cached=False).shape[0] == 28  # padded only where built once (GEMM_PAD_UNCACHED)


@pytest.mark.parametrize("padding", ["on", "off"])
def test_frozen_eval_tensors_give_the_same_logits_eagerly_and_compiled(monkeypatch, padding):
    monkeypatch.setattr(squeeze_layers, "GEMM_PAD_DEVICES", {"cpu"} if padding == "on" else set())
    model, masks = masked_model("all_rules_mixed")
    small = copy.deepcopy(model)
    squeeze_model(small, masks, fold_sites(small))
    batch = random_batch(seed=6)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        expected = model.eval()(**inputs).logits
        small.eval()
        assert freeze_eval_tensors(small) == 6  # 2 attention blocks, 2 FFN-ins, 2 FFN-outs (all rows kept)
        torch.testing.assert_close(small(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
        explanation = torch._dynamo.explain(small)(**inputs)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        compiled = torch.compile(small, backend="eager")
        torch.testing.assert_close(compiled(**inputs).logits, expected, rtol=1e-5, atol=1e-5)


def test_frozen_tensors_ignore_later_parameter_changes_until_thawed():
    model, masks = masked_model("all_rules_mixed")
    squeeze_model(model, masks, fold_sites(model))
    batch = random_batch(seed=7)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        freeze_eval_tensors(model)
        before = model(**inputs).logits
        block = model.bert.encoder.layer[0].attention
        block.self.value.weight.mul_(3.0)  # the fused QKV weight is frozen: the change is not seen
        torch.testing.assert_close(model(**inputs).logits, before)
        unfreeze_eval_tensors(model)
        changed = model(**inputs).logits
        assert not torch.allclose(changed, before)
        freeze_eval_tensors(model)
        model.train()  # training thaws: a training forward reads the parameters
        model.eval()
        torch.testing.assert_close(model(**inputs).logits, changed)
    # with autograd on, eval forwards never read frozen tensors (their gradients would be lost)
    freeze_eval_tensors(model)
    model.zero_grad()
    model(**inputs).logits.sum().backward()
    assert block.self.value.weight.grad is not None and block.self.value.weight.grad.abs().sum() > 0


def test_padded_linear_is_nn_linear_where_padding_is_off(monkeypatch):
    monkeypatch.setattr(squeeze_layers, "GEMM_PAD_DEVICES", set())
    layer = PaddedLinear(8, 5)
    x = torch.randn(3, 8)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, layer.weight, layer.bias))
    wider = torch.cat([x, torch.randn(3, 3)], dim=-1)  # an input padded by the layer before
    torch.testing.assert_close(layer(wider), layer(x))
    assert set(layer.state_dict()) == {"weight", "bias"}


def test_padded_compact_export_computes_the_masked_function(pad_on_cpu, tmp_path):
    from transformers import AutoModelForMaskedLM

    from vp_dist.export import export_squeezed
    model, masks = masked_model("all_rules_mixed")
    small = copy.deepcopy(model)
    squeeze_model(small, masks, fold_sites(small))
    export_squeezed(small, tmp_path)
    compact = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert any(type(m).__name__ == "PaddedLinear" for m in compact.modules())
    batch = random_batch(seed=8)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        torch.testing.assert_close(compact(**inputs).logits, model.eval()(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_padded_training_step_compiles_without_graph_breaks(pad_on_cpu):
    model, masks = masked_model("all_rules_mixed")
    squeeze_model(model, masks, fold_sites(model))
    batch = random_batch(seed=5)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
    explanation = torch._dynamo.explain(model.train())(**inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_freezing_zero3_partitioned_parameters_is_refused():
    model, masks = masked_model("all_rules_mixed")
    squeeze_model(model, masks, fold_sites(model))
    block = model.bert.encoder.layer[0].attention
    block.self.query.weight.ds_id = 0  # what DeepSpeed ZeRO-3 marks its partitioned parameters with
    with pytest.raises(ValueError, match="ZeRO-3"):
        block.freeze_eval_tensors()
