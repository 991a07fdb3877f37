"""Reporting steps whose statistics were dropped as non-finite (SPEC 1), without host syncs.

`update_meters` decides on the device whether a step is dropped and returns the layers at fault
(bool [L]). Reading that on the host at once would stall the GPU at every step, so on CUDA the
flags are copied without blocking into pinned memory and read once their copy has completed,
at a later `pruner.step()` (or at the next pruning, which waits for them). On CPU they are read
at once (nothing to stall).
"""
from __future__ import annotations

import logging
import warnings

import torch

logger = logging.getLogger(__name__)


class DroppedSteps:
    """Logs every dropped step with the layers concerned; warns loudly once a window has dropped
    more than `warn_after` steps (its statistics then rest on few observations)."""

    def __init__(self, layer_names: list[str], warn_after: int):
        self.layer_names = layer_names
        self.warn_after = warn_after
        self.total = 0      # dropped steps since the pruner was built
        self.in_window = 0  # dropped steps since the last pruning
        self._pending: list[tuple[int, torch.Tensor, object]] = []
        self._spare: list[tuple[torch.Tensor, object]] = []

    def record(self, step: int, bad_layers: torch.Tensor) -> None:
        """Queue the flags of `step` (bool [L] on the meters' device) for `poll`."""
        if bad_layers.is_cuda:
            # Pinned buffers and events are reused: allocating pinned memory can itself synchronise.
            host, ready = self._spare.pop() if self._spare else (
                torch.empty(bad_layers.shape, dtype=torch.bool, pin_memory=True), torch.cuda.Event())
            host.copy_(bad_layers, non_blocking=True)
            ready.record()
            self._pending.append((step, host, ready))
        else:
            self._pending.append((step, bad_layers, None))

    def poll(self, wait: bool = False) -> None:
        """Report the queued steps whose flags have reached the host (all of them with `wait`)."""
        while self._pending:
            step, flags, ready = self._pending[0]
            if ready is not None and not ready.query():
                if not wait:
                    return
                ready.synchronize()
            self._pending.pop(0)
            if bool(flags.any()):
                self._report(step, flags)
            if ready is not None:
                self._spare.append((flags, ready))

    def new_window(self) -> None:
        self.in_window = 0

    def _report(self, step: int, flags: torch.Tensor) -> None:
        self.total += 1
        self.in_window += 1
        layers = [name for name, bad in zip(self.layer_names, flags.tolist()) if bad]
        logger.warning("step %d: non-finite statistics (NaN or inf) in %d layer(s) %s%s; the step's "
                       "observation is dropped (%d dropped in this window, %d in all)",
                       step, len(layers), layers[:4], " ..." if len(layers) > 4 else "",
                       self.in_window, self.total)
        if self.in_window == self.warn_after + 1:
            message = (f"Variance Pruning: {self.in_window} steps of the current window had non-finite "
                       f"statistics and were dropped (more than VPConfig.warn_dropped_steps="
                       f"{self.warn_after}); the next pruning ranks rows on fewer observations. Look for "
                       "fp16 overflows or bad batches (e.g. use bf16, lower the LR, check the data).")
            logger.error(message)
            warnings.warn(message, RuntimeWarning, stacklevel=2)
