"""SPEC 4: pruned rows are zero, biases hold the window mean, AdamW moments are zero and stay zero."""
import torch

from helpers import loss_of, train
from models import random_batch, tiny_model
from vp_dist import VPConfig, VariancePruner


def test_prune_zeroes_rows_moves_mean_into_bias_and_zeroes_adam_moments():
    model = tiny_model("bert-mlm")
    config = VPConfig(start=3, interval=3, increment=0.25, target=0.5)
    pruner, optimizer, _ = train(model, config, steps=2)
    # Step 3 prunes: remember the window mean it will use.
    batch = random_batch(seed=999)
    with pruner.observe(batch["attention_mask"]):
        loss_of(model, batch).backward()
    optimizer.step(), optimizer.zero_grad()
    event = pruner.step(optimizer)
    assert event is not None and event.step == 3
    assert all(abs(s - 0.25) < 0.01 for s in event.sparsity.values())
    modules = dict(model.named_modules())
    for name, kept in pruner.masks().items():
        layer = modules[name]
        pruned = ~kept
        mean = dict(zip(pruner.masks(), pruner.layout.split(event.window_mean)))[name]
        assert pruned.any()
        assert torch.count_nonzero(layer.weight[pruned]) == 0
        torch.testing.assert_close(layer.bias[pruned].double(), mean[pruned], rtol=1e-6, atol=1e-7)
        state = optimizer.state[layer.weight]
        assert torch.count_nonzero(state["exp_avg"][pruned]) == 0
        assert torch.count_nonzero(state["exp_avg_sq"][pruned]) == 0
        assert torch.count_nonzero(layer.weight[kept]) > 0


def test_pruned_rows_stay_zero_over_further_steps_and_bias_keeps_training():
    model = tiny_model("bert-mlm")
    config = VPConfig(start=2, interval=2, increment=0.25, target=0.5)
    pruner, optimizer, losses = train(model, config, steps=8)
    modules = dict(model.named_modules())
    biases_before = {}
    for name, kept in pruner.masks().items():
        assert torch.count_nonzero(modules[name].weight[~kept]) == 0
        assert torch.count_nonzero(optimizer.state[modules[name].weight]["exp_avg"][~kept]) == 0
        biases_before[name] = modules[name].bias.detach().clone()
    assert all(torch.isfinite(torch.tensor(losses)))
    assert pruner.sparsity() == {t: 0.5 for t in pruner.sparsity()}
    # Two more steps: pruned rows' weights stay zero while their biases go on training.
    for step in (8, 9):
        batch = random_batch(seed=step)
        with pruner.observe(batch["attention_mask"]):
            loss_of(model, batch).backward()
        optimizer.step(), optimizer.zero_grad()
        pruner.step(optimizer)
    for name, kept in pruner.masks().items():
        assert torch.count_nonzero(modules[name].weight[~kept]) == 0, name
        assert not torch.equal(modules[name].bias[~kept], biases_before[name][~kept]), name


def test_layer_without_bias_gets_one_and_keeps_its_function():
    model = tiny_model("llama").eval()
    batch = random_batch()
    with torch.no_grad():
        before = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    pruner = VariancePruner(model, VPConfig())
    for layer in pruner.layers:
        assert layer.module.bias is not None and torch.count_nonzero(layer.module.bias) == 0
    with torch.no_grad():
        after = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    torch.testing.assert_close(before, after)


def test_pruning_without_observed_statistics_is_refused():
    model = tiny_model("bert-mlm")
    pruner = VariancePruner(model, VPConfig(start=1, interval=1, increment=0.5, target=0.5))
    try:
        pruner.step()
    except RuntimeError as error:
        assert "pruner.observe" in str(error)
    else:
        raise AssertionError("pruning with no statistics must be refused")
