"""launch/gpu_check.sh: ready to run on one GPU; its CPU smoke mode writes every figure key."""
import json
import os
import subprocess
import warnings
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
import sys  # noqa: E402
sys.path.insert(0, str(ROOT / "launch"))
import gpu_check  # noqa: E402


def test_scripts_exist_and_are_executable():
    for name in ("gpu_check.sh", "offline_wheels.sh", "gpu_check.py"):
        path = ROOT / "launch" / name
        assert path.is_file() and os.access(path, os.X_OK), name
    for name in ("gpu_check.sh", "offline_wheels.sh"):
        subprocess.run(["bash", "-n", str(ROOT / "launch" / name)], check=True)


def test_gpu_check_refuses_to_run_without_a_gpu_or_smoke_mode(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "VP_GPU_CHECK_SMOKE"}
    done = subprocess.run(["bash", str(ROOT / "launch/gpu_check.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2 and "no CUDA GPU" in done.stderr
    # gpu_check.py called directly (the shell script's checks skipped) refuses the same way, as it
    # does a budget that would skip every step
    for args in ([], ["--smoke", "--budget", "0"]):
        done = subprocess.run([sys.executable, str(ROOT / "launch/gpu_check.py"), str(tmp_path / "direct"), *args],
                              env=env, capture_output=True, text=True, timeout=120)
        assert done.returncode == 2 and ("no CUDA GPU" in done.stderr if not args else "--budget 0.0 must be > 0"
                                         in done.stderr), done.stderr


def test_ds_configs_partition_zero3_and_scale_fp16(tmp_path):
    zero3 = json.loads(gpu_check.ds_config(tmp_path, 3, "bf16", smoke=False).read_text())
    assert zero3["zero_optimization"]["stage"] == 3 and zero3["bf16"] == {"enabled": True}
    assert zero3["zero_optimization"]["stage3_param_persistence_threshold"] == 0
    fp16 = json.loads(gpu_check.ds_config(tmp_path, 2, "fp16", smoke=False).read_text())
    assert "bf16" not in fp16 and fp16["fp16"]["enabled"] and fp16["fp16"]["loss_scale"] == 0  # dynamic


def test_every_bench_step_runs_an_existing_script_with_flags_it_defines(tmp_path):
    """The GPU commands (not run on a CPU, several skipped in smoke mode): each names a launch
    script and only options that script's parser defines."""
    import re
    for name in gpu_check.FIGURES:
        if name.startswith("pretrain") or name == "gpu_tests":
            continue
        command = gpu_check.bench_command(name, tmp_path / f"{name}.json", smoke=False)
        script = Path(command[1])
        assert script.is_file(), (name, script)
        defined = set(re.findall(r'add_argument\("(--[a-z0-9-]+)"', script.read_text()))
        used = {arg for arg in command[2:] if arg.startswith("--")}
        assert used <= defined, (name, used - defined)


def test_each_step_is_named_once_and_has_what_its_kind_needs():
    """One table (`gpu_check.PLAN`) says how every step runs: a name twice would silently drop a step."""
    names = [step.name for step in gpu_check.PLAN]
    assert len(names) == len(set(names)) == len(gpu_check.FIGURES)
    for step in gpu_check.PLAN:
        assert step.kind in ("pretrain", "bench", "tests") and step.timeout_s > 0 and step.figures, step.name
        if step.kind == "pretrain":
            assert step.setting is not None and step.setting[0] in (2, 3), step.name
        if step.kind == "bench":
            assert step.script and callable(step.parse), step.name
    assert not {"pretrain_bf16_zero2", "bench_squeeze", "bench_stats", "gpu_tests"} & set(gpu_check.SMOKE_SKIPS)


@pytest.mark.slow
def test_smoke_mode_writes_every_figure_key(tmp_path):
    env = dict(os.environ, VP_GPU_CHECK_SMOKE="1", OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", str(ROOT / "launch/gpu_check.sh"), str(tmp_path)], env=env,
                          capture_output=True, text=True, timeout=1500)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((tmp_path / "gpu_check.json").read_text())
    assert set(summary["steps"]) == set(gpu_check.FIGURES)
    for name, keys in gpu_check.FIGURES.items():
        step = summary["steps"][name]
        assert set(keys) <= set(step), (name, set(keys) - set(step))
        assert step["ok"] or step["error"], name  # a failure is recorded, never silent
    for name in gpu_check.SMOKE_SKIPS:  # the same script as bench_squeeze: named as skipped
        assert summary["steps"][name]["error"].startswith("skipped in smoke mode"), name
    pretrain_steps = ["pretrain_bf16_zero2", "pretrain_bf16_zero3", "pretrain_fp16_zero2"]
    if not gpu_check.cpu_accepts_fp16(env):  # e.g. AMD EPYC: DeepSpeed refuses fp16, the step says why
        assert summary["steps"]["pretrain_fp16_zero2"]["error"] == "skipped in smoke mode: " + gpu_check.FP16_REFUSED
        pretrain_steps.remove("pretrain_fp16_zero2")
        warnings.warn("gpu_check smoke: pretrain_fp16_zero2 not run: " + gpu_check.FP16_REFUSED)
    for name in pretrain_steps:
        step = summary["steps"][name]
        assert step["ok"], (name, step["error"], (tmp_path / step["log"]).read_text()[-3000:])
        assert step["pruned_rows_zero"] is True and step["pruned_rows_checked_at"] == [2, 4]
        assert step["squeezed"] and step["pgo_bytes_after"] < step["pgo_bytes_before"]
        assert step["tflops_per_gpu"] > 0 and step["mfu"] is None  # CPU: no peak, no MFU
        assert step["steady_peak_before_bytes"] > 0 and step["steady_peak_after_bytes"] > 0
    assert summary["steps"]["pretrain_bf16_zero3"]["zero_stage"] == 3
    if "pretrain_fp16_zero2" in pretrain_steps:
        assert summary["steps"]["pretrain_fp16_zero2"]["dtype"] == "fp16"
    finetune = summary["steps"]["bench_finetune"]
    assert finetune["ok"], finetune["error"]
    assert set(finetune["batches"]) == {"1", "2"} and finetune["dense_oom_batches"] == []
    assert all(row["dense"]["it_per_s"] > 0 and row["squeezed"]["it_per_s"] > 0 for row in finetune["batches"].values())
    squeeze, stats = summary["steps"]["bench_squeeze"], summary["steps"]["bench_stats"]
    assert squeeze["ok"] and stats["ok"], (squeeze["error"], stats["error"])
    assert squeeze["dense_it_per_s"] > 0 and squeeze["squeezed_it_per_s"] > 0 and 0 < squeeze["train_flop_ratio"] < 1
    assert min(squeeze["ops_per_forward_backward"].values()) > 0
    assert isinstance(stats["overhead_percent"], float)
    gpu_tests = summary["steps"]["gpu_tests"]  # on a CPU the GPU tests skip and the fallback tests pass
    assert gpu_tests["ok"] and gpu_tests["tests_failed"] == 0 and gpu_tests["tests_skipped"] > 0
    table = (tmp_path / "gpu_check.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith(("| pretrain", "| bench", "| gpu_tests"))]
    assert [row.split(" | ")[0][2:] for row in rows] == list(summary["steps"])  # the plan's order
    assert set(summary["steps"]) == set(gpu_check.FIGURES)
    assert all(row.count(" | ") == 3 for row in rows)  # an error message never breaks the table


def test_the_fp16_loss_scale_across_the_rebuild_is_recorded_and_compared(tmp_path):
    """The loop records the fp16 loss scale on both sides of the engine rebuild
    (`RunRecord.record_squeeze`); gpu_check's `loss_scale_kept` compares the two."""
    from types import SimpleNamespace

    import torch

    from vp_dist.train.artifacts import RunRecord

    record = RunRecord()
    pruner = SimpleNamespace(tensor_parallel_squeezed=False, engine=SimpleNamespace(module=torch.nn.Linear(2, 2)))
    record.record_squeeze(pruner)  # bf16 / fp32: no loss scale, nothing recorded
    assert "loss_scale" not in record.memory and record.parameters["after"] == 6
    record.record_squeeze(pruner, 65536.0, 65536.0)
    assert record.memory["loss_scale"] == {"before": 65536.0, "after": 65536.0}
    for after, kept in ((65536.0, True), (1.0, False)):
        report = {"zero_stage": 2, "dtype": "fp16", "squeezed": True, "parameters": {},
                  "prune_events": [{"step": 4}], "history": [{"step": 5, "loss": 7.0, "peak_memory_bytes": 1,
                                                              "tokens_per_s": 1.0, "tflops_per_gpu": 1.0, "mfu": 0.1}],
                  "memory": {"before_squeeze": [{"total_bytes": 2}], "after_squeeze": [{"total_bytes": 1}],
                             "loss_scale": {"before": 65536.0, "after": after}}}
        run_dir = tmp_path / f"after_{after}"
        run_dir.mkdir()
        (run_dir / "vp_report.json").write_text(json.dumps(report))
        assert gpu_check.pretrain_figures(run_dir)["loss_scale_kept"] is kept
