"""The eval-time cache of derived tensors in the squeezed modules (vp_dist.squeeze.layers.EvalCached).

In eval mode with autograd off, `SqueezedBertAttention` reuses its fused QKV weight and bias, its
attn_out weight and kept bias rows, and `SqueezedLinear` its `bias[kept_rows]`, instead of
rebuilding them in every forward. The cached forward must be bitwise the uncached one, notice
every change of its sources (optimizer steps, `load_state_dict`, dtype casts, replaced
parameters, autocast), stay out of state dicts, pickles and deep copies, and run fewer ops.
"""
import copy
import io

import pytest
import torch

from helpers import load_script
from models import random_batch
from test_squeeze_attention import CASES, masked_model
from vp_dist.adapters import fold_sites
from vp_dist.squeeze import squeeze_model
from vp_dist.squeeze.attention import SqueezedBertAttention
from vp_dist.squeeze.layers import EvalCached, SqueezedLinear

pytestmark = pytest.mark.usefixtures("one_thread")
CACHE = "_eval_cache"


def squeezed(case: str = "all_rules_mixed", seed: int = 0, **overrides):
    """A squeezed tiny BERT with shrunk attention blocks and (FFN-out rows pruned too) SqueezedLinears."""
    model, masks = masked_model(case, seed=seed, **overrides)
    generator = torch.Generator().manual_seed(seed + 2)
    for name, kept in masks.items():
        if name.endswith("output.dense") and ".attention." not in name:  # FFN-out
            kept[1::4] = False
            layer = model.get_submodule(name)
            with torch.no_grad():
                layer.weight[~kept] = 0
                layer.bias[~kept] = torch.randn(int((~kept).sum()), generator=generator)
    squeeze_model(model, masks, fold_sites(model))
    assert sum(isinstance(m, SqueezedBertAttention) for m in model.modules()) == 2
    assert sum(isinstance(m, SqueezedLinear) for m in model.modules()) == 2
    return model.eval()


def inputs(seed: int = 3) -> dict:
    batch = random_batch(seed=seed)
    return {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}


def cached_modules(model):
    return [m for m in model.modules() if isinstance(m, EvalCached)]


def set_cache(model, enabled: bool):
    for module in cached_modules(model):
        module.cache_eval_tensors = enabled


@torch.no_grad()
def uncached_logits(model, batch):
    set_cache(model, False)
    try:
        return model(**batch).logits
    finally:
        set_cache(model, True)


@torch.no_grad()
def cached_logits(model, batch):
    """The second of two eval forwards: the first fills the cache, the second reads it."""
    model(**batch)
    assert all(CACHE in m.__dict__ for m in cached_modules(model))
    return model(**batch).logits


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("case", list(CASES))
def test_cached_eval_output_is_bitwise_the_uncached_one(case, implementation):
    model = squeezed(case, attn_implementation=implementation)
    batch = inputs()
    expected = uncached_logits(model, batch)
    assert not any(CACHE in m.__dict__ for m in cached_modules(model))
    assert torch.equal(cached_logits(model, batch), expected)
    # ... also on another batch (other padding) from the same cache
    other = {"input_ids": inputs(5)["input_ids"][:2], "attention_mask": torch.ones(2, 12, dtype=torch.long)}
    with torch.no_grad():
        assert torch.equal(model(**other).logits, uncached_logits(model, other))


def test_cache_is_refreshed_after_an_optimizer_step():
    model = squeezed()
    batch = inputs()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    labels = random_batch(seed=3)["labels"]
    model(**batch, labels=labels).loss.backward()  # eval mode, autograd on: uncached (and drops the cache)
    before = cached_logits(model, batch)
    optimizer.step()  # in-place updates bump every parameter's version; the model stays in eval mode
    after = cached_logits(model, batch)
    assert not torch.equal(after, before)
    assert torch.equal(after, uncached_logits(model, batch))


def test_cache_is_refreshed_after_in_place_edits_and_replaced_parameters():
    model = squeezed()
    batch = inputs()
    block = model.bert.encoder.layer[1].attention
    ffn_out = model.bert.encoder.layer[1].output.dense
    assert isinstance(ffn_out, SqueezedLinear)
    for edit in (lambda: block.self.query.collapsed_bias.mul_(3.0),
                 lambda: block.output.dense.folded_weight.add_(0.5),
                 lambda: block.output.dense.bias.add_(1.0),
                 lambda: ffn_out.bias.sub_(2.0),
                 lambda: setattr(ffn_out, "bias", torch.nn.Parameter(ffn_out.bias.detach() + 1.0)),
                 lambda: setattr(block.self.key, "collapsed_weight",
                                 torch.nn.Parameter(block.self.key.collapsed_weight.detach() * 2.0))):
        before = cached_logits(model, batch)
        with torch.no_grad():
            edit()
        after = cached_logits(model, batch)
        assert not torch.equal(after, before)
        assert torch.equal(after, uncached_logits(model, batch))


@pytest.mark.parametrize("assign", [False, True])
def test_cache_is_refreshed_after_load_state_dict(assign):
    model, other = squeezed(seed=0), squeezed(seed=1)  # same masks (the cases'), other weights
    batch = inputs()
    before = cached_logits(model, batch)
    model.load_state_dict(other.state_dict(), assign=assign)
    after = cached_logits(model, batch)
    assert not torch.equal(after, before)
    assert torch.equal(after, uncached_logits(model, batch))
    assert torch.equal(after, uncached_logits(other, batch))


def test_cache_is_refreshed_after_a_dtype_cast():
    model = squeezed()
    batch = inputs()
    cached_logits(model, batch)
    model.to(torch.bfloat16)
    after = cached_logits(model, batch)
    assert after.dtype == torch.bfloat16
    assert torch.equal(after, uncached_logits(model, batch))
    assert torch.equal(after, uncached_logits(copy.deepcopy(model), batch))  # a fresh copy, never cached


def test_cache_follows_the_autocast_state():
    model = squeezed()
    batch = inputs()
    cached_logits(model, batch)  # filled outside autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.equal(cached_logits(model, batch), uncached_logits(model, batch))
    assert torch.equal(cached_logits(model, batch), uncached_logits(model, batch))


def test_cache_is_used_only_in_eval_without_autograd_and_train_drops_it():
    model = squeezed()
    batch = inputs()
    cached_logits(model, batch)
    model.train()
    assert not any(CACHE in m.__dict__ for m in cached_modules(model))
    model.eval()
    cached_logits(model, batch)
    model(**batch)  # autograd on: uncached, and it drops the cache (the next step may write through .data)
    assert not any(CACHE in m.__dict__ for m in cached_modules(model))
    with torch.inference_mode():
        model(**batch)  # inference mode counts as autograd off
    assert all(CACHE in m.__dict__ for m in cached_modules(model))


def test_cache_stays_out_of_state_dict_pickles_and_deep_copies():
    model = squeezed()
    batch = inputs()
    keys = set(model.state_dict())
    expected = cached_logits(model, batch)
    assert set(model.state_dict()) == keys
    assert not any(CACHE in name for name, _ in model.named_buffers())
    twin = copy.deepcopy(model)
    assert not any(CACHE in m.__dict__ for m in cached_modules(twin))
    buffer = io.BytesIO()
    torch.save(model, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=False)
    assert not any(CACHE in m.__dict__ for m in cached_modules(loaded))
    with torch.no_grad():  # the copy builds its own cache; editing it leaves the original's alone
        assert torch.equal(cached_logits(twin, batch), expected)
        for p in twin.parameters():
            p.mul_(0.5)
        assert not torch.equal(cached_logits(twin, batch), expected)
    assert torch.equal(cached_logits(model, batch), expected)
    assert torch.equal(cached_logits(loaded, batch), expected)


def test_squeezed_linear_keeping_every_row_or_none():
    torch.manual_seed(0)
    x = torch.randn(2, 5, 6)
    for rows in (torch.arange(4), torch.zeros(0, dtype=torch.long), torch.tensor([0, 2, 3])):
        layer = SqueezedLinear(torch.randn(rows.numel(), 6), torch.randn(4), rows).eval()
        with torch.no_grad():
            layer.cache_eval_tensors = False
            expected = layer(x)
            layer.cache_eval_tensors = True
            layer(x)
            assert torch.equal(layer(x), expected)
            assert layer(x).shape == (2, 5, 4)


def top_level_aten_ops(model, batch) -> int:
    """aten ops called from Python (no aten op above them) in one forward: counted as
    `launch/bench_squeeze.py` counts a training step's (`top_level_ops`)."""
    from pathlib import Path

    bench = load_script(Path(__file__).resolve().parents[1] / "launch" / "bench_squeeze.py")
    return bench.top_level_ops(lambda: model(**batch))


def test_cached_eval_forward_runs_fewer_ops():
    model = squeezed()
    batch = inputs()
    uncached = top_level_aten_ops(model.train(), batch)  # training mode: no cache
    model.eval()
    with torch.no_grad():
        set_cache(model, False)
        no_cache = top_level_aten_ops(model, batch)
        set_cache(model, True)
        model(**batch)
        cached = top_level_aten_ops(model, batch)
    # per block the derived weights' build is gone: u (mul, mm), the QKV weight and bias (cat,
    # index_select each), attn_out's w columns (mul, linear) and weight (cat, index_select)
    assert cached <= no_cache - 2 * 10, (cached, no_cache, uncached)
    assert cached < uncached


def test_cached_eval_model_compiles_without_graph_breaks():
    model = squeezed()
    batch = inputs()
    with torch.no_grad():
        expected = uncached_logits(model, batch)
        cached_logits(model, batch)
        explanation = torch._dynamo.explain(model)(**batch)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager")
    with torch.no_grad():
        assert torch.equal(compiled(**batch).logits, expected)
