"""SPEC 4, 5 in bf16 and fp16 (DeepSpeed's loss scaler) at ZeRO 1-3, ZeRO-3 parameters really
partitioned: pruned rows are zero in the low-precision module weights, the fp32 masters and the
Adam moments, read on every rank's own partitions; the rebuild carries the exact fp32 masters, the
moments row by row and the loss scale, and keeps every setting of the model."""
import math

import pytest
import torch

from conftest import ZERO_STAGES


pytestmark = pytest.mark.slow
DTYPES = ("bf16", "fp16")
PRUNABLE_LAYERS = 12  # 2 blocks x (query, key, value, attention output, FFN in, FFN out)
PLACES = ("fp32", "module", "exp_avg", "exp_avg_sq", "local_module", "local_fp32", "local_exp_avg",
          "local_exp_avg_sq")
EMPTIED = ["bert.encoder.layer.0.output.dense", "bert.encoder.layer.1.attention.self.query"]  # worker.EMPTIED
STEPS = 8  # worker.STEPS
MODULE_BIAS_TOLERANCE = {"bf16": 2 ** -8, "fp16": 2 ** -10}  # the low-precision copy holds the mean rounded


@pytest.mark.parametrize("stage", ZERO_STAGES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_pruned_rows_are_zero_on_every_partition_in_half_precision(dtype, stage, two_rank_half):
    results = two_rank_half[dtype]
    for rank in range(results["world_size"]):
        record = results["ranks"][rank][stage, "squeeze"]
        assert sorted(record["checks"]) == [2, 3, 4]
        for step, check in record["checks"].items():
            assert check["pruned_rows"] > 0
            for place in PLACES:
                assert check[place] == 0.0, f"{dtype} rank {rank} step {step}: pruned rows of {place} not zero"
            assert check["kept_rows_nonzero"] == check["kept_rows"]
            if stage == 3:  # every prunable weight partitioned, none gathered and persistent
                assert check["partitioned_weights"] == PRUNABLE_LAYERS and check["gathered_weights"] == 0
                assert check["local_pruned_elements"] > 0, "this rank's partitions hold pruned rows to check"
        first = record["checks"][2]
        assert first["bias_fp32_vs_mean"] < 1e-6
        assert first["bias_module_vs_mean"] < MODULE_BIAS_TOLERANCE[dtype]


@pytest.mark.parametrize("stage", ZERO_STAGES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rebuild_carries_exact_masters_and_moments_in_half_precision(dtype, stage, two_rank_half):
    """Right after the final pruning the squeezed engine's fp32 masters and Adam moments, scattered
    back to masked shapes, equal bit for bit those of the same run left masked."""
    for rank in range(two_rank_half[dtype]["world_size"]):
        squeezed = two_rank_half[dtype]["ranks"][rank][stage, "squeeze_nofold"]
        masked = two_rank_half[dtype]["ranks"][rank][stage, "masked_nofold"]
        assert squeezed["squeezed_at"] == 5 and "squeezed_at" not in masked
        for kind, values in masked["at_final_pruning"].items():
            assert set(squeezed["at_final_pruning"][kind]) == set(values)
            for name, value in values.items():
                assert torch.equal(squeezed["at_final_pruning"][kind][name], value), (rank, kind, name)
        assert squeezed["losses"] == pytest.approx(masked["losses"], rel=5e-3)


@pytest.mark.parametrize("stage", ZERO_STAGES)
def test_rebuild_carries_the_fp16_loss_scale(stage, two_rank_half):
    """The loss scale grows from 2^8 every 2 steps: at the squeeze (step 5) it is 2^10, and the
    squeezed engine goes on from there exactly as the masked run's scaler does."""
    for rank in range(two_rank_half["fp16"]["world_size"]):
        squeezed = two_rank_half["fp16"]["ranks"][rank][stage, "squeeze"]
        masked = two_rank_half["fp16"]["ranks"][rank][stage, "masked_nofold"]
        before, after = squeezed["loss_scales"][5]
        assert before == after == 2 ** 10
        assert squeezed["loss_scales"] == masked["loss_scales"]
        assert squeezed["loss_scales"][8][1] > after  # and it keeps growing on the new engine


@pytest.mark.parametrize("stage", ZERO_STAGES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rebuilt_model_keeps_every_setting(dtype, stage, two_rank_half):
    record = two_rank_half[dtype]["ranks"][0][stage, "settings"]
    expected = {"layer_norms": ["StandInFusedLayerNorm"], "gradient_checkpointing": True,
                "blocks_checkpointing": [True], "attn_implementation": "eager",
                "dtypes": [{"bf16": "torch.bfloat16", "fp16": "torch.float16"}[dtype]]}
    assert record["settings_before"] == expected
    assert record["squeezed_at"] == 5
    assert record["settings_after"] == expected
    reference = two_rank_half[dtype]["ranks"][0][stage, "squeeze"]["losses"]
    assert record["losses"] == pytest.approx(reference, rel=5e-3)  # checkpointing, eager: same function


@pytest.mark.parametrize("stage", ZERO_STAGES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_rebuilt_engine_trains_layers_that_lost_every_row(dtype, stage, two_rank_half):
    """A layer pruned whole keeps zero-size weights, held as buffers (ZeRO-3 cannot partition an
    empty parameter). DeepSpeed casts parameters to its low precision, not buffers, and a GEMM
    refuses an fp32 weight with bf16 input even when it is empty: the rebuilt engine must hold every
    floating tensor in its dtype and go on training (this crashed the first GPU run)."""
    expected_dtype = {"bf16": "torch.bfloat16", "fp16": "torch.float16"}[dtype]
    for rank in range(two_rank_half[dtype]["world_size"]):
        record = two_rank_half[dtype]["ranks"][rank][stage, "emptied"]
        assert record["squeezed_at"] == 5
        assert record["emptied_after"] == sorted(EMPTIED)
        assert record["float_dtypes_after"] == [expected_dtype]
        assert sorted(record["losses"]) == list(range(1, STEPS + 1))
        assert all(math.isfinite(loss) for loss in record["losses"].values())
