"""Lazy, module-by-module access to the weights of a checkpoint, for streaming extraction.

A :class:`WeightSource` lists its 2-D weight matrices by module key (``named_modules()``
name without ``.weight``) and loads one at a time, so that extracting from two checkpoints
holds about two modules in memory, not two models:

* safetensors: one file, a sharded set (``*.safetensors.index.json``), or a directory holding
  them (transformers / sentence-transformers layout) — read lazily through the mmap of
  ``safetensors.safe_open``;
* ArrowEngine Parquet directories, GGUF files and ``pytorch_model.bin`` directories — through
  the engines' checkpoint readers (``aios_fast.engines.load_state_dict``), which load the whole
  state dict (GGUF weights are quantised and must be decoded anyway);
* an in-memory state dict or ``nn.Module``.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator, Mapping

import torch

from ..errors import BackendUnavailableError, InputError

__all__ = ["WeightSource", "open_source"]


class WeightSource(Mapping):
    """Read-only mapping: module key -> 2-D weight tensor, loaded on access.

    ``shape(key)`` answers without loading; ``tensor_names()`` lists every stored tensor
    (for fingerprints); ``raw(name)`` loads any stored tensor by its full name.
    """

    def __init__(self, label: str):
        self.label = label
        self._shapes: dict[str, tuple[int, ...]] = {}  # full tensor name -> shape

    # full-name level ---------------------------------------------------------
    def tensor_names(self) -> list[str]:
        return list(self._shapes)

    def raw(self, name: str) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    # module level ------------------------------------------------------------
    def _matrices(self) -> dict[str, str]:
        if not hasattr(self, "_mat"):
            self._mat = {name[: -len(".weight")]: name for name, shp in self._shapes.items()
                         if name.endswith(".weight") and len(shp) == 2}
        return self._mat

    def shape(self, key: str) -> tuple[int, int]:
        return tuple(self._shapes[self._matrices()[key]])  # type: ignore[return-value]

    def __getitem__(self, key: str) -> torch.Tensor:
        return self.raw(self._matrices()[key])

    def __iter__(self) -> Iterator[str]:
        return iter(self._matrices())

    def __len__(self) -> int:
        return len(self._matrices())

    def full_state(self) -> "_LazyState":
        """Every tensor (not only matrices) as a lazy mapping, e.g. for ``fingerprint_model``."""
        return _LazyState(self)


class _LazyState(Mapping):
    def __init__(self, src: WeightSource):
        self.src = src

    def __getitem__(self, name):
        return self.src.raw(name)

    def __iter__(self):
        return iter(self.src.tensor_names())

    def __len__(self):
        return len(self.src.tensor_names())


class DictSource(WeightSource):
    def __init__(self, sd: Mapping[str, torch.Tensor], label: str = "state dict"):
        super().__init__(label)
        self.sd = sd
        for k, v in sd.items():
            if not isinstance(v, torch.Tensor):
                raise InputError(f"{label}: value of {k!r} is a {type(v).__name__}, expected a tensor")
            self._shapes[k] = tuple(v.shape)

    def raw(self, name: str) -> torch.Tensor:
        return self.sd[name].detach()


class SafetensorsSource(WeightSource):
    def __init__(self, files: list[Path], label: str):
        super().__init__(label)
        from safetensors import safe_open

        self._handles = {}
        self._where: dict[str, Path] = {}
        for f in files:
            h = safe_open(str(f), framework="pt")
            self._handles[f] = h
            for name in h.keys():
                self._shapes[name] = tuple(h.get_slice(name).get_shape())
                self._where[name] = f

    def raw(self, name: str) -> torch.Tensor:
        return self._handles[self._where[name]].get_tensor(name)


def _safetensors_files(path: Path) -> list[Path] | None:
    if path.is_file() and path.suffix == ".safetensors":
        return [path]
    if path.is_file() and path.name.endswith(".safetensors.index.json"):
        index = json.loads(path.read_text())
        try:
            shards = sorted(set(index["weight_map"].values()))
        except (KeyError, AttributeError):
            raise InputError(f"{path}: not a safetensors index (no 'weight_map')") from None
        return [path.parent / s for s in shards]
    if path.is_dir():
        idx = sorted(path.glob("*.safetensors.index.json"))
        if idx:
            return _safetensors_files(idx[0])
        files = sorted(path.glob("*.safetensors"))
        if files:
            return files
    return None


def open_source(obj, label: str = "checkpoint") -> WeightSource:
    """A :class:`WeightSource` for a path (safetensors file/dir/index, Parquet dir, GGUF), a
    state dict, an ``nn.Module`` or an existing source."""
    if isinstance(obj, WeightSource):
        return obj
    if isinstance(obj, torch.nn.Module):
        return DictSource(obj.state_dict(), f"{label} ({type(obj).__name__})")
    if isinstance(obj, Mapping):
        return DictSource(obj, label)
    if not isinstance(obj, (str, os.PathLike)):
        raise InputError(f"{label}: expected a path, state dict or nn.Module, got {type(obj).__name__}")
    path = Path(obj)
    if not path.exists():
        raise InputError(f"{label}: {path} does not exist")
    files = _safetensors_files(path)
    if files is not None:
        missing = [f for f in files if not f.is_file()]
        if missing:
            raise InputError(f"{label}: shard(s) {[str(m) for m in missing]} named by the index are missing")
        return SafetensorsSource(files, str(path))
    # Everything else (GGUF, ArrowEngine Parquet, pytorch_model.bin directories) through the
    # engines' readers, which validate the kind and load the state dict (GGUF is quantised and
    # must be decoded anyway).
    try:
        from ..engines.checkpoints import load_state_dict
    except ImportError as exc:  # pragma: no cover - engines ship with the package
        raise BackendUnavailableError(f"{label}: reading {path} needs aios_fast.engines ({exc})") from None
    return DictSource(load_state_dict(path), str(path))
