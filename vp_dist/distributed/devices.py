"""Which device a collective's tensors must live on, for the backend the process group runs.

NCCL communicates CUDA tensors only (a CPU tensor is refused at the first collective), gloo and
MPI communicate CPU tensors. Every collective vp_dist issues goes through `collective_device()`:
tensors are moved there, reduced, and moved back, so the same code runs on gloo (CPU tests) and
on NCCL (GPU clusters). Object collectives (`all_gather_object`, ...) pick their device from the
current CUDA device under NCCL: `vp_dist.train.distributed_env.init_distributed` sets it first.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist


def _current(device_type: str) -> torch.device:
    module = getattr(torch, device_type, None)
    index = module.current_device() if module is not None and hasattr(module, "current_device") else None
    return torch.device(device_type, index) if index is not None else torch.device(device_type)


#: backend name -> the device its tensors must be on (evaluated at each call: the current device).
#: Backends not listed (gloo, mpi, ccl on CPU) take CPU tensors. A test may add an entry to
#: simulate an accelerator-only backend on gloo (tests/distributed/collective_guard.py).
BACKEND_DEVICES: dict[str, Callable[[], torch.device]] = {
    "nccl": lambda: _current("cuda"),
    "hccl": lambda: _current("npu"),
    "xccl": lambda: _current("xpu"),
}


_CPU_SIDE_GROUPS: list = []  # made by cpu_side_group(): gloo, CPU tensors, whatever the default backend


def cpu_side_group():
    """A gloo group of all ranks for tiny host-side agreements (e.g. the preemption stop flag) that
    must not synchronise with an accelerator: its collectives take CPU tensors under any default
    backend. Created on first use; collective (every rank calls it at the same point)."""
    if not _CPU_SIDE_GROUPS:
        _CPU_SIDE_GROUPS.append(dist.new_group(backend="gloo"))
    return _CPU_SIDE_GROUPS[0]


def is_cpu_side_group(group) -> bool:
    return group is not None and any(group is made for made in _CPU_SIDE_GROUPS)


def collective_device(group=None) -> torch.device:
    """The device that `group`'s backend (default group: None) communicates tensors on.

    CPU when no process group is running, and on `cpu_side_group()`. A mixed backend such as
    "cpu:gloo,cuda:nccl" answers its accelerator device (both would work; that one is where the
    data already is on a GPU).
    """
    if not (dist.is_available() and dist.is_initialized()) or is_cpu_side_group(group):
        return torch.device("cpu")
    backend = str(dist.get_backend(group))
    for name, device in BACKEND_DEVICES.items():
        if name in backend.split(",") or any(part.endswith(":" + name) for part in backend.split(",")):
            return device()
    return torch.device("cpu")


def on_collective_device(tensor: torch.Tensor, group=None) -> torch.Tensor:
    """`tensor` itself when it is already where the backend needs it, else a copy there."""
    device = collective_device(group)
    return tensor if tensor.device == device else tensor.to(device)
