"""Real multi-process DeepSpeed runs on CPU (gloo), shared by the tests of this folder.

Each fixture launches `worker.py` once with `torchrun --standalone --nproc_per_node N` and loads
what rank 0 saved: `{"world_size": N, "ranks": [per-rank results]}`, per-rank results keyed by
`(zero_stage, variant or checkpoint tag)`. The fixtures are session-scoped: one launch serves every
test that asserts on it, and none runs unless a slow test asks for it.

`VP_DIST_TEST_DEVICE=cuda` runs the same workers on the GPUs (DeepSpeed's CUDA accelerator, NCCL,
at most one process per GPU, bf16 DeepSpeed configs for the memory runs), for `launch/gpu_check.sh`:
    VP_DIST_TEST_DEVICE=cuda pytest -q tests/distributed/test_mixed_precision.py \
        tests/distributed/test_rebuild_memory.py
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "worker.py")
TP_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tp_worker.py")
TP_SQUEEZE_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "tp_squeeze_worker.py")
STAGES = (0, 1, 2, 3)  # 0: plain data parallelism, DeepSpeed without ZeRO
ZERO_STAGES = (1, 2, 3)  # bf16 needs ZeRO: stage 0 in bf16 is refused
LAUNCH_TIMEOUT_S = 420
TIMINGS: dict[str, float] = {}
ON_GPU = os.environ.get("VP_DIST_TEST_DEVICE", "cpu") == "cuda"


def launch(name: str, nproc: int, out_dir, *args: str, worker: str = WORKER) -> dict:
    """Run `worker` (worker.py) on `nproc` processes; returns rank 0's results. Fails with the output tail."""
    out = os.path.join(out_dir, f"{name}.pt")
    env = {**os.environ, "DS_ACCELERATOR": "cuda" if ON_GPU else "cpu", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "PYTHONWARNINGS": "ignore", "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}
    if ON_GPU:
        nproc = min(nproc, torch.cuda.device_count())
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
               worker, *args, "--out", out]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                          timeout=LAUNCH_TIMEOUT_S)
    TIMINGS[name] = time.perf_counter() - started
    if done.returncode != 0 or not os.path.isfile(out):
        lines = [line for line in done.stdout.splitlines() if "Warning" not in line and "warn(" not in line]
        pytest.fail(f"{name}: worker exited with {done.returncode}\n" + "\n".join(lines[-80:]), pytrace=False)
    return torch.load(out, weights_only=False)


@pytest.fixture(scope="session")
def runs_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("vp_distributed")


@pytest.fixture(scope="session")
def checkpoint_dir(runs_dir):
    return os.path.join(runs_dir, "checkpoints")


@pytest.fixture(scope="session")
def one_rank_train(runs_dir):
    """1 process, one micro-batch per step; squeeze + fold at the target."""
    return launch("train_1rank", 1, runs_dir, "train", "--stages", *map(str, STAGES))


@pytest.fixture(scope="session")
def two_rank_train(runs_dir, checkpoint_dir):
    """2 processes x 2 accumulated micro-batches per step. Variants: squeeze + fold + attention
    shrink (checkpoints at steps 3 and 6), squeeze without fold or shrink, squeeze with the
    attention shrink alone, masked without squeeze (the reference of the rebuild); a model two of
    whose layers lose every row (a whole query layer among them), squeezed and left masked; the
    first with `pad_ffn=12` (checkpoints at steps 3 and 6 as well)."""
    return launch("train_2rank", 2, runs_dir, "train", "--stages", *map(str, STAGES), "--ckpt_dir", checkpoint_dir,
                  "--variants", "squeeze", "squeeze_nofold", "shrink_nofold", "masked_nofold", "emptied",
                  "emptied_masked", "squeeze_padded")


@pytest.fixture(scope="session")
def two_rank_resume(runs_dir, checkpoint_dir, two_rank_train):
    """Fresh 2-process jobs resumed from the 2-rank checkpoints of step 3 and step 6."""
    return launch("resume_2rank", 2, runs_dir, "resume", "--stages", *map(str, STAGES),
                  "--ckpt_dir", checkpoint_dir, "--tags", "step3", "step6")


@pytest.fixture(scope="session")
def two_rank_resume_padded(runs_dir, checkpoint_dir, two_rank_train):
    """Fresh 2-process jobs resumed from the padded-FFN run's checkpoint after its squeeze (step 6)."""
    return launch("resume_2rank_padded", 2, runs_dir, "resume", "--stages", *map(str, STAGES),
                  "--ckpt_dir", checkpoint_dir, "--tags", "step6", "--resume_variant", "squeeze_padded")


@pytest.fixture(scope="session")
def one_rank_resume(runs_dir, checkpoint_dir, two_rank_train):
    """Fresh 1-process jobs resumed from the 2-rank checkpoints (universal checkpoint conversion)."""
    return launch("resume_1rank", 1, runs_dir, "resume", "--stages", *map(str, STAGES),
                  "--ckpt_dir", checkpoint_dir, "--tags", "step3", "step6")


@pytest.fixture(scope="session")
def two_rank_bf16(runs_dir):
    """2 processes in bf16 (DeepSpeed's CPU accelerator supports it); ZeRO-3 with DeepSpeed's default
    persistence threshold, so the gathered-persistent parameter path is exercised too."""
    return launch("train_2rank_bf16", 2, runs_dir, "train", "--stages", *map(str, ZERO_STAGES), "--dtype", "bf16",
                  "--persistent")


@pytest.fixture(scope="session")
def two_rank_half(runs_dir):
    """2 processes in bf16 and in fp16 (DeepSpeed's CPU accelerator supports both; fp16 with the
    dynamic loss scaler), ZeRO-3 parameters really partitioned (persistence threshold 0). Variants:
    squeeze + fold, squeeze without fold and its masked reference, and a model with non-default
    settings (fused LayerNorm class, gradient checkpointing, eager attention), and a model two of
    whose layers lose every row. Keyed by dtype."""
    variants = ("squeeze", "squeeze_nofold", "masked_nofold", "settings", "emptied")
    return {dtype: launch(f"train_2rank_{dtype}_partitioned", 2, runs_dir, "train", "--stages",
                          *map(str, ZERO_STAGES), "--dtype", dtype, "--variants", *variants)
            for dtype in ("bf16", "fp16")}


@pytest.fixture(scope="session")
def two_rank_rebuild_memory(runs_dir):
    """BERT-base shape on 2 processes, one launch per ZeRO stage (one after another: each holds
    about 2.5 GB per rank): peak memory of training before the squeeze, of the rebuild, after."""
    pattern = "ds_configs/zero{stage}_bf16.json" if ON_GPU else "ds_configs/zero{stage}_cpu.json"
    return {stage: launch(f"memory_2rank_zero{stage}", 2, runs_dir, "memory", "--stages", str(stage),
                          "--ds_config_pattern", pattern)
            for stage in ZERO_STAGES}


@pytest.fixture(scope="session")
def two_rank_memory(runs_dir):
    """2 processes, a small BERT (12.6M parameters) pruned to 50% and squeezed at step 2 of 4, at
    ZeRO 1, 2 and 3: bytes held per rank at steps 2 (dense) and 4 (squeezed), measured and counted."""
    return launch("memory_2rank", 2, runs_dir, "held", "--stages", *map(str, ZERO_STAGES))


TP_STAGES = ("0", "1", "2")


TP_LAYOUTS = {"1rank": (1, 1), "tp2": (2, 2), "tp2_dp2": (4, 2)}  # name: (processes, tensor parallel)


@pytest.fixture(scope="session")
def tensor_parallel_runs(runs_dir):
    """AutoTP runs of one schedule (masked, no squeeze) on the same global batches: 1 process, tp 2
    (2 processes), tp 2 x dp 2 (4 processes); ZeRO stages 0, 1, 2 within each TP rank. The TP runs
    save a checkpoint after step 3 (between the two prunings)."""
    return {name: launch(f"tp_{name}", nproc, runs_dir, "--tp", str(tp), "--stages", *TP_STAGES, worker=TP_WORKER,
                         *(("--ckpt_dir", os.path.join(runs_dir, f"tp_checkpoints_{name}")) if tp > 1 else ()))
            for name, (nproc, tp) in TP_LAYOUTS.items()}


@pytest.fixture(scope="session")
def tensor_parallel_resumed(runs_dir, tensor_parallel_runs):
    """Fresh tp 2 and tp 2 x dp 2 jobs resumed from those checkpoints on the same layout; each first
    tries its checkpoint without TP (refused)."""
    return {name: launch(f"tp_{name}_resume", nproc, runs_dir, "--tp", str(tp), "--stages", *TP_STAGES,
                         "--ckpt_dir", os.path.join(runs_dir, f"tp_checkpoints_{name}"), "--resume", worker=TP_WORKER)
            for name, (nproc, tp) in TP_LAYOUTS.items() if tp > 1}


@pytest.fixture(scope="session")
def tensor_parallel_bf16(runs_dir):
    """tp 2 in bf16 (ZeRO 1 and 2 within each TP rank: DeepSpeed's bf16 needs ZeRO)."""
    return launch("tp_tp2_bf16", 2, runs_dir, "--tp", "2", "--stages", "1", "2", "--dtype", "bf16", worker=TP_WORKER)


def pytest_terminal_summary(terminalreporter):
    if TIMINGS:
        terminalreporter.write_sep("-", "vp-dist multi-process launches")
        for name, seconds in TIMINGS.items():
            terminalreporter.write_line(f"{name}: {seconds:.1f} s")


@pytest.fixture(scope="session")
def tensor_parallel_squeezed(runs_dir):
    """The same schedule with `squeeze_at_target` (squeezed after step 4 of 8) on the same global
    batches: 1 process (the data-parallel rebuild: the reference), tp 2, tp 2 x dp 2; ZeRO 0, 1, 2.
    The TP runs save a checkpoint after step 6 (two steps after the squeeze)."""
    return {name: launch(f"tp_squeeze_{name}", nproc, runs_dir, "--tp", str(tp), "--stages", *TP_STAGES,
                         *(("--ckpt_dir", os.path.join(runs_dir, f"tp_squeeze_checkpoints_{name}")) if tp > 1 else ()),
                         worker=TP_SQUEEZE_WORKER)
            for name, (nproc, tp) in TP_LAYOUTS.items()}


@pytest.fixture(scope="session")
def tensor_parallel_squeezed_resumed(runs_dir, tensor_parallel_squeezed):
    """Fresh tp 2 and tp 2 x dp 2 jobs resumed from those checkpoints on the same layout."""
    return {name: launch(f"tp_squeeze_{name}_resume", nproc, runs_dir, "--tp", str(tp), "--stages", *TP_STAGES,
                         "--ckpt_dir", os.path.join(runs_dir, f"tp_squeeze_checkpoints_{name}"), "--resume",
                         worker=TP_SQUEEZE_WORKER)
            for name, (nproc, tp) in TP_LAYOUTS.items() if tp > 1}


@pytest.fixture(scope="session")
def tensor_parallel_squeezed_bf16(runs_dir):
    """The squeeze under tp 2 in bf16 (ZeRO 1 and 2: DeepSpeed's bf16 needs ZeRO)."""
    return launch("tp_squeeze_tp2_bf16", 2, runs_dir, "--tp", "2", "--stages", "1", "2", "--dtype", "bf16",
                  worker=TP_SQUEEZE_WORKER)


@pytest.fixture(scope="session")
def tensor_parallel_squeezed_tp4(runs_dir):
    """The squeeze under tp 4 (one of the 4 heads per rank), ZeRO 1."""
    return launch("tp_squeeze_tp4", 4, runs_dir, "--tp", "4", "--stages", "1", worker=TP_SQUEEZE_WORKER)
