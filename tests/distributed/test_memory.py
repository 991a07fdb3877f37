"""Every rank really holds less after the squeeze, measured two ways that do not go through
`partition_bytes` (whose gradient figure is derived from partition sizes):

- `held_tensor_bytes`: the storages each rank's engine references (module, flat fp32 partitions,
  optimizer state, gradient partitions and buckets), walked from the engine's objects and counted
  once each, after every backward of a step;
- the process's peak RSS over a whole training step (VmHWM, reset before the step after the C heap
  has handed freed pages back), and whether the dense engine's tensors are freed at all.

A small BERT (hidden 512, 4 layers, 12.6M parameters) so that the state dwarfs allocator noise;
50% of the rows pruned and squeezed at step 2; measured at step 2 (dense) and step 4 (squeezed).
"""
import pytest

from conftest import ZERO_STAGES

pytestmark = pytest.mark.slow
MIB = 2 ** 20
STATE_KINDS = ("params_lp", "params_fp32", "optimizer_states")
ZERO3_ALIVE = pytest.mark.xfail(
    strict=True, reason="ZeRO-3: DeepSpeed 0.19 keeps a destroyed stage-3 engine's Python objects alive; the "
                        "rebuild frees their storages instead (the process does shrink: the peak test passes)")
ZERO3_GATHERED = pytest.mark.xfail(
    strict=True, reason="ZeRO-3 after the rebuild: the three embedding matrices stay gathered between backward "
                        "and the optimizer step (83,456 values here), which partition_bytes does not count")
STAGES_FREED = [pytest.param(stage, marks=ZERO3_ALIVE) if stage == 3 else stage for stage in ZERO_STAGES]
STAGES_COUNTED = [pytest.param(stage, marks=ZERO3_GATHERED) if stage == 3 else stage for stage in ZERO_STAGES]


def records(two_rank_memory, stage):
    return [ranks[stage, "held"] for ranks in two_rank_memory["ranks"]]


def largest_held(measurement: dict, kind: str) -> int:
    """The most bytes of `kind` held after any backward of the step (gradients peak at different
    points: stage 1 holds full gradients until the boundary's reduction, stages 2-3 partitions)."""
    return max(held[kind] for held in measurement["held"])


@pytest.mark.parametrize("stage", STAGES_COUNTED)
def test_measured_tensors_are_what_partition_bytes_counts(stage, two_rank_memory):
    for rank, record in enumerate(records(two_rank_memory, stage)):
        assert record["squeezed_at"] == 2 and record["squeezed_numel"] < 0.5 * record["dense_numel"]
        for moment in ("dense", "squeezed"):
            counted, measured = record[moment]["partition"], record[moment]
            for kind in STATE_KINDS:  # the same tensors, found by walking the engine instead of by name
                assert largest_held(measured, kind) == pytest.approx(counted[kind], rel=0.01), (rank, moment, kind)
            # what holds gradients also holds reduce buckets: at least what partition_bytes counts
            assert largest_held(measured, "gradients_and_buffers") >= counted["gradients"], (rank, moment)


@pytest.mark.parametrize("stage", ZERO_STAGES)
def test_measured_tensors_fall_by_what_partition_bytes_says(stage, two_rank_memory):
    for rank, record in enumerate(records(two_rank_memory, stage)):
        dense, squeezed = record["dense"], record["squeezed"]
        counted_drop = dense["partition"]["total"] - squeezed["partition"]["total"]
        measured_drop = largest_held(dense, "total") - largest_held(squeezed, "total")
        assert counted_drop > 0.4 * dense["partition"]["total"], (rank, counted_drop)
        assert measured_drop == pytest.approx(counted_drop, rel=0.05), (rank, measured_drop / MIB, counted_drop / MIB)


@pytest.mark.parametrize("stage", STAGES_FREED)
def test_dense_engine_state_is_freed_after_the_squeeze(stage, two_rank_memory):
    for rank, record in enumerate(records(two_rank_memory, stage)):
        assert record["old_state_tensors"] > 0
        assert record["old_state_tensors_alive"] == 0, (rank, record["old_state_tensors_alive"])


@pytest.mark.parametrize("stage", ZERO_STAGES)
def test_process_peak_memory_falls_by_at_least_the_counted_bytes(stage, two_rank_memory):
    """Peak RSS over a training step holds the whole state plus transients (activations, full or
    bucketed gradients) that shrink with the model too, so it falls by at least the counted bytes;
    0.8 leaves the allocator's noise (tens of MiB at most here) room, a leaked dense engine does not."""
    for rank, record in enumerate(records(two_rank_memory, stage)):
        dense, squeezed = record["dense"], record["squeezed"]
        counted_drop = dense["partition"]["total"] - squeezed["partition"]["total"]
        peak_drop = dense["peak_rss"] - squeezed["peak_rss"]
        assert peak_drop >= 0.8 * counted_drop, (rank, peak_drop / MIB, counted_drop / MIB)
