"""launch/pretrain.py under DeepSpeed AutoTP, tp 2 on 2 ranks (issue 15, items 1 and 5; slow)."""
import json
import re

import pytest
import torch
from safetensors.torch import load_file

from test_pretrain_launch import launch

pytestmark = pytest.mark.slow


def test_two_rank_tensor_parallel_launch_prunes_and_exports_consolidated_weights(tmp_path):
    result = launch("torchrun", tmp_path / "run", extra=["--tensor_parallel", "2", "--squeeze_at_target", "false"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert "pruned rows are not all zero" not in result.stdout + result.stderr
    run = tmp_path / "run"
    report = json.loads((run / "vp_report.json").read_text())
    assert report["squeezed"] is False
    assert [event["step"] for event in report["prune_events"]] == [3, 6]
    assert all(abs(s - 0.5) < 0.02 for s in report["prune_events"][-1]["sparsity"].values())

    # The masked export holds full-size weights, assembled from the TP shards in global row order:
    # every pruned row is zero exactly where the (global) masks say, and no kept row is.
    weights = load_file(str(run / "export_masked" / "model.safetensors"))
    masks = load_file(str(run / "export_masked" / "masks.safetensors"))
    assert len(masks) == 12  # 2 blocks x 6 projections
    for name, kept in masks.items():
        weight = weights[f"{name}.weight"]
        assert weight.shape[0] == kept.numel()
        assert weight.shape[1] in (64, 128)  # whole: hidden_size 64, intermediate_size 128
        row_norms = weight.abs().amax(dim=1)
        assert torch.all(row_norms[~kept] == 0), name
        assert torch.all(row_norms[kept] > 0), name


def test_two_rank_tensor_parallel_launch_squeezes_into_balanced_shards_and_exports(tmp_path):
    """issue 15 item 4: the job squeezes under TP at the final pruning, trains on, checkpoints and exports."""
    result = launch("torchrun", tmp_path / "run", extra=["--tensor_parallel", "2"])
    assert result.returncode == 0, result.stderr[-3000:]
    run = tmp_path / "run"
    report = json.loads((run / "vp_report.json").read_text())
    assert report["squeezed"] is True
    assert [event["step"] for event in report["prune_events"]] == [3, 6]
    # the whole squeezed model's parameters (both TP ranks' shares, replicated ones once), as exported
    exported = re.search(r"squeezed export \(\w+, (\d+) parameters\)", result.stdout + result.stderr)
    assert report["parameters"]["after"] == int(exported.group(1)) < report["parameters"]["before"]
    before, after = report["memory"]["before_squeeze"], report["memory"]["after_squeeze"]
    assert len(before) == len(after) == 2
    for rank_before, rank_after in zip(before, after):  # each TP rank's bytes fall with the squeeze
        assert rank_after["total_bytes"] < rank_before["total_bytes"]
    assert max(r["total_bytes"] for r in after) - min(r["total_bytes"] for r in after) < 0.02 * after[0]["total_bytes"]

    weights = load_file(str(run / "export_masked" / "model.safetensors"))
    masks = load_file(str(run / "export_masked" / "masks.safetensors"))
    assert len(masks) == 12
    for name, kept in masks.items():  # full size again, gathered from both TP ranks' squeezed shards
        weight = weights[f"{name}.weight"]
        assert weight.shape[0] == kept.numel() and weight.shape[1] in (64, 128)
        row_norms = weight.abs().amax(dim=1)
        assert torch.all(row_norms[~kept] == 0), name
        assert torch.all(row_norms[kept] > 0), name
    assert (run / "export_squeezed" / "config.json").is_file()


def test_tensor_parallel_job_stopped_after_the_squeeze_resumes_and_ends_as_an_uninterrupted_one(tmp_path):
    """Stop two steps after the TP squeeze (step 8), re-run: the job rebuilds the balanced shards from
    the checkpoint and ends with the uninterrupted job's losses and export. Dropout off (the data
    order is restored, the dropout RNG is not)."""
    tp_no_dropout = ["--tensor_parallel", "2", "--model.overrides",
                     "{hidden_size: 64, num_attention_heads: 2, intermediate_size: 128,"
                     " hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}"]
    full = launch("torchrun", tmp_path / "full", extra=tp_no_dropout)
    assert full.returncode == 0, full.stderr[-3000:]
    part_dir = tmp_path / "part"
    cut = launch("torchrun", part_dir, extra=[*tp_no_dropout, "--stop_after", "8"])
    assert cut.returncode == 0, cut.stderr[-3000:]
    resumed = launch("torchrun", part_dir, extra=tp_no_dropout)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected = json.loads((tmp_path / "full" / "vp_report.json").read_text())
    report = json.loads((part_dir / "vp_report.json").read_text())
    assert report["squeezed"] is True
    losses = {entry["step"]: entry["loss"] for entry in report["history"]}
    after_resume = [entry for entry in expected["history"] if entry["step"] > 8]
    assert [entry["step"] for entry in after_resume] == [9, 10, 11]
    for entry in after_resume:
        assert losses[entry["step"]] == pytest.approx(entry["loss"], rel=1e-5), entry["step"]
    a = load_file(str(tmp_path / "full" / "export_masked" / "model.safetensors"))
    b = load_file(str(part_dir / "export_masked" / "model.safetensors"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-5, msg=name)
