"""launch/bench_squeeze.py runs end to end (tiny shape) and reports times, FLOPs and memory."""
import json
import sys
from pathlib import Path

import pytest

from helpers import run_ok

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("masks", ["vp", "random"])
def test_bench_squeeze_reports_time_flops_and_memory(tmp_path, masks):
    out = tmp_path / "bench.json"
    run_ok([sys.executable, str(ROOT / "launch/bench_squeeze.py"), "--shape", "tiny", "--layers", "2",
            "--vocab", "500", "--batch", "2", "--seq", "16", "--eval-seq", "24", "--repeats", "1",
            "--warmup", "1", "--threads", "1", "--masks", masks, "--json", str(out)], cwd=ROOT)
    result = json.loads(out.read_text())
    assert result["kept_fraction_by_type"] == pytest.approx({t: 0.5 for t in result["kept_fraction_by_type"]},
                                                            abs=1e-9)
    for name in ("dense", "squeezed"):
        assert result["train_step_s"][name] > 0 and result["eval_latency_s"][name] > 0
    # AdamW in fp32: weight, gradient and two moments per parameter, 16 bytes, plus a step count each.
    parameters = result["parameters"]
    assert result["state_bytes"]["dense"] >= 16 * parameters["dense"]
    assert result["state_bytes"]["dense"] <= 16 * parameters["dense"] + 8 * 200
    assert result["state_bytes"]["squeezed"] < 0.8 * result["state_bytes"]["dense"]
    assert result["process_peak_rss_bytes"] > result["state_bytes"]["dense"]
    assert 0.1 < result["squeezed_over_dense_train_flops"] < 0.9
    assert result["train_flops"]["squeezed"] < result["train_flops"]["dense"]
