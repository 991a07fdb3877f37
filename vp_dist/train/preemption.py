"""Stop at the next step boundary when the scheduler warns that the time limit is near.

Slurm sends SIGUSR1 some minutes before the limit. launch/slurm/pretrain.sbatch asks for it with
`--signal=B:USR1@<seconds>` and touches `VP_STOP_FILE` when it arrives (a file reaches the ranks
through any launcher, also before they start); a rank sent SIGUSR1 directly (`--signal=USR1@N`,
`kill -USR1`) gets the same from its handler, which only sets a flag. the training loop asks `StopRequest.due()` after each optimizer step,
checkpoints and exits cleanly, and the batch script requeues the job, which resumes from that
checkpoint.

Ranks receive the signal at slightly different times, so they agree before stopping: one MAX
all-reduce of a single CPU integer per step over `cpu_side_group()` (gloo: no device synchronisation).
"""
from __future__ import annotations

import logging
import os
import signal
import threading

import torch
import torch.distributed as dist

from ..distributed.devices import cpu_side_group

logger = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGUSR1,)
STOP_FILE_ENV = "VP_STOP_FILE"


class StopRequest:
    """`due()` is True on every rank once any rank was signalled (or found the stop file)."""

    def __init__(self, signals=STOP_SIGNALS):
        self.requested = False
        self._announced = False
        self.stop_file = os.environ.get(STOP_FILE_ENV) or None
        self._group = None  # made at the first due(), once the process group exists
        if threading.current_thread() is threading.main_thread():
            for number in signals:
                signal.signal(number, self._on_signal)
                # The signal may land on any thread (gloo's, NCCL's, data loaders'): restart their
                # interrupted system calls instead of failing them with EINTR.
                signal.siginterrupt(number, False)

    def _on_signal(self, number, _frame) -> None:
        # Signal handlers run between bytecodes of the main thread: set the flag, nothing else.
        self.requested = True

    def due(self) -> bool:
        """Collective (every rank calls it at the same step): whether to checkpoint and stop now."""
        local = self.requested or bool(self.stop_file and os.path.exists(self.stop_file))
        if self._group is None and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            self._group = cpu_side_group()
        if self._group is None:
            decided = local
        else:
            flag = torch.tensor([int(local)], dtype=torch.int32)
            dist.all_reduce(flag, op=dist.ReduceOp.MAX, group=self._group)
            decided = bool(flag.item())
        if decided and not self._announced:
            logger.info("stop requested (SIGUSR1 or %s): checkpointing at this step boundary", STOP_FILE_ENV)
            self._announced = True
        return decided
