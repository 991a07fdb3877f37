"""SPEC 1 collection: each forward pass counts once (activation checkpointing, reentrant or not,
and any forward inside backward are not observed), one collective per optimizer step waited at
first use, loss-scaler-skipped steps add no observation, and the hooks compile."""
import copy
import os
import sys

import numpy as np
import pytest
import torch

from helpers import run_ok
from models import random_batch, tiny_model
from vp_dist import VPConfig, VariancePruner
from vp_dist.distributed import reducer as reducer_module
from vp_dist.distributed.reducer import DataParallelReducer


def train_steps(model, pruner, steps=3, micro=2, lr=0.0):
    """Forward and backward inside `observe` (as checkpointing users write it), an SGD update."""
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    for step in range(steps):
        for k in range(micro):
            batch = random_batch(seed=10 * step + k, pad_from=(12, 8 - k, 3 + k))
            with pruner.observe(batch["attention_mask"]):
                model(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        pruner.step(optimizer)
    return pruner.statistics()


def tiny_training_model():
    return tiny_model("bert-mlm", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0).train()


@pytest.mark.parametrize("reentrant", [False, True])
def test_checkpointed_and_plain_runs_give_the_same_statistics(reentrant):
    plain = tiny_training_model()
    checkpointed = copy.deepcopy(plain)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    calls = {"n": 0}
    layer = checkpointed.bert.encoder.layer[0].attention.self.query
    layer.register_forward_hook(lambda *_: calls.__setitem__("n", calls["n"] + 1))
    config = VPConfig(start=100)
    want = train_steps(plain, VariancePruner(plain, config), lr=0.1)
    checkpointed_pruner = VariancePruner(checkpointed, config)
    got = train_steps(checkpointed, checkpointed_pruner, lr=0.1)
    assert calls["n"] == 2 * 3 * 2, "checkpointing must really recompute the layer in backward"
    for name in want:
        for a, b in zip(got[name], want[name]):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-9, msg=name)
    tokens = sum(int(random_batch(seed=10 * 2 + k, pad_from=(12, 8 - k, 3 + k))["attention_mask"].sum())
                 for k in range(2))
    assert float(checkpointed_pruner.meters.window_count[0]) > 0
    last_step_tokens = checkpointed_pruner._reduced_sums.counts[0]  # the last closed step's count
    assert float(last_step_tokens) == tokens


class ForwardInBackward(torch.autograd.Function):
    """Identity whose backward runs `layer` once more (any forward inside backward)."""

    @staticmethod
    def forward(ctx, x, layer):
        ctx.layer = layer
        return x.clone()

    @staticmethod
    def backward(ctx, grad):
        with torch.enable_grad():
            ctx.layer(torch.ones(1, 2, ctx.layer.in_features))
        return grad, None


def test_a_forward_run_inside_backward_is_not_observed():
    model = tiny_training_model()
    pruner = VariancePruner(model, VPConfig(start=100))
    layer = model.bert.encoder.layer[0].attention.self.query
    batch = random_batch(seed=3)
    with pruner.observe(batch["attention_mask"]):
        logits = model(**batch).logits
        ForwardInBackward.apply(logits, layer).sum().backward()
    assert float(pruner.step_sums.counts[0]) == float(batch["attention_mask"].sum())


class CountingReducer:
    def __init__(self):
        self.calls = []

    def sum_async(self, flat):
        self.calls.append(flat.numel())
        return None

    def check_identical(self, kept):
        pass


def test_one_collective_per_optimizer_step_whatever_the_micro_batches_and_layers():
    model = tiny_training_model()
    reducer = CountingReducer()
    pruner = VariancePruner(model, VPConfig(start=100), reducer=reducer)
    train_steps(model, pruner, steps=3, micro=3)
    layout = pruner.layout
    assert reducer.calls == [layout.num_layers + 2 * layout.total_rows] * 3


class FakeWork:
    def __init__(self, log):
        self.log = log

    def wait(self):
        self.log.append("wait")
        return True


def test_the_all_reduce_is_asynchronous_and_waited_before_its_sums_are_used(monkeypatch):
    """DataParallelReducer on a (pretend) 2-rank group: one async all-reduce per step, its handle
    waited once, after the next step's forward passes and before the meters read the sums."""
    log = []

    def all_reduce(tensor, op=None, group=None, async_op=False):
        log.append(("all_reduce", async_op))
        return FakeWork(log)

    monkeypatch.setattr(reducer_module.dist, "is_initialized", lambda: True)
    monkeypatch.setattr(reducer_module.dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(reducer_module.dist, "get_backend", lambda group=None: "gloo")  # CPU tensors
    monkeypatch.setattr(reducer_module.dist, "all_reduce", all_reduce)
    model = tiny_training_model()
    pruner = VariancePruner(model, VPConfig(start=100), reducer=DataParallelReducer())
    original = pruner.step_sums.accumulate
    pruner.step_sums.accumulate = lambda *a: (log.append("hook"), original(*a))
    pruner._reduced_sums.accumulate = pruner.step_sums.accumulate
    train_steps(model, pruner, steps=2, micro=2)  # ends by reading the statistics
    reduces = [entry for entry in log if entry != "hook"]
    assert reduces == [("all_reduce", True), "wait", ("all_reduce", True), "wait"]
    first_wait = log.index("wait")
    assert log[first_wait - 1] == "hook", "the first step's reduction overlaps the second step's compute"
    assert log[-2:] == [("all_reduce", True), "wait"], "reading the statistics waits for the last one"


class ScalerEngine:
    """What VariancePruner reads of a DeepSpeed engine: module, optimizer, global_steps and the
    loss scaler's verdict `was_step_applied()` (False: fp16 overflow, step skipped)."""

    def __init__(self, module):
        self.module, self.optimizer, self.global_steps, self.applied = module, None, 0, True

    def step(self, applied: bool):
        self.global_steps += 1
        self.applied = applied

    def was_step_applied(self) -> bool:
        return self.applied


class NoStore:
    def write_rows(self, *args, **kwargs):
        raise AssertionError("no pruning in this test")


def test_a_step_skipped_by_the_loss_scaler_adds_no_observation():
    model = tiny_model("bert-mlm").eval()
    engine = ScalerEngine(model)
    pruner = VariancePruner(engine, VPConfig(start=100), reducer=CountingReducer(), store=NoStore())
    reference_model = copy.deepcopy(model)
    reference = VariancePruner(reference_model, VPConfig(start=100))
    for step, applied in enumerate([True, False, True, False, False, True]):
        batch = random_batch(seed=step)
        with torch.no_grad(), pruner.observe(batch["attention_mask"]):
            model(**batch)
        engine.step(applied)
        pruner.step()
        if applied:
            with torch.no_grad(), reference.observe(batch["attention_mask"]):
                reference_model(**batch)
            reference.step()
    assert pruner.steps_done == reference.steps_done == 3 and pruner.skipped_steps == 3
    got, want = pruner.statistics(), reference.statistics()
    for name in want:
        assert torch.equal(got[name][0], want[name][0]) and torch.equal(got[name][1], want[name][1]), name


@pytest.mark.slow  # compiling takes 30 s (aot_eager) to minutes (inductor) on 2 busy cores
@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_a_compiled_model_gives_the_same_statistics_without_graph_breaks(backend):
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()
    eager = tiny_model("bert-mlm", num_hidden_layers=1, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0).train()
    compiled_model = copy.deepcopy(eager)
    want = train_steps(eager, VariancePruner(eager, VPConfig(start=100)), steps=3, micro=1)
    pruner = VariancePruner(compiled_model, VPConfig(start=100))
    compiled = torch.compile(compiled_model, backend=backend)
    got = train_steps(compiled, pruner, steps=3, micro=1)
    assert not torch._dynamo.utils.counters["graph_break"], dict(torch._dynamo.utils.counters["graph_break"])
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1
    for name in want:
        for a, b in zip(got[name], want[name]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


@pytest.mark.slow
def test_a_compiled_checkpointed_model_counts_each_forward_once():
    """Dynamo refuses the hooks' in-place update inside the checkpoint HOP (a side effect eager
    checkpointing would replay) and runs those blocks eagerly: the graph-task check then applies."""
    eager = tiny_model("bert-mlm", num_hidden_layers=1, hidden_dropout_prob=0.0,
                       attention_probs_dropout_prob=0.0).train()
    checkpointed = copy.deepcopy(eager)
    checkpointed.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    want = train_steps(eager, VariancePruner(eager, VPConfig(start=100)), steps=3, micro=1)
    pruner = VariancePruner(checkpointed, VPConfig(start=100))
    got = train_steps(torch.compile(checkpointed, backend="aot_eager"), pruner, steps=3, micro=1)
    for name in want:
        for a, b in zip(got[name], want[name]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7, msg=name)


OVERFLOW_STEPS = (1, 3)  # loss multiplied by inf: DeepSpeed's fp16 loss scaler skips these steps


@pytest.mark.slow
def test_deepspeed_fp16_steps_skipped_for_overflow_add_no_observation(tmp_path):
    """A real DeepSpeed fp16 engine (CPU accelerator, ZeRO-1, loss scaler): the statistics are those
    of the applied steps' forward passes only (brute force over the captured outputs)."""
    from test_stats import brute_force

    env = {**os.environ, "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.path.dirname(os.path.dirname(os.path.abspath(__file__)))}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    run_ok([sys.executable, os.path.abspath(__file__), str(tmp_path)], env=env, cwd=tmp_path, timeout=600)
    result = torch.load(tmp_path / "fp16.pt", weights_only=False)  # our own file: NumPy arrays inside
    assert result["applied"] == [step not in OVERFLOW_STEPS for step in range(6)]
    assert result["engine_skipped"] == result["pruner_skipped"] == len(OVERFLOW_STEPS)
    assert result["steps_done"] == 6 - len(OVERFLOW_STEPS)
    assert result["output_dtype"] == "torch.float16"
    for name, (mean, ewmv) in result["statistics"].items():
        steps = [result["captured"][step][name] for step in range(6) if result["applied"][step]]
        want_mean, want_ewmv = brute_force(steps, alpha=0.9)
        scale = max(np.abs(s).max() for s in steps)
        np.testing.assert_allclose(mean.numpy(), want_mean, rtol=1e-5, atol=1e-6 * scale, err_msg=name)
        np.testing.assert_allclose(ewmv.numpy(), want_ewmv, rtol=1e-4, atol=1e-6 * scale**2, err_msg=name)


def _fp16_worker(out_dir: str) -> None:
    import deepspeed

    from vp_dist import prepare_model
    from vp_dist.train.distributed_env import init_distributed

    from helpers import allow_fp16_on_cpu

    init_distributed()
    allow_fp16_on_cpu()  # DeepSpeed's CPU gate; torch computes fp16 on any CPU
    model = prepare_model(tiny_model("bert-mlm", hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0))
    config = {"train_micro_batch_size_per_gpu": 3, "gradient_accumulation_steps": 1, "steps_per_print": 10**9,
              "optimizer": {"type": "AdamW", "params": {"lr": 1e-3, "torch_adam": True}},
              "fp16": {"enabled": True, "initial_scale_power": 8}, "zero_optimization": {"stage": 1}}
    engine, *_ = deepspeed.initialize(model=model, model_parameters=model.parameters(), config=config)
    pruner = VariancePruner(engine, VPConfig(start=100))
    captured, applied, current, dtypes = [], [], {}, set()
    for layer in pruner.layers:
        def capture(module, inputs, output, name=layer.name):
            dtypes.add(str(output.dtype))
            current[name] = output.detach().reshape(-1, output.shape[-1])[current["valid"]].double().numpy()
        layer.module.register_forward_hook(capture)
    for step in range(6):
        batch = random_batch(seed=step)
        current.clear()
        current["valid"] = batch["attention_mask"].reshape(-1) == 1
        with pruner.observe(batch["attention_mask"]):
            loss = engine(**batch).loss
        if step in OVERFLOW_STEPS:
            loss = loss * float("inf")
        engine.backward(loss)
        engine.step()
        pruner.step()
        applied.append(engine.was_step_applied())
        captured.append({k: v for k, v in current.items() if k != "valid"})
    torch.save({"applied": applied, "engine_skipped": engine.skipped_steps, "pruner_skipped": pruner.skipped_steps,
                "steps_done": pruner.steps_done, "statistics": pruner.statistics(), "captured": captured,
                "output_dtype": dtypes.pop() if len(dtypes) == 1 else sorted(dtypes)}, f"{out_dir}/fp16.pt")


if __name__ == "__main__":  # run as a script, tests/ is first on sys.path
    _fp16_worker(sys.argv[1])
