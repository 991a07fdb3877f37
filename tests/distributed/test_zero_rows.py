"""SPEC 4 under ZeRO 0-3: a pruned row is exactly zero in the partitioned fp32 master, in the module's
low-precision copy and in both Adam moments, on every rank, right after the pruning and after
further steps; the bias of each newly pruned row holds the window mean."""
import pytest

from conftest import STAGES, ZERO_STAGES

pytestmark = pytest.mark.slow


def total_rows(record) -> int:
    return sum(shape[0] for shape in record["layer_shapes"].values())


def assert_rows_stay_zero(results, stage):
    for rank in range(results["world_size"]):
        record = results["ranks"][rank][stage, "squeeze"]
        assert sorted(record["checks"]) == [2, 3, 4]  # the pruning at 2, two more steps before the squeeze
        for step, check in record["checks"].items():
            assert check["pruned_rows"] == total_rows(record) // 4, (rank, step)
            for place in ("fp32", "module", "exp_avg", "exp_avg_sq"):
                assert check[place] == 0.0, f"rank {rank} step {step}: pruned rows of {place} not zero"
            assert check["kept_rows_nonzero"] == check["kept_rows"], "kept rows must keep their weights"


@pytest.mark.parametrize("stage", STAGES)
def test_pruned_rows_are_zero_everywhere_zero_keeps_them(stage, two_rank_train):
    assert_rows_stay_zero(two_rank_train, stage)


@pytest.mark.parametrize("stage", STAGES)
def test_pruned_biases_hold_the_window_mean_on_every_rank(stage, two_rank_train):
    for rank in range(two_rank_train["world_size"]):
        check = two_rank_train["ranks"][rank][stage, "squeeze"]["checks"][2]
        assert check["newly_pruned_rows"] == check["pruned_rows"] > 0
        assert check["bias_fp32_vs_mean"] < 1e-6
        assert check["bias_module_vs_mean"] < 1e-6


@pytest.mark.parametrize("stage", ZERO_STAGES)
def test_bf16_pruned_rows_are_zero_and_biases_hold_the_mean(stage, two_rank_bf16):
    assert_rows_stay_zero(two_rank_bf16, stage)
    for rank in range(two_rank_bf16["world_size"]):
        check = two_rank_bf16["ranks"][rank][stage, "squeeze"]["checks"][2]
        assert check["bias_fp32_vs_mean"] < 1e-6      # the fp32 master holds the mean
        assert check["bias_module_vs_mean"] < 2 ** -8  # the bf16 copy holds it rounded
