"""Process-group start-up for every launcher: deepspeed, torchrun, mpirun/srun (MPI discovery), python.

The process group's timeout (`dist_timeout_minutes` of the run config) bounds every collective:
when a rank dies or hangs, the others raise instead of waiting for ever, and
:func:`peer_failures_explained` turns that into one clear error (see the README's "Reliability").
"""
from __future__ import annotations

import contextlib
import datetime
import logging
import os
import socket
import time
from pathlib import Path

logger = logging.getLogger(__name__)

_LAUNCHER_VARS = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "LOCAL_RANK")
_MPI_VARS = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MV2_COMM_WORLD_SIZE")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def launcher_kind() -> str:
    if all(v in os.environ for v in _LAUNCHER_VARS):
        return "env"          # deepspeed, torchrun, or the Slurm script's srun mode
    if any(v in os.environ for v in _MPI_VARS):
        return "mpi"          # mpirun / srun --mpi: DeepSpeed discovers ranks through mpi4py
    return "single"


def init_distributed(timeout_minutes: int = 30) -> tuple[int, int]:
    """Start torch.distributed through DeepSpeed; returns (rank, world_size).

    timeout_minutes: how long a collective waits for the other ranks before it raises.
    """
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

    if int(timeout_minutes) < 1:
        raise ValueError(f"dist_timeout_minutes={timeout_minutes} must be >= 1")
    kind = launcher_kind()
    if kind == "single":
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1",
                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port())})
    port = int(os.environ.get("MASTER_PORT", 0))
    if kind == "mpi" and not port:
        # DeepSpeed's MPI discovery defaults to port 29500, which another job may hold: rank 0
        # picks a free port and MPI itself tells the others.
        from mpi4py import MPI
        port = MPI.COMM_WORLD.bcast(_free_port() if MPI.COMM_WORLD.Get_rank() == 0 else None, root=0)
    backend = "gloo" if get_accelerator().device_name() == "cpu" else None
    if get_accelerator().device_name() != "cpu" and "LOCAL_RANK" in os.environ:
        # Before the process group: NCCL's object collectives and barriers use the current device.
        get_accelerator().set_device(int(os.environ["LOCAL_RANK"]))
    timeout = datetime.timedelta(minutes=timeout_minutes)
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=(kind == "mpi"), verbose=False,
                               distributed_port=port or 29500, timeout=timeout)
    _default_group_timeout(timeout)
    if get_accelerator().device_name() != "cpu":  # MPI discovery sets LOCAL_RANK only now
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))
    logger.info("distributed: launcher=%s backend=%s world=%d", kind, dist.get_backend(), dist.get_world_size())
    return dist.get_rank(), dist.get_world_size()


def _default_group_timeout(timeout: datetime.timedelta) -> None:
    """Give the same timeout to the groups created later (DeepSpeed's data-parallel groups, also at
    the squeeze rebuild): `new_group` without a timeout takes torch's module default (30 min for
    gloo, 10 for NCCL), not the world group's, and ZeRO's gradient reduction runs on such a group."""
    from torch.distributed import distributed_c10d
    distributed_c10d.default_pg_timeout = timeout
    if hasattr(distributed_c10d, "default_pg_nccl_timeout"):
        distributed_c10d.default_pg_nccl_timeout = timeout


class PeerFailure(RuntimeError):
    """A collective failed because another rank died or hung past the process group's timeout."""


_PEER_FAILURE_MARKS = ("connection closed", "connection reset", "timed out", "timeout", "broken pipe",
                       "nccl", "gloo", "socket", "peer")


FAILURES_DIR = "failures"  # beside checkpoints/: one line per rank that stopped on its own error


@contextlib.contextmanager
def peer_failures_explained(rank: int, timeout_minutes: int, checkpoint_dir: str):
    """Re-raise a collective's failure (a dead peer, or a hung one past the timeout) as PeerFailure.

    A rank that stops on its own error (bad data, a full disk, ...) writes it in one line to
    `<output_dir>/failures/rank<N>.txt` first, so that the others' PeerFailure names the cause: under a
    launcher every rank's output is interleaved, and the cause would otherwise lie far above the last
    lines. Notes older than this call are ignored."""
    import torch.distributed as dist
    failures = Path(checkpoint_dir).parent / FAILURES_DIR
    started = time.time()
    try:
        yield
    except Exception as error:
        message = str(error)
        from_collective = isinstance(error, dist.DistError) or (
            isinstance(error, RuntimeError) and any(mark in message.lower() for mark in _PEER_FAILURE_MARKS))
        first_line = message.strip().splitlines()[0] if message.strip() else type(error).__name__
        if not from_collective:
            try:
                failures.mkdir(parents=True, exist_ok=True)
                (failures / f"rank{rank}.txt").write_text(f"{type(error).__name__}: {first_line[:500]}\n")
            except OSError:
                pass  # the note is a courtesy; the error itself goes on
            raise
        causes = []
        for note in sorted(failures.glob("rank*.txt")) if failures.is_dir() else []:
            try:
                if note.stat().st_mtime >= started - 1:
                    causes.append(f"{note.stem.replace('rank', 'rank ')} stopped on: {note.read_text().strip()}")
            except OSError:
                continue
        cause = (" " + "; ".join(causes) + ".") if causes else ""
        raise PeerFailure(
            f"rank {rank}: a collective with the other ranks failed ({type(error).__name__}: {first_line[:300]}).{cause} "
            f"Another rank died, or hung for longer than dist_timeout_minutes={timeout_minutes}; this rank stops. "
            f"Re-run the same command to resume from the latest checkpoint in {checkpoint_dir}.") from error
