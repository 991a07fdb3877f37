"""The README's main job (launch/demo.sh): squeezed model, heat map and report within 10 minutes."""
import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_ok

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_job_prunes_to_half_squeezes_and_reports_within_ten_minutes(tmp_path):
    # timeout=600 is the 10-minute bound: run_ok fails the test past it
    run_ok(["bash", str(ROOT / "launch/demo.sh"), str(tmp_path / "demo")], cwd=ROOT, timeout=600)
    out = tmp_path / "demo"
    report = json.loads((out / "vp_report.json").read_text())
    assert report["world_size"] == 2 and report["squeezed"] is True
    assert [e["target_sparsity"] for e in report["prune_events"]] == [0.1, 0.2, 0.3, 0.4, 0.5]
    for projection_type, fraction in report["prune_events"][-1]["sparsity"].items():
        assert abs(fraction - 0.5) < 0.01, projection_type
    assert report["parameters"]["after"] < report["parameters"]["before"]
    for before, after in zip(report["memory"]["before_squeeze"], report["memory"]["after_squeeze"]):
        assert after["total_bytes"] < before["total_bytes"]
    assert report["history"][-1]["phase"] == "nsp"
    assert all(torch.isfinite(torch.tensor([h["loss"] for h in report["history"]])))
    masks = load_file(str(out / "masks.safetensors"))
    assert len(masks) == 12
    png = (out / "sparsity_heatmap.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    assert "Memory per rank" in (out / "report.md").read_text()

    # The squeezed export fine-tunes on a GLUE-format task, end to end (issue 5 on the demo's model).
    run_ok(["python", str(ROOT / "launch/finetune.py"), "--task", "mrpc", "--model", str(out / "export_squeezed"),
            "--data_dir", str(ROOT / "tests/fixtures/glue/MRPC"), "--output_dir", str(tmp_path / "mrpc"),
            "--max_steps", "3", "--batch_size", "2", "--max_seq_len", "64", "--no-save_model", "--device", "cpu"],
           cwd=ROOT, timeout=300)
    metrics = json.loads((tmp_path / "mrpc" / "metrics.json").read_text())
    assert "f1" in json.dumps(metrics).lower()
