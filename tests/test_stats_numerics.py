"""SPEC 1 numerics: shifted sums against a float64 two-pass reference on adversarial data,
variances clamped at 0, non-finite steps dropped whole (statistics and later masks as if the step
had not been observed), and loud warnings when a window drops many steps."""
import logging

import pytest
import torch

from models import random_batch, tiny_model
from vp_dist import VPConfig, VariancePruner
from vp_dist.stats import MeterLayout, MeterState, StepSums, update_meters

ALPHA = 0.9


def adversarial_outputs(steps: int, micro: int, tokens: int, dtype, seed: int = 0) -> list[list[torch.Tensor]]:
    """Outputs [tokens, 6] per micro-batch per step. Rows: mean 1e4 std 1e-2; mean -3e3 std 1e-3;
    near-constant (mean 1, std 1e-6); exactly constant 7.25; a drifting mean (0 -> 50 over the
    window, std 0.5); an ordinary neuron (mean 0, std 1)."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for step in range(steps):
        batches = []
        for _ in range(micro):
            noise = torch.randn(tokens, 6, generator=g, dtype=torch.float64)
            centre = torch.tensor([1e4, -3e3, 1.0, 7.25, 50.0 * step / steps, 0.0], dtype=torch.float64)
            scale = torch.tensor([1e-2, 1e-3, 1e-6, 0.0, 0.5, 1.0], dtype=torch.float64)
            batches.append((centre + scale * noise).to(dtype))
        out.append(batches)
    return out


def two_pass_reference(outputs: list[list[torch.Tensor]], valid: list[list[torch.Tensor]], alpha: float):
    """float64 two-pass SPEC 1 (eqs. 2-4) from the very values the hooks saw."""
    seen, ewmv = [], None
    for batches, masks in zip(outputs, valid):
        step = torch.cat([b.double()[m.bool()] for b, m in zip(batches, masks)])
        seen.append(step)
        mean = torch.cat(seen).mean(0)
        var = ((step - mean) ** 2).sum(0) / (step.shape[0] - 1)
        ewmv = var if ewmv is None else alpha * var + (1 - alpha) * ewmv
    return mean, ewmv


def collect(outputs, valid, alpha=ALPHA, shift_from_meters=True):
    """The pruner's collection loop without a model: StepSums filled per micro-batch, the meters
    updated one step behind (as the pruner's deferred reduction does), the shift taken from them."""
    layout = MeterLayout((6,))
    row_layer = layout.row_layer()
    state, filling, closed = MeterState.zeros(layout, "cpu"), StepSums(layout, "cpu"), StepSums(layout, "cpu")
    pending = shift_known = False
    for batches, masks in zip(outputs, valid):
        for rows, mask in zip(batches, masks):
            filling.accumulate(0, rows, mask.float(), mask.sum())
        if pending:
            update_meters(state, closed, row_layer, alpha)
            shift_known = True
        filling, closed, pending = closed, filling, True
        filling.begin(state.shift if shift_from_meters else torch.zeros(6),
                      centre_each_batch=shift_from_meters and not shift_known)
    update_meters(state, closed, row_layer, alpha)
    return state.window_mean(row_layer), state.ewmv, state


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_large_offsets_and_near_constant_neurons_match_the_two_pass_reference(dtype):
    outputs = adversarial_outputs(steps=200, micro=2, tokens=64, dtype=dtype)
    g = torch.Generator().manual_seed(1)
    valid = [[(torch.rand(64, generator=g) > 0.2).long() for _ in batches] for batches in outputs]
    mean, ewmv, _ = collect(outputs, valid)
    want_mean, want_ewmv = two_pass_reference(outputs, valid, ALPHA)
    # fp32 sums of shifted values: the mean is exact to fp32 precision of each row's spread around it.
    spread = torch.stack([(torch.cat(b).double() - want_mean).abs().amax(0) for b in outputs]).amax(0)
    assert bool(((mean - want_mean).abs() <= 1e-7 * spread + 1e-12 * want_mean.abs()).all()), mean - want_mean
    # The true variances span 1e-12 (std 1e-6) to 1: each row within 1e-3 of its own value.
    torch.testing.assert_close(ewmv, want_ewmv, rtol=1e-3, atol=1e-18)
    assert float(ewmv[3]) == 0.0  # the exactly constant neuron


def test_unshifted_sums_lose_the_near_constant_neurons():
    """The same data accumulated around 0 (what the one-pass y, y^2 sums did) misses the variance
    of the large-offset rows by orders of magnitude: the shift is what the test above checks."""
    outputs = adversarial_outputs(steps=20, micro=2, tokens=64, dtype=torch.float32)
    valid = [[torch.ones(64, dtype=torch.long) for _ in batches] for batches in outputs]
    _, ewmv, _ = collect(outputs, valid, shift_from_meters=False)
    _, want_ewmv = two_pass_reference(outputs, valid, ALPHA)
    relative_error = ((ewmv - want_ewmv).abs() / want_ewmv)[:2]
    assert bool((relative_error > 0.1).all()), relative_error


def test_variance_that_rounds_below_zero_is_clamped_to_zero():
    layout = MeterLayout((2,))
    state, sums = MeterState.zeros(layout, "cpu"), StepSums(layout, "cpu")
    sums.counts[0] = 4.0
    sums.sum.copy_(torch.tensor([2.0, 0.0], dtype=torch.float64))
    sums.sum_sq.copy_(torch.tensor([1.0 - 1e-12, 0.0], dtype=torch.float64))  # < sum^2 / m = 1
    update_meters(state, sums, layout.row_layer(), ALPHA)
    assert state.ewmv.tolist() == [0.0, 0.0]


# ---------------------------------------------------------------------- non-finite observations
POISON = {"nan": float("nan"), "inf": float("inf"), "-inf": float("-inf")}


def poison_layer(model, module_name: str, value: float, when: set, counter: dict):
    """A forward hook writing `value` into one output of `module_name` on the forward passes in `when`."""
    def hook(module, inputs, output):
        counter["n"] += 1
        if counter["n"] in when:
            output = output.clone()
            output[0, 0, 0] = value
            return output
    return dict(model.named_modules())[module_name].register_forward_hook(hook, prepend=True)  # before the pruner


def run(poisoned_steps: set, skipped_steps: set, value: float = float("nan"), steps: int = 6,
        config: VPConfig | None = None):
    """Forward passes (no training) over `steps` steps of 2 micro-batches. Poisoned steps corrupt one
    output of the first layer's second micro-batch; skipped steps run their forwards unobserved."""
    model = tiny_model("bert-mlm").eval()
    config = config or VPConfig(start=4, interval=2, increment=0.25, target=0.5)
    pruner = VariancePruner(model, config)
    name = pruner.layers[0].name
    counter = {"n": 0}
    handle = poison_layer(model, name, value, {2 * s + 2 for s in poisoned_steps}, counter)
    events, stats = [], []
    for step in range(steps):
        for micro in range(2):
            batch = random_batch(seed=10 * step + micro, pad_from=(12, 9, 5))
            with torch.no_grad():
                if step in skipped_steps:
                    model(**batch)
                    continue
                with pruner.observe(batch["attention_mask"]):
                    model(**batch)
        event = pruner.step()
        if event is not None:
            events.append(event)
        stats.append(pruner.statistics())
    handle.remove()
    return pruner, events, stats, name


@pytest.mark.parametrize("value", list(POISON))
def test_a_poisoned_step_leaves_statistics_and_masks_as_if_it_was_not_observed(value, caplog):
    with caplog.at_level(logging.WARNING, logger="vp_dist"):
        poisoned, poisoned_events, poisoned_stats, name = run({2}, set(), POISON[value])
    clean, clean_events, clean_stats, _ = run(set(), {2})
    for step, (got, want) in enumerate(zip(poisoned_stats, clean_stats)):
        for layer in want:
            for a, b in zip(got[layer], want[layer]):
                assert bool(torch.isfinite(a).all()), f"step {step} {layer} not finite"
                assert torch.equal(a, b), f"step {step} {layer}"
    assert [e.step for e in poisoned_events] == [e.step for e in clean_events] == [4, 6]
    for got, want in zip(poisoned_events, clean_events):
        assert got.kept_rows == want.kept_rows
    assert torch.equal(poisoned.kept, clean.kept)
    assert poisoned_events[0].dropped_steps == 1 and poisoned_events[1].dropped_steps == 0
    assert poisoned.dropped.total == 1
    dropped = [r.getMessage() for r in caplog.records if "non-finite statistics" in r.getMessage()]
    assert len(dropped) == 1 and "step 3" in dropped[0] and name in dropped[0]


def test_a_poisoned_step_differs_from_a_clean_one():
    """Control for the test above: the poisoned step's clean values do change the statistics."""
    _, _, observed, _ = run(set(), set())
    _, _, skipped, _ = run(set(), {2})
    layer = next(iter(observed[2]))
    assert not torch.equal(observed[2][layer][1], skipped[2][layer][1])


def test_more_dropped_steps_than_the_threshold_in_a_window_warn_loudly(caplog):
    config = VPConfig(start=5, interval=1, increment=0.5, target=0.5, warn_dropped_steps=2)
    with caplog.at_level(logging.ERROR, logger="vp_dist"), pytest.warns(RuntimeWarning, match="3 steps"):
        pruner, events, _, _ = run({0, 1, 3}, set(), steps=5, config=config)
    assert events[0].dropped_steps == 3 and pruner.dropped.total == 3
    assert any("warn_dropped_steps=2" in r.getMessage() for r in caplog.records if r.levelno == logging.ERROR)


def test_two_dropped_steps_under_the_threshold_do_not_warn(recwarn):
    config = VPConfig(start=5, interval=1, increment=0.5, target=0.5, warn_dropped_steps=2)
    pruner, events, _, _ = run({0, 3}, set(), steps=5, config=config)
    assert events[0].dropped_steps == 2
    assert not [w for w in recwarn if issubclass(w.category, RuntimeWarning) and "dropped" in str(w.message)]


def test_a_pruning_refuses_to_rank_a_non_finite_variance():
    """Meters cannot become non-finite through observations (above); a corrupted state is refused."""
    pruner, _, _, _ = run(set(), set(), steps=3)
    state = pruner.state_dict()
    state["meters"]["ewmv"][5] = float("nan")
    pruner.load_state_dict(state)
    with pytest.raises(RuntimeError, match="non-finite"):
        pruner.step()
