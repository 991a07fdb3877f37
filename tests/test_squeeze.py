"""SPEC 5: the squeezed model computes the masked model's function, forward and backward."""
import pytest
import torch

from helpers import loss_of, train
from models import random_batch, tiny_model
from vp_dist import SqueezedLinear, VPConfig
from vp_dist.squeeze import ResidualExpandOutput, count_parameters

KINDS = ["bert-mlm", "bert-pretraining", "bert-cls", "bert-qa", "roberta-mlm", "llama"]


def pruned(kind):
    """A model trained a few steps and pruned to 50% per type, and its pruner."""
    model = tiny_model(kind)
    pruner, _, _ = train(model, VPConfig(start=2, interval=2, increment=0.25, target=0.5), steps=4)
    return model, pruner


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mode", ["train", "train_dropout_0", "eval"])
def test_squeezed_model_matches_masked_model(kind, mode):
    """Train (seeded dropout: the expands stand before dropout), train with dropout 0 and eval (BERT's
    FFN-out and attn_out expands fused with the residual add)."""
    model, pruner = pruned(kind)
    assert all(abs(s - 0.5) < 0.02 for s in pruner.sparsity().values())
    small = pruner.squeeze()
    assert small is not model
    if not kind.startswith("llama"):  # every block's FFN-out lost rows: its expand can fuse
        fused = [m for m in small.modules() if isinstance(m, ResidualExpandOutput)]
        assert len(fused) == model.config.num_hidden_layers
    for m in (model, small):
        m.train(mode != "eval")
        m.zero_grad()
        for module in m.modules():
            if mode == "train_dropout_0" and isinstance(module, torch.nn.Dropout):
                module.p = 0.0
    batch = random_batch(seed=1234)
    outputs = []
    for m in (model, small):
        torch.manual_seed(7)  # same dropout masks in both
        loss = loss_of(m, batch)
        loss.backward()
        outputs.append(loss.detach())
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)

    old = dict(model.named_parameters())
    for name, param in small.named_parameters():
        origin = pruner.last_origins.get(name)
        reference = old[origin.name if origin else name].grad
        if origin is not None and origin.rows is not None:
            reference = reference[origin.rows]
        if origin is not None and origin.cols is not None:
            reference = reference[:, origin.cols]
        if param.grad is None and reference is None:
            continue
        torch.testing.assert_close(param.grad, reference, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("kind", ["bert-mlm", "llama"])
def test_squeezing_returns_a_really_smaller_model(kind):
    model, pruner = pruned(kind)
    small = pruner.squeeze()
    squeezed_layers = [m for m in small.modules() if isinstance(m, SqueezedLinear)]
    assert squeezed_layers
    weights_before = sum(layer.module.weight.numel() for layer in pruner.layers)
    weights_after = sum(dict(small.named_modules())[layer.name].weight.numel() for layer in pruner.layers)
    # 50% of rows per type pruned; the FFN fold also removes FFN-out input columns.
    assert weights_after <= 0.5 * weights_before + 1
    assert count_parameters(small) < count_parameters(model) - 0.45 * weights_before


def test_ffn_fold_shrinks_both_ffn_matrices_without_expand():
    model, pruner = pruned("bert-mlm")
    small = pruner.squeeze()
    masks = pruner.masks()
    block = small.bert.encoder.layer[0]
    kept_in = int(masks["bert.encoder.layer.0.intermediate.dense"].sum())
    assert isinstance(block.intermediate.dense, torch.nn.Linear)
    assert block.intermediate.dense.weight.shape[0] == kept_in
    assert block.output.dense.weight.shape[1] == kept_in


def test_squeezed_model_keeps_training_with_finite_loss():
    model, pruner = pruned("bert-mlm")
    small = pruner.squeeze()
    optimizer = torch.optim.AdamW(small.parameters(), lr=1e-3)
    for step in range(3):
        loss = loss_of(small, random_batch(seed=50 + step))
        loss.backward()
        optimizer.step(), optimizer.zero_grad()
        assert torch.isfinite(loss)


@pytest.mark.parametrize("mode", ["train", "eval"])
def test_layers_that_lose_every_row_squeeze_to_zero_rows_and_keep_the_function(mode):
    """SPEC 3 allows a layer to lose all its rows; squeezing must still be exact."""
    import copy

    from vp_dist.adapters import fold_sites, prunable_layers
    from vp_dist.squeeze import squeeze_model
    model = tiny_model("bert-mlm")
    masks = {}
    for layer in prunable_layers(model):
        kept = torch.ones(layer.module.weight.shape[0], dtype=torch.bool)
        if layer.block == 1 and layer.projection_type in ("query", "key", "ffn_in"):
            kept[:] = False
        elif layer.projection_type == "value":
            kept[::2] = False
        masks[layer.name] = kept
        with torch.no_grad():
            layer.module.weight[~kept] = 0
    small = copy.deepcopy(model)
    squeeze_model(small, masks, fold_sites(small))
    assert small.bert.encoder.layer[1].intermediate.dense.weight.shape[0] == 0
    assert small.bert.encoder.layer[1].attention.self.query.weight.shape[0] == 0
    # ZeRO-3 cannot gather zero-size parameters: they are held as buffers, still in the state dict.
    assert all(p.numel() > 0 for p in small.parameters())
    assert small.state_dict()["bert.encoder.layer.1.attention.self.query.weight"].shape == (0, 32)
    batch = random_batch(seed=3)
    losses = []
    for m in (model, small):
        m.train(mode == "train")
        torch.manual_seed(11)
        losses.append(loss_of(m, batch))
        losses[-1].backward()
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-5)


def test_count_parameters_counts_zero3_partitions_at_full_size():
    """A ZeRO-3 rank holds an empty placeholder per parameter (`numel()` 0) and the full size in
    `ds_numel`: the report's parameter count after the squeeze read 0 at ZeRO-3 on a GPU before."""
    layer = torch.nn.Linear(4, 3)
    layer.weight.data = torch.empty(0)
    layer.weight.ds_numel = 12
    assert count_parameters(layer) == 12 + 3


@pytest.mark.parametrize("mode", ["eval", "train_dropout_0", "train_dropout"])
def test_ffn_out_expand_is_fused_with_the_residual_add_unless_dropout_stands_between(mode):
    """FFN-out's block (`BertOutput`) becomes `ResidualExpandOutput` with the same children and
    state dict; without dropout between them the kept rows are added in place into residual + bias
    (`add`, `index_add_`), with dropout the expand comes first (`index_add`, `dropout`, `add`)."""
    from torch.profiler import ProfilerActivity, profile
    model, pruner = pruned("bert-mlm")
    small = pruner.squeeze()
    block = small.bert.encoder.layer[0].output
    assert type(block) is ResidualExpandOutput and isinstance(block.dense, SqueezedLinear)
    # the stock block's names (and the squeezed dense's kept rows): checkpoints and exports unchanged
    assert set(block.state_dict()) == {"dense.weight", "dense.bias", "dense.kept_rows", "LayerNorm.weight", "LayerNorm.bias"}
    block.train(mode != "eval")
    block.dropout.p = 0.1 if mode == "train_dropout" else 0.0
    hidden = torch.randn(2, 6, block.dense.in_features)
    residual = torch.randn(2, 6, block.dense.out_features)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        block(hidden, residual)
    width = [2, 6, block.dense.out_features]  # ops on full-width activations
    order = [event.name for event in sorted(prof.events(), key=lambda e: e.time_range.start)
             if event.input_shapes and event.input_shapes[0] == width
             and event.name in ("aten::add", "aten::index_add", "aten::index_add_", "aten::dropout")]
    fused = mode != "train_dropout"
    expected = ["aten::add", "aten::index_add_"] if fused else ["aten::index_add", "aten::dropout", "aten::add"]
    assert order == expected, order
