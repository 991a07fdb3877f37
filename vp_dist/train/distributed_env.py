"""Process-group start-up for every launcher: deepspeed, torchrun, mpirun/srun (MPI discovery), python."""
from __future__ import annotations

import logging
import os
import socket

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


def init_distributed() -> tuple[int, int]:
    """Start torch.distributed through DeepSpeed; returns (rank, world_size)."""
    import deepspeed
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator

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
    deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=(kind == "mpi"), verbose=False,
                               distributed_port=port or 29500)
    if get_accelerator().device_name() != "cpu":  # MPI discovery sets LOCAL_RANK only now
        get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", 0)))
    logger.info("distributed: launcher=%s backend=%s world=%d", kind, dist.get_backend(), dist.get_world_size())
    return dist.get_rank(), dist.get_world_size()
