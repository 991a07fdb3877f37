#!/usr/bin/env python
"""Kill -9 a pre-training run at random instants, restart it, and compare with an uninterrupted run.

    python launch/fault_inject.py --kills 20            # the demo config, shrunk (see SMALL_DEMO)
    python launch/fault_inject.py --kills 6 --ranks 2 --seed 3 --work /tmp/faults

For each world size (1 and 2 ranks by default) an uninterrupted reference run is timed through its
fault points (`vp_dist.distributed.fault_points`: every step, the phases of a checkpoint write,
the squeeze rebuild). Each kill then, seeded, picks a world size and one of three targets:
a random instant of training (uniform between the first step and the end of the reference),
inside a checkpoint write (a random checkpoint, a uniform delay within its reference duration)
or inside the squeeze rebuild (likewise); it SIGKILLs the launcher and every rank at that instant.
After the kill it checks that the latest checkpoint loads (sizes and SHA-256 verified) and that no
checkpoint the run had completed was lost, re-runs the same command to the end, and compares the
final masks, the statistics every pruning chose from, the loss of every step and the tokenizer with
the reference, bit for bit. It prints one line per kill and the counts: tried, killed, resumed,
identical. Exit status 1 unless every kill resumed to an identical result.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runnable from a checkout
from vp_dist.cli import positive_int  # noqa: E402

# The demo config in its smallest form that still prunes (steps 3 and 6), squeezes (at 6),
# checkpoints (every 4 steps and at the end) and runs the NSP phase.
SMALL_DEMO = [
    "--model.overrides", "{hidden_size: 64, num_attention_heads: 2, intermediate_size: 128}",
    "--data.vocab_size", "1024",
    "--phases", "[{name: mlm, objective: mlm, steps: 9, seq_len: 64, global_batch: 8, micro_batch: 2},"
                " {name: nsp, objective: mlm+nsp, steps: 2, seq_len: 96, global_batch: 4, micro_batch: 2, prune: false}]",
    "--vp", "{start: 3, interval: 3, increment: 0.25, target: 0.5}",
    "--log_every", "1", "--checkpoint_every", "4", "--warmup_steps", "2", "--render_report", "false",
]
TARGETS = ("random", "checkpoint", "squeeze")


def command(output_dir: Path, ranks: int, config: Path, extra=()) -> list[str]:
    script = [str(ROOT / "launch/pretrain.py"), "--config", str(config), "--output_dir", str(output_dir),
              "--deepspeed_config", str(ROOT / "ds_configs/zero2_cpu.json"), *SMALL_DEMO, *extra]
    if ranks == 1:
        return [sys.executable, *script]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks), *script]


def environment(fault_log: Path, **extra: str) -> dict:
    env = dict(os.environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false", PYTHONUNBUFFERED="1", VP_FAULT_LOG=str(fault_log))
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    return {**env, **extra}


def read_points(fault_log: Path) -> list[tuple[float, int, int, str]]:
    """(time, rank, pid, point) of every fault point reached so far."""
    if not fault_log.is_file():
        return []
    points = []
    for line in fault_log.read_text().splitlines():
        parts = line.split(" ", 3)
        if len(parts) == 4:
            points.append((float(parts[0]), int(parts[1]), int(parts[2]), parts[3]))
    return points


def descendants(pid: int) -> list[int]:
    """`pid` and every process below it (torchrun starts its workers in new sessions)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = Path(f"/proc/{entry}/stat").read_text()
            except OSError:
                continue
            parent = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(parent, []).append(int(entry))
    found, frontier = [pid], [pid]
    while frontier:
        frontier = [child for parent in frontier for child in children.get(parent, [])]
        found += frontier
    return found


def kill_tree(process: subprocess.Popen) -> None:
    for pid in descendants(process.pid):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    process.wait()


def run_to_end(output_dir: Path, ranks: int, config: Path, log: Path, timeout: float = 900, extra=(),
               env: dict | None = None) -> subprocess.CompletedProcess:
    with open(log, "a") as out:
        return subprocess.run(command(output_dir, ranks, config, extra), cwd=ROOT, stdout=out,
                              stderr=subprocess.STDOUT, env=env or environment(output_dir.parent / "points.log"),
                              timeout=timeout)


def wait_for(fault_log: Path, process: subprocess.Popen, point: str, occurrence: int = 1) -> float | None:
    """Poll until rank 0 reaches `point` for the `occurrence`-th time; its time, or None if the run ended."""
    while process.poll() is None:
        hits = [t for t, rank, _, name in read_points(fault_log) if rank == 0 and name == point]
        if len(hits) >= occurrence:
            return hits[occurrence - 1]
        time.sleep(0.005)
    return None


def run_and_kill(output_dir: Path, ranks: int, config: Path, fault_log: Path, log: Path, plan: dict,
                 extra=()) -> str | None:
    """Start the run, SIGKILL it as `plan` says; returns the last point reached, None if it ended first."""
    with open(log, "a") as out:
        process = subprocess.Popen(command(output_dir, ranks, config, extra), cwd=ROOT, stdout=out,
                                   stderr=subprocess.STDOUT, env=environment(fault_log))
    try:
        if wait_for(fault_log, process, plan["point"], plan.get("occurrence", 1)) is None:
            return None
        time.sleep(plan["delay"])
        if process.poll() is not None:
            return None
        kill_tree(process)
    finally:
        if process.poll() is None:
            kill_tree(process)
    points = read_points(fault_log)
    return points[-1][3] if points else "start-up"


def completed_steps(fault_log: Path, ranks: int) -> list[int]:
    """Steps of the checkpoints every rank finished writing (checkpoint:done after step:N)."""
    done, step, finished = {}, {}, set()
    for _, rank, _, name in read_points(fault_log):
        if name.startswith("step:"):
            step[rank] = int(name.split(":")[1])
        elif name == "checkpoint:done":
            done.setdefault(step.get(rank, 0), set()).add(rank)
    for at, writers in done.items():
        if len(writers) == ranks:
            finished.add(at)
    return sorted(finished)


def check_checkpoints(output_dir: Path, fault_log: Path, ranks: int) -> str | None:
    """None if the latest checkpoint loads and is no older than the last one completed; else why not."""
    from vp_dist.distributed.checkpoint import read_vp_state
    checkpoints = output_dir / "checkpoints"
    finished = completed_steps(fault_log, ranks)
    if not (checkpoints / "latest").is_file():
        return f"no `latest` though checkpoints {finished} completed" if finished else None
    try:
        state = read_vp_state(str(checkpoints))
    except (OSError, ValueError) as error:
        return f"latest checkpoint refused: {error}"
    saved_step = int(state["tag"].removeprefix("step"))
    if finished and saved_step < finished[-1]:
        return f"latest names step {saved_step}, but step {finished[-1]}'s checkpoint had completed"
    return None


def outputs(output_dir: Path) -> dict:
    """What must be identical: masks, each pruning's statistics, the loss of every step, the tokenizer."""
    from safetensors.torch import load_file
    report = json.loads((output_dir / "vp_report.json").read_text())
    events = {path.name: load_file(str(path)) for path in sorted((output_dir / "prune_events").glob("*.safetensors"))}
    return {"masks": load_file(str(output_dir / "masks.safetensors")), "events": events,
            "losses": [(entry["step"], entry["loss"]) for entry in report["history"]],
            "tokenizer": (output_dir / "tokenizer" / "tokenizer.json").read_bytes()}


def differences(reference: dict, candidate: dict) -> list[str]:
    import torch
    found = []
    if reference["losses"] != candidate["losses"]:
        found.append("losses")
    if reference["tokenizer"] != candidate["tokenizer"]:
        found.append("tokenizer")
    for key in ("masks", "events"):
        a, b = reference[key], candidate[key]
        flat_a = a if key == "masks" else {f"{f}/{n}": t for f, tensors in a.items() for n, t in tensors.items()}
        flat_b = b if key == "masks" else {f"{f}/{n}": t for f, tensors in b.items() for n, t in tensors.items()}
        if flat_a.keys() != flat_b.keys() or any(not torch.equal(flat_a[n], flat_b[n]) for n in flat_a):
            found.append("statistics" if key == "events" else key)
    return found


def reference_timings(fault_log: Path) -> dict:
    """Durations (s) of rank 0's checkpoint writes and squeeze, and of training (first step to the end)."""
    points = [(t, name) for t, rank, _, name in read_points(fault_log) if rank == 0]
    starts = {"checkpoint": [t for t, n in points if n == "checkpoint:start"],
              "squeeze": [t for t, n in points if n == "squeeze:start"]}
    ends = {"checkpoint": [t for t, n in points if n == "checkpoint:done"],
            "squeeze": [t for t, n in points if n == "squeeze:done"]}
    first_step = next(t for t, n in points if n == "step:1")
    return {"checkpoint": [e - s for s, e in zip(starts["checkpoint"], ends["checkpoint"])],
            "squeeze": [e - s for s, e in zip(starts["squeeze"], ends["squeeze"])],
            "training": points[-1][0] - first_step}


def plan_kill(rng: random.Random, timings: dict) -> dict:
    target = rng.choice(TARGETS)
    if target == "checkpoint":
        index = rng.randrange(len(timings["checkpoint"]))
        return {"target": target, "point": "checkpoint:start", "occurrence": index + 1,
                "delay": rng.uniform(0, timings["checkpoint"][index])}
    if target == "squeeze":
        return {"target": target, "point": "squeeze:start", "delay": rng.uniform(0, timings["squeeze"][0])}
    return {"target": target, "point": "step:1", "delay": rng.uniform(0, timings["training"])}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kills", type=positive_int, default=20)
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2], help="world sizes to alternate")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--config", type=Path, default=ROOT / "launch/configs/demo.yaml")
    parser.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    args = parser.parse_args(argv)
    work = args.work or Path(tempfile.mkdtemp(prefix="vp_faults_"))
    work.mkdir(parents=True, exist_ok=True)
    rng = random.Random(args.seed)
    # The tokenizer is deterministic, so every run tokenises into the same cache: built once.
    extra = ["--data.cache_dir", str(work / "cache")]
    started = time.time()
    references, timings = {}, {}
    for ranks in args.ranks:
        folder = work / f"reference_{ranks}rank"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        done = run_to_end(folder / "run", ranks, args.config, folder / "output.log", extra=extra)
        if done.returncode != 0:
            print(f"reference run on {ranks} rank(s) failed: see {folder / 'output.log'}")
            return 1
        references[ranks], timings[ranks] = outputs(folder / "run"), reference_timings(folder / "points.log")
        print(f"reference, {ranks} rank(s): training {timings[ranks]['training']:.1f} s, checkpoint writes "
              f"{', '.join(f'{d:.2f}' for d in timings[ranks]['checkpoint'])} s, squeeze "
              f"{timings[ranks]['squeeze'][0]:.2f} s", flush=True)
    counts = {"tried": 0, "killed": 0, "resumed": 0, "identical": 0}
    for index in range(args.kills):
        ranks = args.ranks[index % len(args.ranks)]
        plan = plan_kill(rng, timings[ranks])
        folder = work / f"kill{index:02d}"
        shutil.rmtree(folder, ignore_errors=True)
        folder.mkdir()
        last = run_and_kill(folder / "run", ranks, args.config, folder / "points.log", folder / "output.log", plan,
                            extra)
        counts["tried"] += 1
        counts["killed"] += last is not None
        problem = check_checkpoints(folder / "run", folder / "points.log", ranks) if last else None
        latest = folder / "run" / "checkpoints" / "latest"
        resumed_from = latest.read_text().strip() if latest.is_file() else "nothing (fresh start)"
        done = run_to_end(folder / "run", ranks, args.config, folder / "output.log", extra=extra)
        resumed = done.returncode == 0 and problem is None
        counts["resumed"] += resumed
        different = differences(references[ranks], outputs(folder / "run")) if done.returncode == 0 else ["no result"]
        counts["identical"] += resumed and not different
        where = f"killed after '{last}'" if last else "run ended before the kill instant"
        print(f"kill {index:2d}: {ranks} rank(s), {plan['target']:<10} +{plan['delay']:.3f}s, {where}; "
              f"resumed from {resumed_from}: {'identical' if resumed and not different else problem or different}",
              flush=True)
    print(f"kills tried {counts['tried']}, killed {counts['killed']}, resumed {counts['resumed']}, "
          f"identical {counts['identical']} ({time.time() - started:.0f} s, work folder {work})")
    return 0 if counts["identical"] == counts["tried"] else 1


if __name__ == "__main__":
    sys.exit(main())
