"""A rank that dies or hangs: the other stops with a clear error within dist_timeout_minutes, and the
job resumes after a restart (issue 11.4). Two real CPU ranks (gloo), started without a launcher
that would kill the survivor for us, so the survivor's own error is what is tested."""
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "launch"))
import fault_inject  # noqa: E402

pytestmark = pytest.mark.slow
CONFIG = ROOT / "launch/configs/demo.yaml"
TIMEOUT_MINUTES = 1


def free_port() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return str(probe.getsockname()[1])


def start_ranks(output_dir: Path, fault_log: Path, hang: str | None = None) -> list[subprocess.Popen]:
    """Two ranks of the small demo, each its own process with RANK/WORLD_SIZE set (no launcher)."""
    port = free_port()
    script = fault_inject.command(output_dir, 1, CONFIG, ["--dist_timeout_minutes", str(TIMEOUT_MINUTES),
                                                          "--data.cache_dir", str(output_dir.parent / "cache")])
    processes = []
    for rank in range(2):
        env = fault_inject.environment(fault_log, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                                       MASTER_ADDR="127.0.0.1", MASTER_PORT=port, **({"VP_FAULT_HANG": hang} if hang else {}))
        log = open(output_dir.parent / f"rank{rank}.log", "w")
        processes.append(subprocess.Popen(script, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))
    return processes


def point_time(fault_log: Path, rank: int, point: str) -> float:
    return next(t for t, r, _, name in fault_inject.read_points(fault_log) if r == rank and name == point)


def resume_and_finish(output_dir: Path) -> None:
    done = fault_inject.run_to_end(output_dir, 2, CONFIG, output_dir.parent / "resume.log",
                                   extra=["--data.cache_dir", str(output_dir.parent / "cache")])
    log = (output_dir.parent / "resume.log").read_text()
    assert done.returncode == 0, log[-3000:]
    assert "resumed from" in log and "at phase 0 step 4" in log
    assert (output_dir / "checkpoints" / "latest").read_text() == "step11"


def survivor_error(tmp_path: Path) -> str:
    return (tmp_path / "rank0.log").read_text()


def test_a_hung_rank_stops_the_other_within_the_timeout_and_the_job_resumes(tmp_path):
    output_dir, fault_log = tmp_path / "run", tmp_path / "points.log"
    rank0, rank1 = start_ranks(output_dir, fault_log, hang="step:5:1")  # after step 4's checkpoint
    try:
        rank0.wait(timeout=600)
        stopped = time.time()
        assert rank1.poll() is None, "rank 1 hangs: it is still running"
    finally:
        for process in (rank0, rank1):
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()
    hung = point_time(fault_log, 1, "step:5")
    log = survivor_error(tmp_path)
    assert rank0.returncode != 0
    assert "PeerFailure: rank 0: a collective with the other ranks failed" in log
    assert f"dist_timeout_minutes={TIMEOUT_MINUTES}" in log and "Re-run the same command to resume" in log
    # One step of rank 0's own work, then the collective's timeout, then the exit.
    assert stopped - hung < TIMEOUT_MINUTES * 60 + 45, stopped - hung
    assert stopped - hung > TIMEOUT_MINUTES * 60 - 5, "it waited for the timeout, not less"
    resume_and_finish(output_dir)


def test_a_killed_rank_stops_the_other_with_a_clear_error_and_the_job_resumes(tmp_path):
    output_dir, fault_log = tmp_path / "run", tmp_path / "points.log"
    rank0, rank1 = start_ranks(output_dir, fault_log)
    try:
        while not any(r == 1 and name == "step:5" for _, r, _, name in fault_inject.read_points(fault_log)):
            assert rank1.poll() is None, (tmp_path / "rank1.log").read_text()[-3000:]
            time.sleep(0.01)
        rank1.send_signal(signal.SIGKILL)
        killed = time.time()
        rank0.wait(timeout=TIMEOUT_MINUTES * 60 + 60)
        stopped = time.time()
    finally:
        for process in (rank0, rank1):
            if process.poll() is None:
                process.send_signal(signal.SIGKILL)
                process.wait()
    log = survivor_error(tmp_path)
    assert rank0.returncode != 0
    assert "PeerFailure: rank 0: a collective with the other ranks failed" in log
    assert stopped - killed < TIMEOUT_MINUTES * 60 + 45
    resume_and_finish(output_dir)
