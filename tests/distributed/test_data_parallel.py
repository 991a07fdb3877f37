"""SPEC 1, 3: statistics and masks depend on the global batch only, never on its split over
data-parallel ranks and micro-batches; all ranks hold the same masks, and a mismatch is caught."""
import pytest
import torch

from conftest import STAGES

pytestmark = pytest.mark.slow


def events_of(results, stage, rank=0):
    return results["ranks"][rank][stage, "squeeze"]["events"]


@pytest.mark.parametrize("stage", STAGES)
def test_one_rank_and_two_ranks_choose_the_same_rows(stage, one_rank_train, two_rank_train):
    one = one_rank_train["ranks"][0][stage, "squeeze"]
    for rank in range(two_rank_train["world_size"]):
        two = two_rank_train["ranks"][rank][stage, "squeeze"]
        assert list(one["events"]) == list(two["events"]) == [2, 5]
        for step in one["events"]:
            assert torch.equal(one["events"][step]["kept"], two["events"][step]["kept"]), f"step {step}"
        assert torch.equal(one["final_kept"], two["final_kept"])
        assert float((~two["final_kept"]).float().mean()) == pytest.approx(0.5, abs=0.01)


@pytest.mark.parametrize("stage", STAGES)
def test_one_rank_and_two_ranks_compute_the_same_statistics(stage, one_rank_train, two_rank_train):
    one, two = events_of(one_rank_train, stage), events_of(two_rank_train, stage)
    alive = torch.ones_like(one[2]["kept"])  # selection ranks the rows not pruned yet
    for step in sorted(one):
        for key in ("ewmv", "window_mean"):
            a, b = one[step][key][alive], two[step][key][alive]
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()),
                                       msg=lambda m: f"step {step} {key}: {m}")
        alive = one[step]["kept"]
    losses_one = one_rank_train["ranks"][0][stage, "squeeze"]["losses"]
    losses_two = two_rank_train["ranks"][0][stage, "squeeze"]["losses"]
    assert losses_one == pytest.approx(losses_two, rel=1e-5)


@pytest.mark.parametrize("stage", STAGES)
def test_every_rank_holds_the_same_masks_and_statistics(stage, two_rank_train):
    reference = events_of(two_rank_train, stage, rank=0)
    other = events_of(two_rank_train, stage, rank=1)
    for step in reference:
        for key in ("kept", "ewmv", "window_mean"):
            assert torch.equal(reference[step][key], other[step][key]), f"step {step} {key}"


def test_ranks_with_different_masks_are_named(two_rank_train):
    for rank in range(two_rank_train["world_size"]):
        error = two_rank_train["ranks"][rank]["mismatch_error"]
        assert error is not None, "differing masks must raise on every rank"
        assert "ranks [1]" in error and "2 of 448 rows" in error and "[3, 200]" in error
