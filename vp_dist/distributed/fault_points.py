"""Named instants of a run, for the fault-injection harness (`launch/fault_inject.py`) and tests.

Off (one dictionary look-up) unless an environment variable asks:

* ``VP_FAULT_LOG=FILE``: every rank appends ``<time> <rank> <pid> <point>`` at each point, so a
  harness can kill the run inside a checkpoint write or the squeeze rebuild, and classify where
  a random kill landed.
* ``VP_FAULT_HANG=POINT:RANK``: that rank sleeps forever at that point (a hung rank).

Points: ``step:<global step>`` (after the step), ``checkpoint:start`` / ``checkpoint:files`` (the
DeepSpeed files are written) / ``checkpoint:manifest`` (the VP file is written, `latest` not yet) /
``checkpoint:done``, ``squeeze:start`` / ``squeeze:done``.
"""
from __future__ import annotations

import os
import time


def fault_point(name: str, rank: int) -> None:
    log = os.environ.get("VP_FAULT_LOG")
    if log:
        with open(log, "a") as handle:  # O_APPEND: lines of several ranks do not interleave
            handle.write(f"{time.time():.6f} {rank} {os.getpid()} {name}\n")
    if os.environ.get("VP_FAULT_HANG") == f"{name}:{rank}":
        while True:
            time.sleep(3600)
