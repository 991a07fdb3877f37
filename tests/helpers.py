"""Shared by the tests: a training loop for the single-process ones, `run_ok` for child processes,
`load_script` for the scripts outside the package."""
from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import torch

from models import random_batch
from vp_dist import VPConfig, VariancePruner


def loss_of(model, batch):
    """The training loss of any tiny test model on a `random_batch`."""
    n = batch["input_ids"].shape[0]
    name = type(model).__name__
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    if name.endswith("ForSequenceClassification"):
        return model(**inputs, labels=torch.arange(n) % model.config.num_labels).loss
    if name.endswith("ForQuestionAnswering"):
        return model(**inputs, start_positions=torch.arange(n), end_positions=torch.arange(n) + 2).loss
    if name.endswith("ForPreTraining"):
        return model(**inputs, labels=batch["labels"], next_sentence_label=torch.arange(n) % 2).loss
    return model(**inputs, labels=batch["labels"]).loss


def train(model, config: VPConfig, steps: int, micro_batches: int = 1, lr: float = 1e-3, seed: int = 0):
    """AdamW training with the pruner; returns (pruner, optimizer, losses)."""
    pruner = VariancePruner(model, config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    losses = []
    model.train()
    for step in range(steps):
        for micro in range(micro_batches):
            batch = random_batch(seed=seed + 100 * step + micro)
            with pruner.observe(batch["attention_mask"]):
                loss = loss_of(model, batch)
            (loss / micro_batches).backward()
            losses.append(loss.item())
        optimizer.step()
        optimizer.zero_grad()
        pruner.step(optimizer)
    return pruner, optimizer, losses


def run_ok(command, **kwargs) -> subprocess.CompletedProcess:
    """Run a child process and fail with the tail of its output, so that a CI log shows why it failed."""
    done = subprocess.run(command, capture_output=True, text=True, **kwargs)
    if done.returncode != 0:
        output = (done.stdout or "") + (done.stderr or "")
        raise AssertionError(f"exit {done.returncode}: {' '.join(map(str, command))}\n{output[-6000:]}")
    return done


def allow_fp16_on_cpu() -> bool:
    """Let DeepSpeed's CPU accelerator build fp16 engines on a CPU whose oneDNN lacks fp16 kernels.

    DeepSpeed 0.19 refuses `fp16` on the CPU accelerator unless `torch.ops.mkldnn._is_mkldnn_fp16_supported()`
    (AVX512-FP16 or AMX-FP16: recent Intel Xeons; not AMD EPYC). torch still computes fp16 there with
    its reference kernels, slower but correct, and what these tests check is vp-dist's handling of
    fp16 engines (DeepSpeed's own loss scaler, masters, masks), not the CPU's fp16 speed. Returns
    whether the gate had to be lifted. Tests only: users on such a CPU get DeepSpeed's refusal.
    """
    from deepspeed.accelerator import get_accelerator

    accelerator = get_accelerator()
    if accelerator.device_name() != "cpu" or accelerator.is_fp16_supported():
        return False
    type(accelerator).is_fp16_supported = lambda self: True
    return True


def load_script(path: Path, name: str | None = None):
    """The Python script at `path` (e.g. one of launch/), imported as a module without running its
    `__main__` block."""
    spec = importlib.util.spec_from_file_location(name or path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
