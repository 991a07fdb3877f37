"""`tensor_parallel` in the run config (issue 15, item 1): plumbed into DeepSpeed's AutoTP, the batch
split over data-parallel ranks only, and what is not implemented refused at config time."""
from __future__ import annotations

import json

import pytest

from test_cli import DEMO, ROOT
from vp_dist import cli
from vp_dist.train.config import load_run_config, read_deepspeed_config
from vp_dist.train.loop import deepspeed_config

ZERO2 = f"deepspeed_config={ROOT / 'ds_configs/zero2_cpu.json'}"
TP2 = ["tensor_parallel=2", "squeeze_at_target=false", ZERO2]


def test_tensor_parallel_with_squeeze_at_target_is_accepted_and_zero_tp_is_refused():
    config = load_run_config(DEMO, ["tensor_parallel=2", ZERO2])  # the squeeze under TP (issue 15 item 4)
    assert config.tensor_parallel == 2 and config.squeeze_at_target
    with pytest.raises(cli.ConfigError, match=r"tensor_parallel=0 must be >= 1"):
        load_run_config(DEMO, ["tensor_parallel=0", ZERO2])


def test_tensor_parallel_goes_into_the_deepspeed_config_and_the_batch_splits_over_dp_ranks():
    config = load_run_config(DEMO, TP2)  # demo: global_batch 32, micro_batch 8
    ds = deepspeed_config(config, 4)     # tp 2 x dp 2
    assert ds["tensor_parallel"]["autotp_size"] == 2
    assert ds["train_micro_batch_size_per_gpu"] == 8 and ds["gradient_accumulation_steps"] == 2
    assert "train_batch_size" not in ds  # DeepSpeed would check it against all 4 ranks
    assert deepspeed_config(load_run_config(DEMO, [ZERO2]), 4)["gradient_accumulation_steps"] == 1  # dp 4


def test_tensor_parallel_must_divide_the_world_and_the_batch_the_dp_ranks():
    config = load_run_config(DEMO, TP2)
    with pytest.raises(cli.ConfigError, match=r"tensor_parallel=2 does not divide world_size=3"):
        read_deepspeed_config(config, 3)
    read_deepspeed_config(config, 8)  # dp 4: 32 = 8 x 4
    with pytest.raises(cli.ConfigError, match=r"global_batch=32 is not a multiple of micro_batch=8 x data-parallel "
                                              r"ranks=8 \(world_size=16 / tensor_parallel=2\)"):
        read_deepspeed_config(config, 16)


def test_a_deepspeed_file_with_another_autotp_size_is_refused(tmp_path):
    ds_file = tmp_path / "ds.json"
    ds_file.write_text(json.dumps({"zero_optimization": {"stage": 1}, "tensor_parallel": {"autotp_size": 4}}))
    config = load_run_config(DEMO, ["tensor_parallel=2", "squeeze_at_target=false", f"deepspeed_config={ds_file}"])
    with pytest.raises(cli.ConfigError, match=r"tensor_parallel.autotp_size=4 differs from the run's tensor_parallel=2"):
        read_deepspeed_config(config, 4)


def test_zero3_under_tensor_parallelism_is_refused():
    config = load_run_config(DEMO, ["tensor_parallel=2", "squeeze_at_target=false",
                                    f"deepspeed_config={ROOT / 'ds_configs/zero3_cpu.json'}"])
    with pytest.raises(cli.ConfigError, match=r"zero_optimization.stage=3 with tensor_parallel=2 is not supported"):
        read_deepspeed_config(config, 4)
