"""A single-process tiny BERT MLM run reaches 50% on schedule, squeezes, and keeps training."""
import math

import pytest

import torch

from helpers import loss_of, train
from models import random_batch, tiny_model
from vp_dist import VPConfig


def test_tiny_bert_mlm_run_reaches_target_on_schedule_then_squeezes_and_trains():
    model = tiny_model("bert-mlm")
    config = VPConfig(start=4, interval=3, increment=0.1, target=0.5)
    pruner, _, losses = train(model, config, steps=20, micro_batches=2)
    assert [e.step for e in pruner.events] == [4, 7, 10, 13, 16]
    for event, expected in zip(pruner.events, (0.1, 0.2, 0.3, 0.4, 0.5)):
        assert event.target_sparsity == expected
        for projection_type, rows in pruner.type_rows.items():
            assert event.sparsity[projection_type] == round(expected * rows.numel()) / rows.numel()
    assert all(math.isfinite(loss) for loss in losses)
    assert not pruner.collecting, "no statistics are gathered after the final pruning"

    small = pruner.squeeze()
    optimizer = torch.optim.AdamW(small.parameters(), lr=1e-3)
    small.train()
    for step in range(5):
        loss = loss_of(small, random_batch(seed=500 + step))
        loss.backward()
        optimizer.step(), optimizer.zero_grad()
        assert math.isfinite(loss.item())


def test_state_dict_round_trip_resumes_with_the_same_masks():
    config = VPConfig(start=3, interval=3, increment=0.25, target=0.5)
    full = tiny_model("bert-mlm", seed=1)
    pruner_full, _, _ = train(full, config, steps=7)

    # Same run, stopped after step 4 (between prunings) and resumed from saved state.
    part = tiny_model("bert-mlm", seed=1)
    pruner_part, optimizer, _ = train(part, config, steps=4)
    state = {"model": part.state_dict(), "optimizer": optimizer.state_dict(), "vp": pruner_part.state_dict(),
             "rng": torch.get_rng_state()}
    resumed = tiny_model("bert-mlm", seed=2)
    from vp_dist import VariancePruner
    pruner = VariancePruner(resumed, config)
    optimizer = torch.optim.AdamW(resumed.parameters(), lr=1e-3, weight_decay=0.01)
    resumed.load_state_dict(state["model"]), optimizer.load_state_dict(state["optimizer"])
    pruner.load_state_dict(state["vp"])
    torch.set_rng_state(state["rng"])  # dropout masks continue as in the uninterrupted run
    resumed.train()
    for step in range(4, 7):
        batch = random_batch(seed=100 * step)
        with pruner.observe(batch["attention_mask"]):
            loss_of(resumed, batch).backward()
        optimizer.step(), optimizer.zero_grad()
        pruner.step(optimizer)
    for name, kept in pruner_full.masks().items():
        assert torch.equal(kept, pruner.masks()[name]), name


def test_state_of_another_model_is_refused_before_loading():
    from vp_dist import VariancePruner
    small = VariancePruner(tiny_model("bert-mlm"), VPConfig())
    other = VariancePruner(tiny_model("bert-mlm", num_hidden_layers=3), VPConfig())
    with pytest.raises(ValueError, match="another model"):
        small.load_state_dict(other.state_dict())
    truncated = dict(small.state_dict())
    del truncated["meters"]
    with pytest.raises(ValueError, match="truncated"):
        small.load_state_dict(truncated)


def test_unknown_model_family_is_refused_clearly():
    from transformers import GPT2Config, GPT2LMHeadModel
    from vp_dist import VariancePruner
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50))
    with pytest.raises(ValueError, match="model_type='gpt2'.*supported"):
        VariancePruner(model, VPConfig())


def test_every_step_up_to_the_final_pruning_is_observed():
    """With interval=1 each pruning has exactly one observation: the step that triggers it."""
    model = tiny_model("bert-mlm")
    pruner, _, _ = train(model, VPConfig(start=1, interval=1, increment=0.25, target=0.5), steps=3)
    assert [e.step for e in pruner.events] == [1, 2]
    assert all(float(e.ewmv.max()) > 0 for e in pruner.events)
    assert pruner.sparsity() == {t: 0.5 for t in pruner.sparsity()}
