"""Collectives on the device the backend needs (NCCL: CUDA only), checked on CPU.

The slow test runs a real 2-rank pre-training job (prune, squeeze, checkpoint, NSP phase, export)
under `tests/distributed/collective_guard.py`, which declares that gloo needs the lazy device, as
NCCL needs CUDA: every collective vp_dist issues with a tensor left on the CPU fails the job.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from vp_dist.distributed import devices
from vp_dist.distributed.devices import collective_device, on_collective_device

ROOT = Path(__file__).resolve().parents[1]
GUARD = ROOT / "tests/distributed/collective_guard.py"

# Prunes at steps 3 and 6 (25%, 50%), squeezes at 6, checkpoints at 4 and the end, one NSP step.
TINY_RUN = [
    "--config", str(ROOT / "launch/configs/demo.yaml"), "--deepspeed_config", str(ROOT / "ds_configs/zero2_cpu.json"),
    "--model.config", "tiny", "--model.overrides", "{hidden_size: 64, num_attention_heads: 2, intermediate_size: 128}",
    "--data.vocab_size", "1024",
    "--phases", "[{name: mlm, objective: mlm, steps: 7, seq_len: 64, global_batch: 8, micro_batch: 2},"
                " {name: nsp, objective: mlm+nsp, steps: 1, seq_len: 96, global_batch: 4, micro_batch: 2, prune: false}]",
    "--vp", "{start: 3, interval: 3, increment: 0.25, target: 0.5}",
    "--log_every", "2", "--checkpoint_every", "4", "--warmup_steps", "2", "--render_report", "false",
]


def test_collective_device_is_cpu_without_a_process_group():
    assert not dist.is_initialized()
    assert collective_device() == torch.device("cpu")


def test_collective_device_follows_the_backend(monkeypatch):
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setitem(devices.BACKEND_DEVICES, "nccl", lambda: torch.device("meta"))
    for backend, expected in (("gloo", "cpu"), ("mpi", "cpu"), ("nccl", "meta"), ("cpu:gloo,cuda:nccl", "meta")):
        monkeypatch.setattr(dist, "get_backend", lambda group=None, backend=backend: backend)
        assert collective_device().type == expected, backend
    moved = on_collective_device(torch.ones(3))
    assert moved.device.type == "meta" and moved.shape == (3,)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    kept = torch.ones(3)
    assert on_collective_device(kept) is kept  # already there: no copy


@pytest.mark.slow
def test_two_rank_pretraining_puts_every_collective_on_the_backend_device(tmp_path):
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONPATH=str(ROOT), VP_GUARD_DEVICE="lazy",
               VP_GUARD_LOG=str(tmp_path / "guard"))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        env.pop(key, None)
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(GUARD),
               str(ROOT / "launch/pretrain.py"), *TINY_RUN, "--output_dir", str(tmp_path / "run")]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, (done.stdout[-3000:] + done.stderr[-6000:])
    for rank in (0, 1):
        checked = json.loads((tmp_path / "guard" / f"rank{rank}.json").read_text())
        for call in ("all_reduce <- vp_dist.distributed.reducer.sum_async",
                     "all_gather_into_tensor <- vp_dist.distributed.rebuild.take",
                     "all_reduce <- vp_dist.distributed.reducer.check_identical",
                     "all_gather <- vp_dist.train.artifacts._gather_window",
                     "all_reduce <- vp_dist.train.verify.pruned_rows_max_abs"):
            assert checked.get(call, 0) > 0, (rank, call, checked)
    report = json.loads((tmp_path / "run" / "vp_report.json").read_text())
    assert report["squeezed"] and [e["step"] for e in report["prune_events"]] == [3, 6]
    assert [entry["step"] for entry in report["pruned_rows"]] == [3, 6]
    for entry in report["pruned_rows"]:  # fp32 masters, Adam moments, module weights of every rank
        assert set(entry) == {"step", "module_weight", "fp32_master", "exp_avg", "exp_avg_sq"}
        assert all(value == 0.0 for key, value in entry.items() if key != "step"), entry
    # The window figures crossed the guard's lazy device and came back: global tokens are 2 ranks' worth.
    assert [h["step"] for h in report["history"]] == [2, 3, 4, 6, 8]
    assert all(h["tokens_per_s"] > 0 and h["tflops_per_gpu"] > 0 and h["peak_memory_bytes"] > 0
               for h in report["history"])
    mlm_tokens = 7 * 8 * 64  # packed MLM blocks have no padding; the NSP pairs have some
    assert mlm_tokens < report["throughput"]["tokens"] <= mlm_tokens + 4 * 96
