"""SPEC 5 under ZeRO 1-3: the squeezed parameters replace the masked ones in a rebuilt engine; the
bytes per rank of weights, gradients and optimizer states fall with the pruned rows, Adam moments,
step count and LR schedule carry over, and training goes on computing the same function."""
import math

import pytest
import torch

from conftest import STAGES

pytestmark = pytest.mark.slow
KINDS = ("params", "gradients", "optimizer_states", "total")


def removed_elements(record) -> int:
    """Weight elements the final masks remove: pruned rows x input width, over all prunable layers."""
    shapes = list(record["layer_shapes"].values())
    masks = torch.split(record["final_kept"], [shape[0] for shape in shapes])
    return sum(int((~kept).sum()) * shape[1] for kept, shape in zip(masks, shapes))


@pytest.mark.parametrize("stage", STAGES)
def test_every_rank_shrinks_in_proportion_to_the_pruned_rows(stage, two_rank_train):
    for rank in range(two_rank_train["world_size"]):
        record = two_rank_train["ranks"][rank][stage, "squeeze"]
        fraction = removed_elements(record) / record["dense_numel"]
        assert 0.3 < fraction < 0.4  # half the encoder's weight rows, a third of this tiny model
        dense, squeezed = record["bytes_dense"], record["bytes_squeezed_after_step"]
        for kind in KINDS:
            implied = dense[kind] * fraction
            assert dense[kind] - squeezed[kind] >= 0.95 * implied, (rank, kind, dense[kind], squeezed[kind])


@pytest.mark.parametrize("stage", STAGES)
def test_prunable_layers_shrink_by_what_the_masks_imply(stage, two_rank_train):
    """Parameter + optimizer bytes of the prunable layers. ZeRO 1-2 cut one flat buffer into equal
    rank slices, so which rank holds which layer moves when the buffer shrinks: there the layers are
    summed over ranks (each rank's total is checked above); at stages 0 and 3 every rank holds its
    own share of every layer, and each rank is checked alone."""
    records = [two_rank_train["ranks"][rank][stage, "squeeze"] for rank in range(two_rank_train["world_size"])]
    shapes = records[0]["layer_shapes"]
    layer_elements = sum(math.prod(shape) + shape[0] for shape in shapes.values())  # weights + biases
    fraction = removed_elements(records[0]) / layer_elements

    def layer_bytes(record, key):
        return sum(counts["params"] + counts["optimizer_states"] for counts in record[key]["layers"].values())

    groups = [records] if stage in (1, 2) else [[record] for record in records]
    for group in groups:
        dense = sum(layer_bytes(record, "bytes_dense") for record in group)
        squeezed = sum(layer_bytes(record, "bytes_squeezed_after_step") for record in group)
        assert dense - squeezed >= 0.95 * dense * fraction, (dense, squeezed, fraction)


@pytest.mark.parametrize("stage", STAGES)
def test_squeezed_engine_keeps_training_with_finite_loss(stage, two_rank_train):
    record = two_rank_train["ranks"][0][stage, "squeeze"]
    masked = two_rank_train["ranks"][0][stage, "masked_nofold"]
    assert record["squeezed_at"] == 5
    assert all(math.isfinite(record["losses"][step]) for step in range(6, 9))
    assert record["global_steps"] == masked["global_steps"] == 8
    assert record["lr"] == masked["lr"]  # the scheduler went on from where it was


@pytest.mark.parametrize("stage", STAGES)
def test_squeezed_engine_continues_the_masked_training(stage, two_rank_train):
    """Without the FFN fold the squeezed model trains exactly like the masked one: only possible if
    every kept row's Adam moments, the bias correction step and the LR came along."""
    squeezed = two_rank_train["ranks"][0][stage, "squeeze_nofold"]
    masked = two_rank_train["ranks"][0][stage, "masked_nofold"]
    assert squeezed["squeezed_at"] == 5 and "squeezed_at" not in masked
    assert squeezed["losses"] == pytest.approx(masked["losses"], rel=1e-6)
    for name, value in masked["final_masked_view"].items():
        torch.testing.assert_close(squeezed["final_masked_view"][name], value, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("stage", STAGES)
def test_folded_squeeze_computes_the_masked_function(stage, two_rank_train):
    """With the fold, the first forward after the squeeze (step 6) gives the masked model's loss."""
    folded = two_rank_train["ranks"][0][stage, "squeeze"]["losses"]
    masked = two_rank_train["ranks"][0][stage, "masked_nofold"]["losses"]
    assert folded[6] == pytest.approx(masked[6], rel=1e-6)


@pytest.mark.parametrize("stage", STAGES)
def test_rebuild_carries_exact_masters_and_moments(stage, two_rank_train):
    """Right after the final pruning, the squeezed engine's fp32 masters and Adam moments (scattered
    back to masked shapes) equal bit for bit those of the same run left masked, on every rank."""
    for rank in range(two_rank_train["world_size"]):
        squeezed = two_rank_train["ranks"][rank][stage, "squeeze_nofold"]["at_final_pruning"]
        masked = two_rank_train["ranks"][rank][stage, "masked_nofold"]["at_final_pruning"]
        assert set(masked) == {"params", "exp_avg", "exp_avg_sq"}
        for kind, values in masked.items():
            assert set(squeezed[kind]) == set(values)
            for name, value in values.items():
                assert torch.equal(squeezed[kind][name], value), (rank, kind, name)
