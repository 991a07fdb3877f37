"""Storage faults: a full disk, an unwritable folder or a corrupted file never cost the last checkpoint
(issue 11.3); random kill -9 points resume to the uninterrupted result (issue 11.2)."""
import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vp_dist.distributed.checkpoint import (CHECKPOINT_VERSION, VP_FILE, _atomic_write, _manifest, read_vp_state,
                                            save_checkpoint)

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
import fault_inject  # noqa: E402

CONFIG = ROOT / "launch/configs/demo.yaml"


def fake_checkpoint(folder: Path) -> Path:
    """A checkpoint folder with a manifest, as save_checkpoint leaves it (no DeepSpeed needed)."""
    directory = folder / "step4"
    directory.mkdir(parents=True)
    (directory / "mp_rank_00_model_states.pt").write_bytes(bytes(range(256)) * 64)
    state = {"version": CHECKPOINT_VERSION, "pruner": {}, "squeeze": {}, "dp_world_size": 1, "zero_stage": 2,
             "manifest": _manifest(str(directory))}
    torch.save(state, directory / VP_FILE)
    (folder / "latest").write_text("step4")
    return directory / "mp_rank_00_model_states.pt"


def test_a_corrupted_checkpoint_file_is_refused_by_its_checksum(tmp_path):
    model_states = fake_checkpoint(tmp_path)
    assert read_vp_state(str(tmp_path))["tag"] == "step4"
    data = bytearray(model_states.read_bytes())
    data[1000] ^= 0x01  # one bit, same size: only the checksum can tell
    model_states.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"mp_rank_00_model_states.pt is corrupt: its SHA-256 differs"):
        read_vp_state(str(tmp_path))


def test_a_failed_atomic_write_leaves_neither_the_file_nor_a_temporary(tmp_path):
    (tmp_path / "latest").write_text("step4")

    def full_disk(path):
        Path(path).write_text("ste")
        raise OSError(28, "No space left on device", path)
    with pytest.raises(OSError):
        _atomic_write(str(tmp_path / "latest"), full_disk)
    assert (tmp_path / "latest").read_text() == "step4"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["latest"]


def test_the_checkpoint_latest_names_is_never_written_over(tmp_path):
    fake_checkpoint(tmp_path)
    with pytest.raises(ValueError, match="'step4' is the checkpoint `latest` names"):
        save_checkpoint(None, None, str(tmp_path), "step4")


# ------------------------------------------------------------------------------------ real runs
def run(output_dir: Path, *extra: str, env_extra=None, wrapper=None) -> subprocess.CompletedProcess:
    command = fault_inject.command(output_dir, 1, CONFIG, extra)
    if wrapper:
        command = [sys.executable, "-c", wrapper, *command[1:]]
    env = fault_inject.environment(output_dir.parent / "points.log", **(env_extra or {}))
    return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def stopped_at_step4(tmp_path_factory):
    """A 1-rank run of the small demo stopped after step 4: `latest` names step4."""
    output_dir = tmp_path_factory.mktemp("stopped") / "run"
    done = run(output_dir, "--stop_after", "4")
    assert done.returncode == 0, done.stderr[-3000:]
    assert (output_dir / "checkpoints" / "latest").read_text() == "step4"
    return output_dir


def copy_of(run_dir: Path, tmp_path: Path) -> Path:
    target = tmp_path / "run"
    shutil.copytree(run_dir, target, symlinks=True)
    return target


def mount_tmpfs(mount_point: Path, size_bytes: int) -> bool:
    mount_point.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(mount_point)],
                          capture_output=True)
    return done.returncode == 0


def checkpoints_on(mount_point: Path, output_dir: Path) -> None:
    shutil.copytree(output_dir / "checkpoints", mount_point / "checkpoints")
    shutil.rmtree(output_dir / "checkpoints")
    (output_dir / "checkpoints").symlink_to(mount_point / "checkpoints")


# Where no tmpfs can be mounted (not root): the same failure, injected into the child's writes.
ENOSPC_WRAPPER = """
import errno, runpy, sys, torch
save = torch.save
def save_or_full(obj, path, *args, **kwargs):
    if "step8" in str(path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))
    return save(obj, path, *args, **kwargs)
torch.save = save_or_full
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


@pytest.mark.slow
def test_a_full_disk_or_an_unwritable_folder_keeps_the_last_checkpoint(stopped_at_step4, tmp_path):
    output_dir = copy_of(stopped_at_step4, tmp_path)
    disk = tmp_path / "disk"
    size = sum(f.stat().st_size for f in (output_dir / "checkpoints").rglob("*") if f.is_file())
    mounted = mount_tmpfs(disk, size + size // 3)  # step4 fits, step8 does not
    try:
        if mounted:
            checkpoints_on(disk, output_dir)
            full = run(output_dir, "--stop_after", "8")
        else:
            full = run(output_dir, "--stop_after", "8", wrapper=ENOSPC_WRAPPER)
        assert full.returncode != 0
        assert "CheckpointWriteError" in full.stderr and "checkpoint step8 could not be written" in full.stderr
        assert "No space left on device" in full.stderr and "`latest` still names step4" in full.stderr
        assert (output_dir / "checkpoints" / "latest").read_text() == "step4"
        assert read_vp_state(str(output_dir / "checkpoints"))["tag"] == "step4"  # sizes and checksums hold

        if mounted:
            subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        else:
            (output_dir / "checkpoints").chmod(0o555)
        unwritable = run(output_dir, "--stop_after", "8")
        assert unwritable.returncode != 0
        assert "checkpoint step8 could not be written" in unwritable.stderr
        assert ("Read-only file system" if mounted else "Permission denied") in unwritable.stderr
        assert (output_dir / "checkpoints" / "latest").read_text() == "step4"
        assert read_vp_state(str(output_dir / "checkpoints"))["tag"] == "step4"

        # Space again: the run resumes from step4 and finishes.
        (output_dir / "checkpoints").unlink() if mounted else (output_dir / "checkpoints").chmod(0o755)
        if mounted:
            shutil.copytree(disk / "checkpoints", output_dir / "checkpoints")
    finally:
        if mounted:
            subprocess.run(["umount", str(disk)], check=True)
    resumed = run(output_dir)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resumed from" in resumed.stderr and "at phase 0 step 4" in resumed.stderr
    assert (output_dir / "checkpoints" / "latest").read_text() == "step11"


@pytest.mark.slow
def test_a_corrupted_checkpoint_is_refused_before_training_resumes(stopped_at_step4, tmp_path):
    output_dir = copy_of(stopped_at_step4, tmp_path)
    model_states = next((output_dir / "checkpoints" / "step4").glob("*model_states.pt"))
    data = bytearray(model_states.read_bytes())
    data[len(data) // 2] ^= 0xFF
    model_states.write_bytes(bytes(data))
    (tmp_path / "points.log").unlink(missing_ok=True)
    refused = run(output_dir)
    assert refused.returncode != 0
    assert f"{model_states} is corrupt: its SHA-256 differs" in refused.stderr
    assert not (tmp_path / "points.log").exists(), "no step ran"


@pytest.mark.slow
@pytest.mark.parametrize("ranks", [1, 2])
def test_kill_minus_9_at_random_points_resumes_to_the_uninterrupted_result(ranks, tmp_path):
    """A seeded kill per world size (inside a checkpoint write, inside the squeeze, or anywhere in
    training), followed by a restart; masks, statistics, losses and tokenizer equal bit for bit.
    (`launch/fault_inject.py --kills 20` runs many more: the README's 20 of 20.)"""
    reference = tmp_path / "reference"
    reference.mkdir()
    extra = ["--data.cache_dir", str(tmp_path / "cache")]
    done = fault_inject.run_to_end(reference / "run", ranks, CONFIG, reference / "output.log", extra=extra)
    assert done.returncode == 0, (reference / "output.log").read_text()[-3000:]
    expected, timings = fault_inject.outputs(reference / "run"), fault_inject.reference_timings(reference / "points.log")
    rng = random.Random(ranks)
    for index in range(1):
        plan = fault_inject.plan_kill(rng, timings)
        folder = tmp_path / f"kill{index}"
        folder.mkdir()
        last = fault_inject.run_and_kill(folder / "run", ranks, CONFIG, folder / "points.log", folder / "output.log",
                                         plan, extra)
        assert fault_inject.check_checkpoints(folder / "run", folder / "points.log", ranks) is None
        done = fault_inject.run_to_end(folder / "run", ranks, CONFIG, folder / "output.log", extra=extra)
        assert done.returncode == 0, (folder / "output.log").read_text()[-3000:]
        assert fault_inject.differences(expected, fault_inject.outputs(folder / "run")) == [], (plan, last)
