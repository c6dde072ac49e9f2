"""Loads the private compiled module lazily, so a broken build fails on first use with a
diagnostic instead of breaking ``import aios_fast``."""

from __future__ import annotations

import functools
from types import ModuleType
from typing import Any

from .errors import BackendUnavailableError


@functools.lru_cache(maxsize=1)
def _load() -> tuple[ModuleType | None, str]:
    try:
        from . import _C  # type: ignore[attr-defined]
    except ImportError as exc:  # pragma: no cover - depends on the build
        return None, f"aios_fast._C failed to import ({exc}); reinstall with `pip install .`"
    return _C, ""


def available() -> bool:
    """True when the compiled module imported."""
    return _load()[0] is not None


def native() -> ModuleType:
    """The compiled module, or BackendUnavailableError saying why it is missing."""
    mod, why = _load()
    if mod is None:
        raise BackendUnavailableError(why)
    return mod


def has(symbol: str) -> bool:
    """True when the compiled module exists and exports ``symbol``."""
    mod = _load()[0]
    return mod is not None and hasattr(mod, symbol)


def build_info() -> dict[str, Any]:
    """Features compiled into _C, or a record saying it is missing."""
    mod, why = _load()
    if mod is None:
        return {"compiled": False, "reason": why, "openmp": False, "openmp_threads": 1,
                "cpu_simd": [], "cuda_compiled": False, "cuda_runtime_version": 0,
                "cuda_device_count": 0}
    info = dict(mod.build_info())
    info["compiled"] = True
    return info
