"""Peak memory of this rank around the squeeze: the rebuild must never need more than training did.

On a GPU the figure is `torch.cuda.max_memory_allocated` (tensors; the caching allocator's
reserve is not counted); on CPU it is the process's peak resident set size (`VmHWM`, which Linux
resets on request through `/proc/self/clear_refs`). `RebuildMemory` measures, on each rank: the
steady-state peak of the training steps before the squeeze, the rebuild's own peak and time, and
the steady-state peak of the first `after_steps` steps after it.
"""
from __future__ import annotations

import logging
import resource
import time

import torch

logger = logging.getLogger(__name__)

_CLEAR_REFS = "/proc/self/clear_refs"
_STATUS = "/proc/self/status"


def _on_cuda(device) -> bool:
    return torch.device(device).type == "cuda" and torch.cuda.is_available()


def reset_peak(device="cpu") -> bool:
    """Start a new peak window on this rank; False where the platform cannot (then the peak is the
    process's lifetime peak, which only ever overstates a later window)."""
    if _on_cuda(device):
        torch.cuda.reset_peak_memory_stats(torch.device(device))
        return True
    try:
        with open(_CLEAR_REFS, "w") as handle:
            handle.write("5")  # 5: reset the peak RSS to the current RSS (Linux >= 4.0)
        return True
    except OSError:
        return False


def peak_bytes(device="cpu") -> int:
    """This rank's peak memory since the last `reset_peak` (see the module docstring)."""
    if _on_cuda(device):
        return int(torch.cuda.max_memory_allocated(torch.device(device)))
    try:
        with open(_STATUS) as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def peak_kind(device="cpu") -> str:
    return "cuda_max_memory_allocated" if _on_cuda(device) else "cpu_peak_rss"


class RebuildMemory:
    """The memory figures of one squeeze on this rank, in bytes and seconds.

        probe = RebuildMemory(engine.device)     # right after the engine is built: the window opens
        ...training steps...
        engine = probe.rebuild(pruner)           # instead of pruner.squeeze()
        ...after every later step: figures = probe.step_done()   # a dict once, after `after_steps`
    """

    def __init__(self, device, after_steps: int = 2):
        self.device, self.after_steps = device, after_steps
        self.figures: dict | None = None
        self._steps_after = None
        reset_peak(device)

    def rebuild(self, pruner):
        """Squeeze and re-partition (`pruner.squeeze()`), measuring its peak and time."""
        before = peak_bytes(self.device)
        reset_peak(self.device)
        started = time.perf_counter()
        engine = pruner.squeeze()
        seconds = time.perf_counter() - started
        self.figures = {"kind": peak_kind(self.device), "steady_peak_before": before,
                        "rebuild_peak": peak_bytes(self.device), "rebuild_seconds": seconds,
                        "steady_peak_after": None, "steps_after": 0}
        reset_peak(self.device)
        self._steps_after = 0
        return engine

    def step_done(self) -> dict | None:
        """Call after each training step; returns the complete figures once, `after_steps` steps
        after the rebuild (None otherwise)."""
        if self._steps_after is None:
            return None
        self._steps_after += 1
        if self._steps_after < self.after_steps:
            return None
        self._steps_after = None
        return self.finish()

    def finish(self) -> dict:
        """The figures now (a run that ends sooner than `after_steps` after the rebuild)."""
        self.figures["steady_peak_after"] = peak_bytes(self.device)
        self.figures["steps_after"] = self._steps_after if self._steps_after is not None else self.after_steps
        self._steps_after = None
        return dict(self.figures)

    @property
    def pending(self) -> bool:
        """A rebuild happened and its after-window is still open."""
        return self._steps_after is not None
