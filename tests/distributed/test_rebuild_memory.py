"""The squeeze never needs more memory than training did (BERT-base width, 6 layers, 2 CPU ranks,
ZeRO 1-3; `launch/rebuild_memory.py` measures the 12-layer shape for the README):
the peak resident set of each rank during the rebuild stays at or below the peak of the training
steps before it, and training after the squeeze peaks lower still."""
import pytest

from conftest import ON_GPU, ZERO_STAGES

MiB = 2 ** 20


@pytest.mark.slow
@pytest.mark.parametrize("stage", ZERO_STAGES)
def test_rebuild_peak_stays_within_the_training_peak(stage, two_rank_rebuild_memory):
    results = two_rank_rebuild_memory[stage]
    for rank in range(results["world_size"]):
        figures = results["ranks"][rank][stage, "memory"]
        assert figures["kind"] == ("cuda_max_memory_allocated" if ON_GPU else "cpu_peak_rss")
        assert figures["steps_after"] == 2
        before, rebuild, after = figures["steady_peak_before"], figures["rebuild_peak"], figures["steady_peak_after"]
        assert 300 * MiB < before < 6000 * MiB, before  # a BERT-base-width model was trained
        assert rebuild <= before, f"rank {rank}: rebuild {rebuild / MiB:.0f} MiB > training {before / MiB:.0f} MiB"
        assert after <= before, f"rank {rank}: after {after / MiB:.0f} MiB > before {before / MiB:.0f} MiB"
        assert figures["bytes_squeezed"] < 0.6 * figures["bytes_dense"]
        assert figures["rebuild_seconds"] > 0


def test_peak_window_sees_an_allocation_and_resets():
    """The measurement itself: a 256 MiB tensor written inside a window raises its peak by that much;
    a window opened after it is freed does not see it."""
    import torch

    from vp_dist.distributed.memory import peak_bytes, reset_peak
    if not reset_peak():
        pytest.skip("this kernel cannot reset the peak RSS (/proc/self/clear_refs)")
    start = peak_bytes()
    block = torch.ones(64 * MiB, dtype=torch.float32)  # 256 MiB, every page written
    inside = peak_bytes()
    del block
    reset_peak()
    after = peak_bytes()
    assert inside - start >= 250 * MiB
    assert after < inside - 200 * MiB
