"""Run a script with every torch.distributed collective that vp_dist issues checked for its device.

    torchrun --nproc_per_node 2 tests/distributed/collective_guard.py launch/pretrain.py --config ...

NCCL takes CUDA tensors only; gloo takes CPU tensors, so on a CPU machine a tensor left on the
CPU by mistake passes every test and crashes the first GPU job. With `VP_GUARD_DEVICE=lazy` this
guard declares that the backend requires the *lazy* device (PyTorch's TorchScript lazy-tensor
device: real data, computed on the CPU, but not device "cpu"), as NCCL requires CUDA:

- `vp_dist.distributed.devices.BACKEND_DEVICES` learns that gloo needs "lazy", so
  `collective_device()` answers it (where that module exists);
- every tensor collective called from a `vp_dist` module must get tensors on that device, else
  the call raises (naming the caller and the device); the collective itself then runs on CPU
  copies (gloo's need) whose results are copied back;
- object collectives (`all_gather_object`, ...) pass unchecked (torch picks their device).
Collectives that DeepSpeed or torch issue themselves are not checked (their tensors are theirs).
Without `VP_GUARD_DEVICE` the required device is the real backend's: on a GPU machine the same
guard checks NCCL for real. `VP_GUARD_LOG=DIR`: each rank writes `DIR/rank<R>.json`, the count of
checked calls per "caller function", so a test can assert the guard saw the calls it must.
"""
from __future__ import annotations

import atexit
import collections
import json
import os
import runpy
import sys

import torch
import torch.distributed as dist

TENSOR_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "broadcast", "reduce",
                      "reduce_scatter", "reduce_scatter_tensor", "all_to_all", "all_to_all_single",
                      "gather", "scatter", "send", "recv", "isend", "irecv")
OBJECT_COLLECTIVES = ("all_gather_object", "broadcast_object_list", "gather_object", "scatter_object_list")
SIMULATED = os.environ.get("VP_GUARD_DEVICE")
CHECKED: collections.Counter = collections.Counter()


def required_device(group=None) -> torch.device:
    from vp_dist.distributed.devices import is_cpu_side_group
    if is_cpu_side_group(group):  # vp_dist's gloo side channel: CPU tensors under any backend
        return torch.device("cpu")
    if SIMULATED:
        return torch.device(SIMULATED)
    backend = str(dist.get_backend())
    if "nccl" in backend:
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)


def _to_cpu(value, pairs):
    if isinstance(value, torch.Tensor):
        copy = value.detach().cpu().clone()
        pairs.append((value, copy))
        return copy
    if isinstance(value, (list, tuple)) and any(isinstance(item, torch.Tensor) for item in value):
        return type(value)(_to_cpu(item, pairs) for item in value)
    return value


def _guard(name: str, real):
    def guarded(*args, **kwargs):
        caller = sys._getframe(1)
        module = caller.f_globals.get("__name__", "")
        if not module.startswith("vp_dist"):
            return real(*args, **kwargs)
        where = f"{module}.{caller.f_code.co_name}"
        required = required_device(kwargs.get("group"))
        for tensor in _tensors([*args, *kwargs.values()]):
            if tensor.device.type != required.type or (
                    required.index is not None and tensor.device.index != required.index):
                raise RuntimeError(f"collective guard: {where} called dist.{name} with a tensor on "
                                   f"{tensor.device}; the backend needs {required} "
                                   "(use vp_dist.distributed.collective_device())")
        CHECKED[f"{name} <- {where}"] += 1
        if required.type != "lazy":
            return real(*args, **kwargs)
        pairs: list = []
        result = real(*[_to_cpu(a, pairs) for a in args], **{k: _to_cpu(v, pairs) for k, v in kwargs.items()})
        if kwargs.get("async_op") and result is not None:
            result.wait()  # the copies hold the result only once the work is done (the simulation is synchronous)
        with torch.no_grad():
            for original, copy in pairs:
                original.copy_(copy)
        return result
    guarded.__wrapped__ = real
    return guarded


def install() -> None:
    if SIMULATED == "lazy":
        import torch._lazy.ts_backend
        torch._lazy.ts_backend.init()
    for name in TENSOR_COLLECTIVES:
        if hasattr(dist, name):
            setattr(dist, name, _guard(name, getattr(dist, name)))
    if SIMULATED:
        try:
            from vp_dist.distributed import devices
        except ImportError:  # a vp_dist without collective_device(): the guard alone declares it
            pass
        else:
            devices.BACKEND_DEVICES["gloo"] = lambda: torch.device(SIMULATED, 0)
    log_dir = os.environ.get("VP_GUARD_LOG")
    if log_dir:
        def write_log():
            os.makedirs(log_dir, exist_ok=True)
            rank = os.environ.get("RANK", "0")
            with open(os.path.join(log_dir, f"rank{rank}.json"), "w") as handle:
                json.dump(dict(CHECKED), handle, indent=1)
        atexit.register(write_log)


if __name__ == "__main__":
    script, *arguments = sys.argv[1:]
    sys.argv = [script, *arguments]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    install()
    runpy.run_path(script, run_name="__main__")
