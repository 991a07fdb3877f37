"""The time-limit hook (vp_dist/train/preemption.py): a signal or the stop file stops every rank at
the same step. The Slurm path end to end is tests/test_slurm.py."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from vp_dist.train.preemption import STOP_FILE_ENV, StopRequest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def restore_sigusr1():
    previous = signal.getsignal(signal.SIGUSR1)
    yield
    signal.signal(signal.SIGUSR1, previous)


def test_sigusr1_only_sets_a_flag_that_due_reports(restore_sigusr1, monkeypatch):
    monkeypatch.delenv(STOP_FILE_ENV, raising=False)
    stop = StopRequest()
    assert stop.due() is False
    os.kill(os.getpid(), signal.SIGUSR1)  # would end the process without the handler
    assert stop.requested and stop.due() is True


def test_the_stop_file_is_a_request_too(restore_sigusr1, monkeypatch, tmp_path):
    flag = tmp_path / "stop"
    monkeypatch.setenv(STOP_FILE_ENV, str(flag))
    stop = StopRequest()
    assert stop.due() is False
    flag.touch()
    assert stop.due() is True


WORKER = textwrap.dedent("""\
    import json, os, signal, sys, time
    import torch.distributed as dist
    sys.path.insert(0, {root!r})
    from vp_dist.train.preemption import StopRequest
    stop = StopRequest()
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    stopped_at = None
    for step in range(1, 50):
        if rank == 1 and step == 5:
            os.kill(os.getpid(), signal.SIGUSR1)  # only rank 1 is told
        time.sleep(0.01 * (rank + 1))  # ranks out of step, as real ones are
        if stop.due():
            stopped_at = step
            break
    print(json.dumps({{"rank": rank, "stopped_at": stopped_at}}), flush=True)
    dist.barrier()  # as the loop does after its checkpoint: no rank tears gloo down under another
    dist.destroy_process_group()
""")


@pytest.mark.slow
def test_ranks_agree_on_the_step_when_only_one_was_signalled(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(WORKER.format(root=str(ROOT)))
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", STOP_FILE_ENV)}
    result = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                             str(script)], capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    # The two ranks share torchrun's stdout: their lines can run together, so read every object.
    rows = [json.loads(obj) for obj in re.findall(r"\{\"rank\"[^{}]*\}", result.stdout)]
    assert sorted(row["rank"] for row in rows) == [0, 1]
    assert {row["stopped_at"] for row in rows} == {5}
