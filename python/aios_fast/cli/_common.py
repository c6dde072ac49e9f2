"""Helpers shared by subcommands: JSON output and rich console."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any


def add_json_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="machine-readable output on stdout")


def print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, default=str)
    sys.stdout.write("\n")


def console():
    from rich.console import Console

    return Console(stderr=False, highlight=False)
