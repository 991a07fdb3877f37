"""launch/slurm/pretrain.sbatch on a real one-node Slurm cluster, two CPU ranks per job.

The module fixture starts munged, slurmctld and slurmd with tests/slurm/start_local_slurm.sh
(installing Debian's slurm-wlm if it is missing) and stops them afterwards if it started them.
Each test submits the batch script with `VP_DEVICE=cpu`, waits for the job and checks what the
entry point left in its output directory.

Until launch/pretrain.py lands, the jobs run tests/slurm/standin_pretrain.py, which joins the
process group exactly as the entry point will and checks one all_reduce.
"""

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SBATCH_SCRIPT = REPO / "launch" / "slurm" / "pretrain.sbatch"
START_SCRIPT = REPO / "tests" / "slurm" / "start_local_slurm.sh"
STOP_SCRIPT = REPO / "tests" / "slurm" / "stop_local_slurm.sh"
ENTRY = "tests/slurm/standin_pretrain.py"
SLURM_DIR = Path(os.environ.get("VP_SLURM_DIR", "/tmp/vp-slurm"))
SLURM_CONF = SLURM_DIR / "slurm.conf"
SKIP_EXIT_CODE = 77  # start_local_slurm.sh: Slurm missing and apt cannot install it
TERMINAL_STATES = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY",
                   "BOOT_FAIL", "DEADLINE", "PREEMPTED"}
# The first job on a fresh machine also JIT-builds DeepSpeed's CPU shared-memory comm op (~1 min).
JOB_TIMEOUT_S = 150


def _slurm_env() -> dict:
    return {**os.environ, "SLURM_CONF": str(SLURM_CONF), "VP_SLURM_DIR": str(SLURM_DIR)}


def _cluster_answers() -> bool:
    if not SLURM_CONF.exists() or shutil.which("scontrol") is None:
        return False
    ping = subprocess.run(["scontrol", "ping"], env=_slurm_env(), capture_output=True, text=True)
    return ping.returncode == 0 and "UP" in ping.stdout


@pytest.fixture(scope="module")
def local_slurm():
    """A one-node Slurm cluster on this machine; yields the environment that talks to it."""
    if os.geteuid() != 0:
        pytest.skip("the local Slurm cluster needs root (apt-get, slurmd launching jobs)")
    already_up = _cluster_answers()
    start = subprocess.run(["bash", str(START_SCRIPT)], env=_slurm_env(), capture_output=True,
                           text=True, timeout=600)
    output = start.stdout + start.stderr
    if start.returncode == SKIP_EXIT_CODE:
        pytest.skip(f"apt-get could not install slurm-wlm:\n{output[-2000:]}")
    assert start.returncode == 0, f"start_local_slurm.sh failed ({start.returncode}):\n{output}"
    yield _slurm_env()
    if not already_up:
        subprocess.run(["bash", str(STOP_SCRIPT)], env=_slurm_env(), timeout=120)


def _job_record(job_id: str, env: dict) -> dict:
    shown = subprocess.run(["scontrol", "show", "job", "--oneliner", job_id], env=env,
                           capture_output=True, text=True, check=True)
    return dict(field.split("=", 1) for field in shown.stdout.split() if "=" in field)


def _submit_and_wait(env: dict, sbatch_args: list, script_args: list, job_env: dict) -> dict:
    """Submits the batch script from the repository root, polls until the job ends, returns
    its `scontrol show job` record. Polls itself: `sbatch --wait` backs off to ~10 s steps."""
    # conftest.py sets DS_ACCELERATOR=cpu for the whole session: drop it, so that what the job
    # sees is what the batch script set from VP_DEVICE.
    submit_env = {k: v for k, v in {**env, **job_env}.items() if k != "DS_ACCELERATOR"}
    submit = subprocess.run(["sbatch", "--parsable", *sbatch_args, str(SBATCH_SCRIPT), *script_args],
                            cwd=REPO, env=submit_env, capture_output=True, text=True)
    assert submit.returncode == 0, f"sbatch failed:\n{submit.stderr}"
    job_id = submit.stdout.strip().split(";")[0]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while True:
        record = _job_record(job_id, env)
        if record["JobState"] in TERMINAL_STATES:
            return record
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job_id], env=env)
            pytest.fail(f"job {job_id} still {record['JobState']} after {JOB_TIMEOUT_S}s")
        time.sleep(0.5)


@pytest.mark.slow
@pytest.mark.timeout(JOB_TIMEOUT_S + 60)
@pytest.mark.parametrize("launcher", ["srun", "torchrun"])
def test_two_cpu_ranks_complete_an_all_reduce(local_slurm, tmp_path, launcher):
    output_dir = tmp_path / "run"
    job_log = tmp_path / "job.out"
    record = _submit_and_wait(
        local_slurm,
        sbatch_args=[f"--job-name=vp-test-{launcher}", "--nodes=1", "--ntasks-per-node=2",
                     "--gpus-per-node=0", "--time=5", f"--output={job_log}"],
        script_args=["--output_dir", str(output_dir), "train.max_steps=1", "seed=7"],
        job_env={"VP_LAUNCHER": launcher, "VP_DEVICE": "cpu", "VP_ENTRY": ENTRY,
                 "PYTHON": sys.executable},
    )
    log = job_log.read_text() if job_log.exists() else "(no job log)"
    assert (record["JobState"], record["ExitCode"]) == ("COMPLETED", "0:0"), log

    result = json.loads((output_dir / "result.json").read_text())
    assert result["world_size"] == 2
    assert result["all_reduce_sum"] == result["expected_sum"] == 3.0
    assert result["backend"] == "gloo"
    assert result["overrides"] == ["train.max_steps=1", "seed=7"]

    node = record["NodeList"]
    ranks = [json.loads((output_dir / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["env"]["RANK"] for r in ranks] == ["0", "1"]
    assert [r["env"]["LOCAL_RANK"] for r in ranks] == ["0", "1"]
    assert {r["env"]["WORLD_SIZE"] for r in ranks} == {"2"}
    if launcher == "srun":
        # torchrun hands its workers the address of its own store instead.
        assert {r["env"]["MASTER_ADDR"] for r in ranks} == {node}
    assert {r["env"]["DS_ACCELERATOR"] for r in ranks} == {"cpu"}
    assert {r["env"]["SLURM_JOB_ID"] for r in ranks} == {record["JobId"]}


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed")
def test_slurm_scripts_pass_shellcheck():
    scripts = [SBATCH_SCRIPT, START_SCRIPT, STOP_SCRIPT]
    check = subprocess.run(["shellcheck", *map(str, scripts)], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout
