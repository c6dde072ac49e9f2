"""The ``aios-fast`` command line: one module per subcommand, each with ``register(sub)``.

Subcommand modules import heavy dependencies (torch, transformers) inside their handlers so
that ``aios-fast --help`` stays instant.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Sequence

from ..errors import AiosError

# Each module defines register(subparsers) and sets a `func(args) -> int` default.
_SUBCOMMANDS = ("info", "probe", "card", "extract", "extract_batch", "train", "qa", "skills", "evolve",
                "federation", "keys", "factory", "bench")


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="aios-fast",
        description="Skill cards, probes, extraction and training for a self-evolving AI node.")
    parser.add_argument("--version", action="version", version=f"aios-fast {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in _SUBCOMMANDS:
        try:
            mod = importlib.import_module(f"{__name__}.{name}")
        except ModuleNotFoundError as exc:
            if exc.name == f"{__name__}.{name}":
                continue  # subcommand not part of this build yet
            raise
        mod.register(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        from ..allocator import from_environment

        from_environment()
        return int(args.func(args) or 0)
    except AiosError as exc:
        print(f"aios-fast {args.command}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
