"""argparse ``type=`` checkers: a bad value becomes argparse's own error, which names the
argument (``argument --rank: expected an int >= 1, got '0'``) and exits with status 2, before
any model is loaded. Kept free of torch so that building the parser stays instant."""

from __future__ import annotations

import argparse
import math
from pathlib import Path
from typing import Callable

__all__ = ["int_at_least", "float_range", "existing_file", "existing_dir", "power_iters"]


def int_at_least(low: int) -> Callable[[str], int]:
    """An int >= ``low``."""
    def check(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}") from None
        if v < low:
            raise argparse.ArgumentTypeError(f"expected an int >= {low}, got {text!r}")
        return v
    check.__name__ = f"int>={low}"
    return check


def float_range(low: float | None = None, high: float | None = None, *, low_open: bool = False,
                high_open: bool = False) -> Callable[[str], float]:
    """A finite float in the interval given (``None``: unbounded on that side)."""
    lo = "-inf" if low is None else f"{'(' if low_open else '['}{low:g}"
    hi = "inf" if high is None else f"{high:g}{')' if high_open else ']'}"
    lo = lo if low is not None else "(-inf"
    hi = hi if high is not None else "inf)"
    want = f"a finite number in {lo}, {hi}"

    def check(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}") from None
        bad = (not math.isfinite(v)
               or (low is not None and (v <= low if low_open else v < low))
               or (high is not None and (v >= high if high_open else v > high)))
        if bad:
            raise argparse.ArgumentTypeError(f"expected {want}, got {text!r}")
        return v
    check.__name__ = "number"
    return check


def existing_file(text: str) -> Path:
    """A path to an existing, readable regular file."""
    p = Path(text)
    if not p.exists():
        raise argparse.ArgumentTypeError(f"no such file: {text}")
    if not p.is_file():
        raise argparse.ArgumentTypeError(f"not a regular file: {text}")
    try:
        with open(p, "rb"):
            pass
    except OSError as exc:
        raise argparse.ArgumentTypeError(f"cannot read {text}: {exc.strerror}") from None
    return p


def existing_dir(text: str) -> Path:
    """A path to an existing directory."""
    p = Path(text)
    if not p.is_dir():
        raise argparse.ArgumentTypeError(f"no such directory: {text}")
    return p


def power_iters(text: str) -> int | str:
    """``auto`` or an int >= 0."""
    if text == "auto":
        return text
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an int >= 0, got {text!r}") from None
    if v < 0:
        raise argparse.ArgumentTypeError(f"expected 'auto' or an int >= 0, got {text!r}")
    return v
