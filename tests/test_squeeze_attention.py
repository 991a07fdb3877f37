"""The exact attention shrink (vp_dist.squeeze.attention): each rule against the masked model.

Masked and squeezed models must agree on logits and on the gradient of every kept parameter, in
train mode (dropout 0, and seeded dropout: every rule is exact with it) and eval, with padded
batches, for both attention implementations (SDPA and eager), including heads and layers that
lose every row. Pruned rows get random biases (their constants), so every fold is exercised.
"""
import copy

import pytest
import torch

from helpers import loss_of
from models import random_batch, tiny_model
from vp_dist.adapters import fold_sites, prunable_layers
from vp_dist.squeeze import squeeze_model
from vp_dist.squeeze.attention import SqueezedBertAttention, attention_layout

pytestmark = pytest.mark.usefixtures("one_thread")
HEAD = 8  # tiny BERT: hidden 32, 4 heads of 8


def _mask(pattern: str, rows: int = 32, head_size: int = HEAD) -> torch.Tensor:
    """Per-head patterns: 'k' keep all, 'p' prune all, 'h' keep the first half, 'q' the first
    quarter, 'o' keep odd dims."""
    kept = torch.ones(rows, dtype=torch.bool)
    for head, code in enumerate(pattern):
        start, end = head * head_size, (head + 1) * head_size
        if code == "p":
            kept[start:end] = False
        elif code == "h":
            kept[start + head_size // 2:end] = False
        elif code == "q":
            kept[start + head_size // 4:end] = False
        elif code == "o":
            kept[start:end:2] = False
    return kept


# (query, key, value, attn_out) patterns per block of the 2-layer tiny BERT
CASES = {
    "key_dims_pruned": ("kkkk", "hopk", "kkkk", "kkkk"),
    "query_dims_pruned": ("hopk", "kkkk", "kkkk", "kkkk"),
    "value_dims_pruned": ("kkkk", "kkkk", "hopk", "okkk"),
    "all_rules_mixed": ("hokp", "ohpk", "pohk", "hkok"),
    "head_without_score_dims": ("pkho", "kpoh", "hkkp", "kkkk"),
    "layer_loses_every_row": ("pppp", "pppp", "pppp", "pppp"),
}


def masked_model(case: str, seed: int = 0, **overrides):
    model = tiny_model("bert-mlm", seed=seed, **overrides)
    head_size = model.config.hidden_size // model.config.num_attention_heads
    masks = {}
    generator = torch.Generator().manual_seed(seed + 1)
    for layer in prunable_layers(model):
        kept = torch.ones(layer.module.weight.shape[0], dtype=torch.bool)
        # block 1 gets the case's patterns, block 0 them reversed (all_rules_mixed's for the empty layer)
        codes = CASES[case] if layer.block == 1 or case != "layer_loses_every_row" else CASES["all_rules_mixed"]
        if layer.projection_type in ("query", "key", "value", "attn_out"):
            code = codes[("query", "key", "value", "attn_out").index(layer.projection_type)]
            kept = _mask(code if layer.block == 1 else code[::-1], model.config.hidden_size, head_size)
        elif layer.projection_type == "ffn_in":
            kept[::3] = False
        masks[layer.name] = kept
        with torch.no_grad():
            layer.module.weight[~kept] = 0
            layer.module.bias[~kept] = torch.randn(int((~kept).sum()), generator=generator)
    return model, masks


def _run(model, batch, mode, dropout_seed):
    model.train(mode != "eval")
    model.zero_grad()
    torch.manual_seed(dropout_seed)
    loss = loss_of(model, batch)
    loss.backward()
    return loss.detach()


def _assert_same(model, small, origins, batch, mode):
    losses = [_run(m, batch, mode, 7) for m in (model, small)]
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    old = dict(model.named_parameters())
    for name, param in small.named_parameters():
        origin = origins.get(name)
        reference = old[origin.name if origin else name].grad
        if origin is not None and origin.rows is not None:
            reference = reference[origin.rows]
        if origin is not None and origin.cols is not None:
            reference = reference[:, origin.cols]
        torch.testing.assert_close(param.grad, reference, rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["train_no_dropout", "train_seeded_dropout", "eval"])
@pytest.mark.parametrize("case", list(CASES))
def test_shrunk_attention_matches_the_masked_model(case, mode, implementation):
    dropout = 0.1 if mode == "train_seeded_dropout" else 0.0
    model, masks = masked_model(case, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                                attn_implementation=implementation)
    small = copy.deepcopy(model)
    origins = squeeze_model(small, masks, fold_sites(small))
    blocks = [m for m in small.modules() if isinstance(m, SqueezedBertAttention)]
    assert len(blocks) == 2
    _assert_same(model, small, origins, random_batch(seed=3), mode)


# Heads of 16 (hidden 64): 4 score dims per head, every value dim (score width 8, value width 16),
# and the reverse (value: 4 dims + the constant feature: width 8; score 16).
WIDE_CASES = {"score_narrower": (("kkkk", "qqqq", "kkkk", "hkok"), (8, 16)),
              "value_narrower": (("kkkk", "kkkk", "qqqq", "hkok"), (16, 8))}


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["train_no_dropout", "train_seeded_dropout", "eval"])
@pytest.mark.parametrize("case", list(WIDE_CASES))
def test_unequal_score_and_value_widths_match_the_masked_model(case, mode, implementation, monkeypatch):
    patterns, widths = WIDE_CASES[case]
    monkeypatch.setitem(CASES, case, patterns)
    dropout = 0.1 if mode == "train_seeded_dropout" else 0.0
    model, masks = masked_model(case, hidden_size=64, num_attention_heads=4, hidden_dropout_prob=dropout,
                                attention_probs_dropout_prob=dropout, attn_implementation=implementation)
    small = copy.deepcopy(model)
    origins = squeeze_model(small, masks, fold_sites(small))
    assert [(block.attention.E, block.attention.Ev) for block in small.bert.encoder.layer] == [widths, widths]
    # the pair term of the FLOP count: at both widths when dropout is drawn or eager attention
    # runs, else (SDPA, q/k or v padded) at the wider one
    padded = not dropout and implementation == "sdpa"
    assert small.bert.encoder.layer[1].attention.matmul_flops()[1] == 2 * 4 * (32 if padded else 24)
    _assert_same(model, small, origins, random_batch(seed=3), mode)


def _one_head_width(small) -> None:
    """Rebuild every shrunk block of `small` with the layout before the split widths (one width)."""
    from vp_dist.squeeze import relayout_attention
    assert relayout_attention(small, "equal") == len(small.bert.encoder.layer)


def _wide_squeezed(monkeypatch):
    """(masked model, squeezed copy) of the score_narrower case: head widths (8, 16)."""
    monkeypatch.setitem(CASES, "wide", WIDE_CASES["score_narrower"][0])
    model, masks = masked_model("wide", hidden_size=64, num_attention_heads=4)
    small = copy.deepcopy(model)
    squeeze_model(small, masks, fold_sites(small))
    return model, small


def test_a_state_dict_of_another_width_rule_loads_and_one_of_other_masks_is_refused(monkeypatch):
    _, split = _wide_squeezed(monkeypatch)
    equal = copy.deepcopy(split)
    _one_head_width(equal)
    assert [(b.attention.E, b.attention.Ev) for b in equal.bert.encoder.layer] == [(16, 16), (16, 16)]
    generator = torch.Generator().manual_seed(9)
    with torch.no_grad():  # other values than split's, so that the comparison below needs the load
        for param in equal.parameters():
            param.add_(0.05 * torch.randn(param.shape, generator=generator))
    batch = random_batch(seed=6)
    expected = loss_of(equal.eval(), batch).detach()
    assert abs(float(loss_of(split.eval(), batch).detach() - expected)) > 1e-4
    split.load_state_dict(equal.state_dict())
    assert [(b.attention.E, b.attention.Ev) for b in split.bert.encoder.layer] == [(8, 16), (8, 16)]
    torch.testing.assert_close(loss_of(split.eval(), batch).detach(), expected, rtol=1e-5, atol=1e-6)
    state = equal.state_dict()
    mask = state["bert.encoder.layer.0.attention.self.key.mask"]
    state["bert.encoder.layer.0.attention.self.key.mask"] = mask.roll(1)
    with pytest.raises(RuntimeError, match="other masks"):
        split.load_state_dict(state)


def test_compact_exports_record_head_widths_and_older_ones_load_with_one_width(tmp_path, monkeypatch):
    import json

    from transformers import AutoModelForMaskedLM

    from vp_dist.export import export_squeezed
    model, small = _wide_squeezed(monkeypatch)
    inputs = {k: v for k, v in random_batch(seed=8).items() if k != "labels"}
    with torch.no_grad():
        expected = model.eval()(**inputs).logits
    old = copy.deepcopy(small)
    _one_head_width(old)
    for name, squeezed, widths in (("new", small, [8, 16]), ("old", old, None)):
        export_squeezed(squeezed, tmp_path / name)
        config_file = tmp_path / name / "config.json"
        config = json.loads(config_file.read_text())
        assert [block["widths"] for block in config["vp_attention"].values()] == [widths or [16, 16]] * 2
        if widths is None:  # as written before the widths were recorded: one width, 16
            for block in config["vp_attention"].values():
                del block["widths"]
            config_file.write_text(json.dumps(config))
        loaded = AutoModelForMaskedLM.from_pretrained(tmp_path / name).eval()
        blocks = [m for m in loaded.modules() if isinstance(m, SqueezedBertAttention)]
        assert [(b.E, b.Ev) for b in blocks] == [tuple(widths or (16, 16))] * 2
        with torch.no_grad():
            torch.testing.assert_close(loaded(**inputs).logits, expected, rtol=1e-5, atol=1e-5)


def test_pruned_query_dims_become_one_score_feature_computed_from_parameters():
    model, masks = masked_model("query_dims_pruned")
    small = copy.deepcopy(model)
    squeeze_model(small, masks, fold_sites(small))
    block = small.bert.encoder.layer[0].attention
    # block 0 uses the reversed pattern "kpoh": head 1 lost all query dims, heads 2, 3 half
    assert block.self.query.weight.shape[0] == 8 + 0 + 4 + 4
    assert block.self.query.collapsed_bias.shape[0] == 16 and block.self.key.collapsed_weight.shape == (16, 32)
    weight, _ = block.fused_qkv()
    # head order: head h's rows are its E query, E key and Ev value rows; the key rows hold u_h
    u = weight.view(block.num_heads, 2 * block.E + block.Ev, 32)[:, block.E:2 * block.E]
    # head 1's only score feature is u_1 = sum_d c_d W_K[d] over its 8 pruned query dims
    key = model.bert.encoder.layer[0].attention.self.key
    c = model.bert.encoder.layer[0].attention.self.query.bias[8:16]
    torch.testing.assert_close(u[1, 0], (c.unsqueeze(1) * key.weight[8:16]).sum(0))
    assert u[1, 1:].abs().sum() == 0
    # changing the pruned query constants changes both models alike (the shrink reads the parameter)
    batch = random_batch(seed=4)
    before = loss_of(small.eval(), batch).detach()
    pruned_query = ~masks["bert.encoder.layer.0.attention.self.query"]
    with torch.no_grad():
        block.self.query.collapsed_bias.mul_(100.0)
        model.bert.encoder.layer[0].attention.self.query.bias[pruned_query] *= 100.0
    after = loss_of(small, batch).detach()
    assert abs(float(after - before)) > 1e-4
    torch.testing.assert_close(after, loss_of(model.eval(), batch).detach(), rtol=1e-5, atol=1e-6)


def test_heads_are_padded_to_a_multiple_of_eight_per_score_and_value_width():
    layout = attention_layout(_mask("hopk"), _mask("kkkk"), _mask("hkpo"), 4)
    # score dims per head: |S| + [T non-empty] = 4+1, 4+1, 0+1, 8+0 -> 8; value 4+1, 8, 0+1, 4+1 -> 8
    assert layout["E"] == 8 and layout["Ev"] == 8
    # head order: head h owns rows [24h, 24h + 24): its 8 query, 8 key and 8 value rows
    assert layout["q_slots"].tolist() == [0, 1, 2, 3, 24, 25, 26, 27, 72, 73, 74, 75, 76, 77, 78, 79]
    assert layout["k_slots"].tolist() == [q + 8 for q in layout["q_slots"].tolist()]
    assert layout["u_slots"].tolist() == [8 + 4, 24 + 8 + 4, 48 + 8]  # key side, after the head's score dims
    assert layout["qkv_base"].nonzero().flatten().tolist() == sorted([4, 24 + 4, 48, 16 + 4, 48 + 16, 72 + 16 + 4])
    # 2 heads of 16: score dims 4 (head 0) and 0 -> 8; value dims 16 -> 16
    key = torch.zeros(32, dtype=torch.bool)
    key[:4] = True
    kept = torch.ones(32, dtype=torch.bool)
    wide = attention_layout(kept, key, kept, 2)
    assert wide["E"] == 8 and wide["Ev"] == 16 and wide["groups"] == ((8, 16, (0, 1)),)
    assert wide["v_slots"].tolist() == [*range(16, 32), *range(48, 64)] and wide["qkv_base"].numel() == 64
    assert wide["v_columns"].tolist() == list(range(32))
    equal = attention_layout(kept, key, kept, 2, widths="equal")  # the older layout: one width
    assert equal["E"] == 16 and equal["Ev"] == 16 and equal["v_slots"].tolist() == [*range(32, 48), *range(80, 96)]
    assert attention_layout(kept, key, kept, 2, widths=(24, 16))["E"] == 24  # recorded widths
    with pytest.raises(ValueError, match="below what the masks need"):
        attention_layout(kept, key, kept, 2, widths=(8, 8))
    assert attention_layout(_mask("pppp"), _mask("pppp"), _mask("pppp"), 4)["E"] == 8  # uniform heads


def test_row_counts_tell_needed_rows_from_the_padded_layout():
    """`qkv_row_counts`: per head 2 x (score dims + its u feature) + value dims + its constant-1
    feature, against every head padded to the layer's widths (what `bench_squeeze.py` sums)."""
    model, masks = masked_model("all_rules_mixed")
    squeeze_model(model, masks, fold_sites(model))
    for index, layer in enumerate(model.bert.encoder.layer):
        block = layer.attention
        q, k, v = (masks[f"bert.encoder.layer.{index}.attention.{name}"].view(4, HEAD)
                   for name in ("self.query", "self.key", "self.value"))
        needed = sum(2 * (int((q[h] & k[h]).sum()) + int((~q[h] & k[h]).any()))
                     + int(v[h].sum()) + int((~v[h]).any()) for h in range(4))
        assert block.qkv_row_counts() == (needed, 4 * (2 * block.E + block.Ev))
        assert needed < 4 * (2 * block.E + block.Ev)  # these heads differ in width: zero rows


def test_a_model_squeezed_in_eval_mode_stays_in_eval_mode():
    model, masks = masked_model("all_rules_mixed", attention_probs_dropout_prob=0.5)
    model.eval()
    squeeze_model(model, masks, fold_sites(model))
    assert not any(m.training for m in model.modules())
    batch = random_batch(seed=2)
    with torch.no_grad():
        torch.testing.assert_close(loss_of(model, batch), loss_of(model, batch))  # no dropout drawn


@pytest.mark.parametrize("case", ["all_rules_mixed", "score_narrower", "value_narrower"])
def test_squeezed_model_compiles_without_graph_breaks(case, monkeypatch):
    wide = {}
    if case in WIDE_CASES:  # unequal score and value widths: the split and, in eval, the SDPA pad
        monkeypatch.setitem(CASES, case, WIDE_CASES[case][0])
        wide = {"hidden_size": 64, "num_attention_heads": 4}
    model, masks = masked_model(case, **wide)
    small = copy.deepcopy(model)
    squeeze_model(small, masks, fold_sites(small))
    batch = random_batch(seed=5)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "labels": batch["labels"]}
    for train in (True, False):
        explanation = torch._dynamo.explain(small.train(train))(**inputs)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


@pytest.mark.parametrize("case", ["all_rules_mixed", "head_without_score_dims", "layer_loses_every_row"])
def test_both_exports_of_a_shrunk_model_compute_the_masked_function(case, tmp_path):
    from transformers import AutoModelForMaskedLM, BertForMaskedLM

    from vp_dist.export import export_masked, export_squeezed
    model, masks = masked_model(case)
    small = copy.deepcopy(model)
    squeeze_model(small, masks, fold_sites(small))
    export_squeezed(small, tmp_path / "compact")
    export_masked(small, tmp_path / "masked")
    compact = AutoModelForMaskedLM.from_pretrained(tmp_path / "compact")
    stock = BertForMaskedLM.from_pretrained(tmp_path / "masked")
    assert sum(isinstance(m, SqueezedBertAttention) for m in compact.modules()) == 2
    batch = random_batch(seed=8)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        expected = model.eval()(**inputs).logits
        for loaded in (compact, stock):
            torch.testing.assert_close(loaded.eval()(**inputs).logits, expected, rtol=1e-5, atol=1e-5)
    for name in ("query", "key", "value", "attn_out"):  # the block's masks come back in the masked export
        layer = next(n for n in masks if n.startswith("bert.encoder.layer.1.") and
                     n.endswith({"query": "self.query", "key": "self.key", "value": "self.value",
                                 "attn_out": "attention.output.dense"}[name]))
        assert torch.equal(compact.get_submodule(layer).mask, masks[layer])


def test_compact_export_compiles_without_graph_breaks(tmp_path):
    from transformers import AutoModelForMaskedLM

    from vp_dist.export import export_squeezed
    model, masks = masked_model("all_rules_mixed")
    squeeze_model(model, masks, fold_sites(model))
    export_squeezed(model, tmp_path)
    compact = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    batch = random_batch(seed=9)
    explanation = torch._dynamo.explain(compact)(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"])
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_self_contained_modules_import_nothing_else_of_vp_dist():
    """The compact export's modeling code must load with torch + transformers alone (bundling)."""
    import ast
    import importlib

    from vp_dist.export import SELF_CONTAINED_MODULES
    for module_name in SELF_CONTAINED_MODULES:
        module = importlib.import_module(module_name)
        tree = ast.parse(open(module.__file__).read())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.level > 0:
                package = module_name.rsplit(".", node.level)[0]
                target = f"{package}.{node.module}" if node.module else package
                assert target in SELF_CONTAINED_MODULES, (module_name, target)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [node.module] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
                for name in names:
                    assert name.split(".")[0] in ("__future__", "torch", "transformers", "dataclasses",
                                                  "typing", "math"), (module_name, name)


def test_the_engine_rebuild_applies_the_folds_of_a_plain_squeeze():
    """One rule for both squeezes: the engine rebuild shrinks attention exactly when a plain-model
    squeeze does (`fold_ffn`); a checkpoint of an engine that row-squeezed attention loads without it."""
    from vp_dist import VariancePruner, VPConfig
    from vp_dist.adapters import AttentionSite
    from vp_dist.distributed.rebuild import engine_folds

    pruner = VariancePruner(tiny_model("bert-mlm"), VPConfig())
    assert engine_folds(pruner) == pruner.squeeze_folds() == pruner.folds
    assert sum(isinstance(site, AttentionSite) for site in engine_folds(pruner)) == 2
    assert engine_folds(pruner, shrink_attention=False) == [
        site for site in pruner.folds if not isinstance(site, AttentionSite)] != []
    assert engine_folds(VariancePruner(tiny_model("bert-mlm"), VPConfig(fold_ffn=False))) == []


def test_squeezed_buffers_take_the_engine_dtype():
    """DeepSpeed casts parameters, not buffers: an engine built around a shrunk model casts the empty
    tensors of emptied projections and the blocks' 0/1 constants to its dtype, and nothing else."""
    from vp_dist.squeeze import cast_squeezed_buffers

    model, masks = masked_model("layer_loses_every_row")
    reference = loss_of(model.eval(), random_batch(seed=4)).detach()
    squeeze_model(model, masks, fold_sites(model))
    model.register_buffer("own_constant", torch.ones(3))  # a model's own buffer keeps its dtype
    for param in model.parameters():  # as DeepSpeed does: parameters only
        param.data = param.data.to(torch.bfloat16)
    cast_squeezed_buffers(model, torch.bfloat16)
    blocks = [m for m in model.modules() if isinstance(m, SqueezedBertAttention)]
    floating = [b for block in blocks for b in block.buffers() if b.is_floating_point()]
    assert any(b.numel() == 0 for b in floating) and all(b.dtype == torch.bfloat16 for b in floating)
    assert model.own_constant.dtype == torch.float32
    with torch.no_grad():
        torch.testing.assert_close(loss_of(model, random_batch(seed=4)).float(), reference, rtol=0.02, atol=0.02)


@pytest.mark.parametrize("mode", ["eval", "train_no_dropout", "train_seeded_dropout"])
def test_attn_out_expand_is_fused_with_the_residual_add_unless_dropout_stands_between(mode):
    """Eval, or training with hidden dropout 0: attn_out's kept rows are added into residual + bias
    (`index_add_` after the residual add, in place), no full-width output of attn_out is built; with
    dropout the expand (`index_add` into the broadcast bias) comes first, then dropout,
    then the residual add."""
    from torch.profiler import ProfilerActivity, profile

    dropout = 0.1 if mode == "train_seeded_dropout" else 0.0
    model, masks = masked_model("all_rules_mixed", hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout)
    squeeze_model(model, masks, fold_sites(model))
    block = next(m for m in model.modules() if isinstance(m, SqueezedBertAttention))
    assert not block.attn_out_full  # attn_out lost rows: there is an expand to fuse
    block.train(mode != "eval")
    hidden = torch.randn(2, 6, model.config.hidden_size)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        block(hidden)
    # ops on activations (their first input [2, 6, hidden]), not the fused weights' index_copy
    order = [event.name for event in sorted(prof.events(), key=lambda e: e.time_range.start)
             if event.input_shapes and event.input_shapes[0] == [2, 6, 32]
             and event.name in ("aten::add", "aten::index_add", "aten::index_add_", "aten::dropout")]
    assert model.config.hidden_size == 32
    fused = mode != "train_seeded_dropout"
    expected = ["aten::add", "aten::index_add_"] if fused else ["aten::index_add", "aten::dropout", "aten::add"]
    assert order == expected, order


# Head groups (`widths="grouped"`), heads of 16 (hidden 64). key "kqkq": heads 0 and 2 keep 16
# score dims, heads 1 and 3 four (width 8); block 0 gets the patterns reversed (the wide heads
# 1 and 3), so the groups are not runs of heads. value "qkkq" gives the three-group case heads of
# (score, value) widths (16, 8), (8, 16), (16, 16), (8, 8).
GROUPED_CASES = {
    "two_groups": (("kkkk", "kqkq", "kkkk", "hkok"), 0.05,
                   [((16, 16, (1, 3)), (8, 16, (0, 2))), ((16, 16, (0, 2)), (8, 16, (1, 3)))]),
    "three_groups": (("kkkk", "kqkq", "qkkq", "hkok"), 0.0, None),
}


def _grouped_squeezed(case, monkeypatch, **overrides):
    from vp_dist.squeeze import attention
    patterns, saving, _ = GROUPED_CASES[case]
    monkeypatch.setitem(CASES, case, patterns)
    monkeypatch.setattr(attention, "HEAD_WIDTHS", "grouped")
    monkeypatch.setattr(attention, "MIN_GROUP_SAVING", saving)
    model, masks = masked_model(case, hidden_size=64, num_attention_heads=4, **overrides)
    small = copy.deepcopy(model)
    origins = squeeze_model(small, masks, fold_sites(small))
    return model, small, origins


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("mode", ["train_no_dropout", "train_seeded_hidden_dropout", "eval"])
@pytest.mark.parametrize("case", list(GROUPED_CASES))
def test_grouped_heads_match_the_masked_model(case, mode, implementation, monkeypatch):
    """Logits and every kept parameter's gradient, padded batches; seeded dropout on the hidden
    states (attention dropout draws per group, so it is the masked model's in distribution only)."""
    dropout = 0.1 if mode == "train_seeded_hidden_dropout" else 0.0
    model, small, origins = _grouped_squeezed(case, monkeypatch, hidden_dropout_prob=dropout,
                                              attention_probs_dropout_prob=0.0, attn_implementation=implementation)
    groups = [layer.attention.groups for layer in small.bert.encoder.layer]
    expected = GROUPED_CASES[case][2]
    if expected is not None:
        assert groups == expected
    else:
        assert [len(g) for g in groups] == [3, 3], groups
    for layer in small.bert.encoder.layer:  # fewer rows than one group of all heads would compute
        block = layer.attention
        assert block.qkv_row_counts()[1] < 4 * (2 * block.E + block.Ev)
    _assert_same(model, small, origins, random_batch(seed=3), mode)


def test_grouped_heads_return_attention_weights_in_the_heads_own_order(monkeypatch):
    """Eager attention's weights (output_attentions): the groups' calls are put back in head order,
    and equal the masked model's (the shrink drops only per-query score constants)."""
    model, small, _ = _grouped_squeezed("two_groups", monkeypatch, attn_implementation="eager")
    batch = random_batch(seed=4)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "output_attentions": True}
    with torch.no_grad():
        expected, got = model.eval()(**inputs).attentions, small.eval()(**inputs).attentions
    assert len(got) == 2
    for mine, reference in zip(got, expected):
        torch.testing.assert_close(mine, reference, rtol=1e-5, atol=1e-6)


def test_grouped_heads_train_with_attention_dropout(monkeypatch):
    """With attention dropout each group draws its own masks: the loss differs from the masked
    model's under one seed, but training runs and gives gradients to every kept parameter."""
    _, small, _ = _grouped_squeezed("two_groups", monkeypatch, attention_probs_dropout_prob=0.5)
    small.train()
    small.zero_grad()
    loss_of(small, random_batch(seed=3)).backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in small.parameters() if p.requires_grad)


def test_head_groups_compute_the_fewest_rows():
    """`head_groups` against every partition of 6 heads into at most 3 groups (min_saving 0),
    and its saving threshold."""
    from vp_dist.squeeze.attention import head_groups

    def partitions(items):
        if not items:
            yield []
            return
        first, rest = items[0], items[1:]
        for part in partitions(rest):
            for i in range(len(part)):
                yield part[:i] + [[first, *part[i]]] + part[i + 1:]
            yield [[first], *part]

    def rows(groups, score, value):
        r8 = lambda n: max(8, -(-n // 8) * 8)  # noqa: E731
        return sum(len(g) * (2 * r8(max(score[h] for h in g)) + r8(max(value[h] for h in g))) for g in groups)

    generator = torch.Generator().manual_seed(0)
    for trial in range(20):
        score = torch.randint(0, 65, (6,), generator=generator)
        value = torch.randint(1, 65, (6,), generator=generator)
        groups = head_groups(score, value, max_groups=3, min_saving=0.0)
        assert sorted(h for *_, heads in groups for h in heads) == list(range(6))
        for E, Ev, heads in groups:  # each group's widths hold its heads
            assert E >= int(score[list(heads)].max()) and Ev >= int(value[list(heads)].max())
        got = sum(len(heads) * (2 * E + Ev) for E, Ev, heads in groups)
        best = min(rows(p, score.tolist(), value.tolist()) for p in partitions(list(range(6))) if len(p) <= 3)
        assert got == best, (trial, groups)
    score, value = torch.tensor([64, 64, 64, 64, 64, 56]), torch.tensor([64] * 6)
    assert len(head_groups(score, value, min_saving=0.0)) == 2  # head 5 alone saves 16 of 1152 rows (1.4%)
    assert len(head_groups(score, value, min_saving=0.05)) == 1
    score[5] = 8  # now 112 rows (9.7%)
    assert head_groups(score, value, min_saving=0.05) == ((64, 64, (0, 1, 2, 3, 4)), (8, 64, (5,)))


def test_explicit_head_groups_are_checked():
    kept = torch.ones(64, dtype=torch.bool)
    key = _mask("kqkq", 64, 16)
    layout = attention_layout(kept, key, kept, 4, widths=((16, 16, (0, 2)), (8, 16, (1, 3))))
    assert layout["groups"] == ((16, 16, (0, 2)), (8, 16, (1, 3))) and layout["qkv_base"].numel() == 160
    with pytest.raises(ValueError, match="not a partition"):
        attention_layout(kept, key, kept, 4, widths=((16, 16, (0, 2)), (8, 16, (1,))))
    with pytest.raises(ValueError, match="below what the masks need"):
        attention_layout(kept, key, kept, 4, widths=((16, 16, (0, 1)), (8, 16, (2, 3))))


def test_compact_export_records_head_groups(tmp_path, monkeypatch):
    import json

    from transformers import AutoModelForMaskedLM

    from vp_dist.export import export_squeezed
    model, small, _ = _grouped_squeezed("two_groups", monkeypatch)
    monkeypatch.setattr("vp_dist.squeeze.attention.HEAD_WIDTHS", "split")  # the load must read the record
    export_squeezed(small, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert [block["widths"] for block in config["vp_attention"].values()] == [
        [[16, 16, [1, 3]], [8, 16, [0, 2]]], [[16, 16, [0, 2]], [8, 16, [1, 3]]]]
    loaded = AutoModelForMaskedLM.from_pretrained(tmp_path).eval()
    assert [layer.attention.groups for layer in loaded.bert.encoder.layer] == GROUPED_CASES["two_groups"][2]
    batch = random_batch(seed=8)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, model.eval()(**inputs).logits, rtol=1e-5, atol=1e-5)


def test_grouped_heads_compile_without_graph_breaks(monkeypatch):
    _, small, _ = _grouped_squeezed("three_groups", monkeypatch)
    batch = random_batch(seed=5)
    for train in (True, False):
        explanation = torch._dynamo.explain(small.train(train))(**batch)
        assert explanation.graph_break_count == 0, explanation.break_reasons
        assert explanation.graph_count == 1


def test_head_widths_is_a_validated_pruner_setting(monkeypatch):
    """`VPConfig(head_widths=...)` reaches the squeeze of a plain pruner (the engine rebuild's is
    tests/test_export.py's grouped engine run), whatever the process-wide default."""
    from vp_dist import VariancePruner, VPConfig
    from vp_dist.squeeze import attention
    with pytest.raises(ValueError, match="head_widths='wide' must be"):
        VPConfig(head_widths="wide")
    assert VPConfig.from_dict({"head_widths": "grouped"}).head_widths == "grouped"
    monkeypatch.setitem(CASES, "two_groups", GROUPED_CASES["two_groups"][0])
    monkeypatch.setattr(attention, "HEAD_WIDTHS", "split")
    model, masks = masked_model("two_groups", hidden_size=64, num_attention_heads=4)
    for rule, count in (("grouped", 2), ("split", 1)):
        pruner = VariancePruner(model, VPConfig(start=1, interval=1, increment=0.5, target=0.5, head_widths=rule))
        pruner.kept = torch.cat([masks[layer.name] for layer in pruner.layers])
        squeezed = pruner.squeeze()
        assert [len(layer.attention.groups) for layer in squeezed.bert.encoder.layer] == [count, count]


def test_relayout_rebuilds_a_squeezed_model_into_another_head_layout_exactly(monkeypatch):
    """`relayout_attention` (fine-tuning's `head_widths`): the same function and gradients in the
    new layout, the same parameter names and values; a block already in the layout is left."""
    from vp_dist.squeeze import attention, relayout_attention
    monkeypatch.setitem(CASES, "two_groups", GROUPED_CASES["two_groups"][0])
    monkeypatch.setattr(attention, "HEAD_WIDTHS", "split")
    model, masks = masked_model("two_groups", hidden_size=64, num_attention_heads=4, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0)
    small = copy.deepcopy(model)
    origins = squeeze_model(small, masks, fold_sites(small))
    small.eval()
    before = {name: p.detach().clone() for name, p in small.named_parameters()}
    assert relayout_attention(small, "grouped") == 2
    assert [layer.attention.groups for layer in small.bert.encoder.layer] == GROUPED_CASES["two_groups"][2]
    assert not small.training
    after = dict(small.named_parameters())
    assert after.keys() == before.keys()
    for name, value in before.items():
        assert torch.equal(after[name], value), name
    for mode in ("train_no_dropout", "eval"):
        _assert_same(model, small, origins, random_batch(seed=3), mode)
    assert relayout_attention(small, "grouped") == 0
    assert relayout_attention(small, "equal") == 2
    assert [(layer.attention.E, layer.attention.Ev) for layer in small.bert.encoder.layer] == [(16, 16)] * 2
    _assert_same(model, small, origins, random_batch(seed=3), "eval")


@pytest.mark.parametrize("mode", ["train_no_dropout", "eval"])
@pytest.mark.parametrize("case", list(CASES))
def test_every_shrink_rule_matches_the_masked_model_in_head_groups(case, mode, monkeypatch):
    """Each rule's case (heads of 16, so that widths 8 and 16 can differ) under "grouped" with any
    saving taken: heads and layers that lose every row included."""
    from vp_dist.squeeze import attention
    monkeypatch.setattr(attention, "HEAD_WIDTHS", "grouped")
    monkeypatch.setattr(attention, "MIN_GROUP_SAVING", 0.0)
    model, masks = masked_model(case, hidden_size=64, num_attention_heads=4, hidden_dropout_prob=0.0,
                                attention_probs_dropout_prob=0.0)
    small = copy.deepcopy(model)
    origins = squeeze_model(small, masks, fold_sites(small))
    _assert_same(model, small, origins, random_batch(seed=3), mode)


def test_the_rule_cases_form_head_groups(monkeypatch):
    """The cases above do exercise several groups (not one group of all heads everywhere)."""
    from vp_dist.squeeze import attention
    monkeypatch.setattr(attention, "MIN_GROUP_SAVING", 0.0)
    grouped = 0
    for case in CASES:
        _, masks = masked_model(case, hidden_size=64, num_attention_heads=4)
        for block in range(2):
            name = f"bert.encoder.layer.{block}.attention.self."
            groups = attention_layout(masks[name + "query"], masks[name + "key"], masks[name + "value"], 4,
                                      "grouped")["groups"]
            grouped += len(groups) > 1
    assert grouped == 11, grouped  # every block but the one that lost every row
