"""The README's main job (launch/demo.sh): squeezed model, heat map and report within 10 minutes."""
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from helpers import run_ok

ROOT = Path(__file__).resolve().parents[1]
MRPC = ROOT / "tests/fixtures/glue/MRPC"


def mrpc_scores_by_hand(model_dir: Path) -> dict[str, float]:
    """Accuracy and F1 of the paraphrase class (percent) of a saved classifier on the MRPC dev file."""
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    import vp_dist  # noqa: F401  registers the squeezed model type with the Auto classes

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForSequenceClassification.from_pretrained(model_dir).eval()
    with open(MRPC / "dev.tsv", newline="", encoding="utf-8") as rows:
        pairs = [(row["#1 String"], row["#2 String"], int(row["Quality"]))
                 for row in csv.DictReader(rows, delimiter="\t", quoting=csv.QUOTE_NONE)]
    hits = {"tp": 0, "fp": 0, "fn": 0, "correct": 0}
    for first, second, label in pairs:
        with torch.no_grad():
            predicted = int(model(**tokenizer(first, second, truncation=True, max_length=64,
                                              return_tensors="pt")).logits.argmax())
        hits["correct"] += predicted == label
        hits["tp"] += predicted == label == 1
        hits["fp"] += predicted == 1 and label == 0
        hits["fn"] += predicted == 0 and label == 1
    f1 = 2 * hits["tp"] / (2 * hits["tp"] + hits["fp"] + hits["fn"]) if hits["tp"] else 0.0
    return {"f1": 100 * f1, "accuracy": 100 * hits["correct"] / len(pairs)}


@pytest.mark.slow
def test_demo_job_prunes_to_half_squeezes_and_reports_within_ten_minutes(tmp_path):
    # timeout=600 is the 10-minute bound: run_ok fails the test past it
    # PYTHON: the demo runs with this interpreter, not whichever `python3` comes first on PATH
    run_ok(["bash", str(ROOT / "launch/demo.sh"), str(tmp_path / "demo")], cwd=ROOT, timeout=600,
           env={**os.environ, "PYTHON": sys.executable})
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
    run_ok([sys.executable, str(ROOT / "launch/finetune.py"), "--task", "mrpc", "--model", str(out / "export_squeezed"),
            "--data_dir", str(MRPC), "--output_dir", str(tmp_path / "mrpc"),
            "--max_steps", "3", "--batch_size", "2", "--max_seq_len", "64", "--device", "cpu"],
           cwd=ROOT, timeout=300)
    metrics = json.loads((tmp_path / "mrpc" / "metrics.json").read_text())
    assert metrics["task"] == "mrpc" and metrics["model_kind"] == "squeezed" and metrics["train"]["steps"] == 3
    assert metrics["eval"]["validation"] == pytest.approx(mrpc_scores_by_hand(tmp_path / "mrpc" / "model"))


def test_demo_refuses_to_delete_a_folder_it_did_not_write(tmp_path):
    """demo.sh replaces its output folder; a DIR the user names is deleted only when empty or an
    earlier demo's (.vp_demo), so a typo cannot wipe a real run. Nothing is launched here."""
    keep = tmp_path / "runs"
    (keep / "real_run").mkdir(parents=True)
    (keep / "real_run" / "model.bin").write_text("weights")
    for target, message in ((keep, "is not an earlier demo's output"),
                            (tmp_path / "no" / "such" / "demo", "demo.sh: no folder")):
        result = subprocess.run(["bash", str(ROOT / "launch/demo.sh"), str(target)], capture_output=True,
                                text=True, timeout=60, cwd=tmp_path)
        assert result.returncode == 2 and message in result.stderr, result.stderr
    assert (keep / "real_run" / "model.bin").read_text() == "weights"
