"""Command lines of the downstream commands: every field of their config dataclass is a flag.

Parsing and validation are `vp_dist.cli`'s (pydantic, one schema for flags, `--help` and
errors): `X | None` fields take an X or `null`, `bool` fields `--flag [true|false]` or
`--no-flag`, tuples a comma-separated list. The `--local_rank` that the `deepspeed` launcher
passes is accepted and ignored (ranks come from the environment).
"""
from __future__ import annotations

import logging
import os

from .. import cli


def parse_config(config_class, description: str, argv=None, prog: str | None = None):
    """An instance of `config_class` from `argv`; bad input exits with status 2 naming the field."""
    return cli.parse_command_line(config_class, argv, prog=prog or description.split()[0].lower(),
                                  description=description)


def configure_logging() -> int:
    """Rank-0 INFO logging (others WARNING); returns the rank."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(asctime)s %(name)s: %(message)s")
    return rank
