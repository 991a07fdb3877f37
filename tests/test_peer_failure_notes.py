"""A rank that stops on its own error leaves one line that the other ranks' PeerFailure names, so the
cause is in the last lines of a launcher's interleaved output (no process group needed here: the
context manager is what each rank runs around the job)."""
import os
import time

import pytest

from vp_dist.train.distributed_env import FAILURES_DIR, PeerFailure, peer_failures_explained


def test_the_peer_failure_names_the_rank_that_stopped_first(tmp_path):
    checkpoints = str(tmp_path / "checkpoints")
    with pytest.raises(ValueError, match="corpus holds no text"):  # rank 0's own error, re-raised as it is
        with peer_failures_explained(0, 1, checkpoints):
            raise ValueError("corpus holds no text\nsecond line")
    assert (tmp_path / FAILURES_DIR / "rank0.txt").read_text() == "ValueError: corpus holds no text\n"
    with pytest.raises(PeerFailure) as failure:  # rank 1 then sees its peer's connection close
        with peer_failures_explained(1, 1, checkpoints):
            raise RuntimeError("[gloo] Connection closed by peer [127.0.0.1]:29500")
    message = str(failure.value)
    assert message.startswith("rank 1: a collective with the other ranks failed (RuntimeError: [gloo] Connection")
    assert "rank 0 stopped on: ValueError: corpus holds no text." in message


def test_notes_from_an_earlier_attempt_are_not_named(tmp_path):
    note = tmp_path / FAILURES_DIR / "rank0.txt"
    note.parent.mkdir()
    note.write_text("OSError: an old disk-full error\n")
    old = time.time() - 3600
    os.utime(note, (old, old))
    with pytest.raises(PeerFailure) as failure:
        with peer_failures_explained(1, 1, str(tmp_path / "checkpoints")):
            raise RuntimeError("Connection reset by peer")
    assert "stopped on" not in str(failure.value)
