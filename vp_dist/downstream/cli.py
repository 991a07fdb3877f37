"""Command lines from typed config dataclasses: every field is a `--flag` of its own type.

`X | None` fields take an X, `bool` fields get `--flag/--no-flag`, `tuple[float, ...]` fields take a
comma-separated list. The `--local_rank` that the `deepspeed` launcher passes is accepted and
ignored (ranks come from the environment).
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import typing


def _comma_list(item_type):
    def parse(text: str) -> tuple:
        return tuple(item_type(part) for part in text.split(",") if part.strip())
    parse.__name__ = f"comma-separated {item_type.__name__}s"
    return parse


def parse_config(config_class, description: str, argv=None):
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    hints = typing.get_type_hints(config_class)
    for field in dataclasses.fields(config_class):
        kind = hints[field.name]
        required = field.default is dataclasses.MISSING
        default = None if required else field.default
        if kind is bool:
            parser.add_argument(f"--{field.name}", action=argparse.BooleanOptionalAction, default=default)
        elif typing.get_origin(kind) is tuple:
            parser.add_argument(f"--{field.name}", type=_comma_list(typing.get_args(kind)[0]), default=default,
                                required=required, help=f"comma-separated (default: {default})")
        else:
            base = next((t for t in typing.get_args(kind) if t is not type(None)), kind)  # X | None -> X
            parser.add_argument(f"--{field.name}", type=base, required=required, default=default)
    parser.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    args = vars(parser.parse_args(argv))
    args.pop("local_rank")
    try:
        return config_class(**args)
    except ValueError as error:
        parser.error(str(error))


def configure_logging() -> int:
    """Rank-0 INFO logging (others WARNING); returns the rank."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format=f"[rank {rank}] %(asctime)s %(name)s: %(message)s")
    return rank
