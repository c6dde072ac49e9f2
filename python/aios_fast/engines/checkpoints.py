"""Read weights from every checkpoint kind the node meets, whole or streamed tensor by tensor:

* a ``.safetensors`` file;
* sharded safetensors (``model.safetensors.index.json``, the file or its directory);
* a transformers / sentence-transformers model directory (``model.safetensors``, sharded, or
  ``pytorch_model.bin`` loaded with ``weights_only=True``);
* an ArrowEngine Parquet directory (``weights.parquet``) or that file;
* a GGUF file, dequantised with ``gguf`` and renamed to the Hugging Face names (the names of the
  transformers model that ``from_pretrained(..., gguf_file=...)`` builds), including the reverse
  of llama.cpp's Q/K row permutation and tied output embeddings.

Streaming (:func:`iter_tensors`) holds one tensor at a time (one row group for Parquet), so batch
extraction can walk two large models module by module without loading either whole.

Name filters (``names`` / ``include``): ``None`` for all, a regex string (``re.search``), a
predicate, or a collection of exact names (every one must exist, else :class:`InputError`).
"""

from __future__ import annotations

import functools
import json
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Iterator, Union

import torch

from ..errors import BackendUnavailableError, InputError
from .parquet_format import WEIGHTS_FILE, iter_parquet, parquet_names

__all__ = ["checkpoint_kind", "list_tensors", "iter_tensors", "load_state_dict"]

NameFilter = Union[None, str, Callable[[str], bool], Iterable[str]]
INDEX_FILE = "model.safetensors.index.json"


def checkpoint_kind(path: str | Path) -> tuple[str, Path]:
    """(kind, file) where kind is safetensors / sharded / bin / parquet / gguf."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"checkpoint {path} does not exist")
    if path.is_dir():
        for name, kind in ((WEIGHTS_FILE, "parquet"), (INDEX_FILE, "sharded"),
                           ("model.safetensors", "safetensors"), ("pytorch_model.bin", "bin")):
            if (path / name).is_file():
                return kind, path / name
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return "gguf", ggufs[0]
        raise InputError(f"{path} holds no weights: expected {WEIGHTS_FILE}, {INDEX_FILE}, "
                         "model.safetensors, pytorch_model.bin or a single .gguf file")
    with open(path, "rb") as fh:
        magic = fh.read(4)
    if magic == b"GGUF":
        return "gguf", path
    if magic == b"PAR1":
        return "parquet", path
    if path.name.endswith(".index.json"):
        return "sharded", path
    if path.suffix == ".safetensors":
        return "safetensors", path
    if path.suffix in (".bin", ".pt", ".pth"):
        return "bin", path
    raise InputError(f"{path}: unknown checkpoint kind; expected .safetensors, a safetensors index, "
                     "a Parquet weights file, .gguf or a model directory")


def _predicate(names: NameFilter, available: list[str], path: Path) -> Callable[[str], bool] | None:
    if names is None:
        return None
    if isinstance(names, str):
        try:
            rx = re.compile(names)
        except re.error as exc:
            raise InputError(f"name filter {names!r} is not a valid regex: {exc}") from exc
        return lambda n: rx.search(n) is not None
    if callable(names):
        return names
    wanted = set(names)
    missing = sorted(wanted - set(available))
    if missing:
        raise InputError(f"{path} has no tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                         f"({len(available)} tensors, e.g. {available[:3]})")
    return wanted.__contains__


# ---------------------------------------------------------------------------- safetensors
def _shard_map(index: Path) -> dict[str, Path]:
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise InputError(f"{index} is not a safetensors index with a 'weight_map': {exc}") from exc
    if not isinstance(weight_map, dict):
        raise InputError(f"{index}: 'weight_map' must map tensor names to shard files")
    out = {}
    for name, shard in weight_map.items():
        file = (index.parent / str(shard)).resolve()
        if index.parent.resolve() not in file.parents:  # hostile index pointing elsewhere
            raise InputError(f"{index}: shard {shard!r} of {name!r} lies outside {index.parent}")
        out[name] = file
    for file in set(out.values()):
        if not file.is_file():
            raise InputError(f"{index} names shard {file.name}, which does not exist")
    return out


def _safetensors_names(file: Path) -> list[str]:
    from safetensors import safe_open

    try:
        with safe_open(str(file), framework="pt") as f:
            return list(f.keys())
    except Exception as exc:  # safetensors raises its own SafetensorError
        raise InputError(f"{file} is not a readable safetensors file: {exc}") from exc


def _iter_safetensors(files: dict[Path, list[str]]) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    for file, names in files.items():
        try:
            with safe_open(str(file), framework="pt") as f:
                for name in names:
                    yield name, f.get_tensor(name)
        except InputError:
            raise
        except Exception as exc:
            raise InputError(f"{file} could not be read: {exc}") from exc


# ---------------------------------------------------------------------------- GGUF
class _GGUFIndex:
    """GGUF tensor names -> Hugging Face names, via a meta-device model built from the file's config."""

    def __init__(self, file: Path) -> None:
        try:
            from gguf import MODEL_ARCH_NAMES, GGUFReader, get_tensor_name_map
        except ImportError as exc:
            raise BackendUnavailableError(
                f"reading {file} needs the gguf package: pip install 'aios-fast[models]' ({exc})") from None
        from transformers import AutoConfig, AutoModelForCausalLM
        try:
            # a private transformers module (no stable API): guarded, with the versions it is known in
            from transformers.modeling_gguf_pytorch_utils import (
                TENSOR_PROCESSORS, TensorProcessor, load_gguf_checkpoint)
        except ImportError as exc:
            import transformers

            raise BackendUnavailableError(
                f"reading {file} needs transformers' GGUF loader (transformers.modeling_gguf_pytorch_utils: "
                f"load_gguf_checkpoint, TENSOR_PROCESSORS), which transformers {transformers.__version__} "
                f"does not provide; install transformers>=4.56,<6 ({exc})") from None

        try:
            parsed = load_gguf_checkpoint(str(file), return_tensors=False)
            config = AutoConfig.for_model(**parsed["config"])
        except Exception as exc:
            raise InputError(f"{file} could not be parsed as a GGUF model: {exc}") from exc
        self.parsed = parsed
        arch = parsed["config"].get("model_type")
        self.processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=parsed["config"])
        gguf_arch = next((k for k, v in MODEL_ARCH_NAMES.items() if v == arch), None)
        if gguf_arch is None:
            raise InputError(f"{file}: architecture {arch!r} is unknown to the installed gguf package")
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config)
        # transformers' get_gguf_hf_weights_map rebuilds gguf's name table once per submodule
        # (hundreds of times, ~20 s); one table and a prefix walk give the same map.
        table = get_tensor_name_map(gguf_arch, config.num_hidden_layers)
        self.map: dict[str, str] = {}
        for hf_name in model.state_dict():
            stem, dot, suffix = hf_name.rpartition(".")
            if suffix not in ("weight", "bias"):
                stem, dot, suffix = hf_name, "", ""
            parts = stem.split(".")
            for start in range(len(parts)):  # drop leading qualifiers, as its recursion does
                gguf_name = table.get_name(".".join(parts[start:]))
                if gguf_name is not None:
                    self.map.setdefault(gguf_name + dot + suffix, hf_name)
                    break
        self.reader = GGUFReader(str(file))
        # tied parameters: state_dict() lists every alias, the GGUF stores the tensor once
        by_id: dict[int, list[str]] = {}
        for name, p in model.named_parameters(remove_duplicate=False):
            by_id.setdefault(id(p), []).append(name)
        self.aliases = {names[0]: names[1:] for names in by_id.values() if len(names) > 1}
        stored = {self.map[t.name] for t in self.reader.tensors if t.name in self.map}
        self.aliases = {k: [a for a in v if a not in stored] for k, v in self.aliases.items() if k in stored}
        self.names = [self.map[t.name] for t in self.reader.tensors if t.name in self.map]
        self.names += [a for v in self.aliases.values() for a in v]

    def iter(self, keep: Callable[[str], bool] | None) -> Iterator[tuple[str, torch.Tensor]]:
        import numpy as np
        from gguf import dequantize

        for t in self.reader.tensors:
            name = self.map.get(t.name)
            if name is None:
                continue
            aliases = self.aliases.get(name, [])
            wanted = [n for n in [name, *aliases] if keep is None or keep(n)]
            if not wanted:
                continue
            # the architecture's processor undoes llama.cpp's conversion tweaks (Q/K row permutation)
            result = self.processor.process(weights=dequantize(t.data, t.tensor_type), name=t.name,
                                            tensor_key_mapping=self.map, parsed_parameters=self.parsed)
            if self.map.get(result.name, name) != name:
                raise InputError(f"GGUF tensor {t.name} was renamed to {result.name} by its processor; "
                                 "this architecture is not supported for streaming")
            weights = result.weights
            tensor = torch.from_numpy(np.ascontiguousarray(weights, dtype=np.float32).copy())
            for n in wanted:
                yield n, tensor


@functools.lru_cache(maxsize=4)
def _gguf_index(file: Path, size: int, mtime_ns: int) -> _GGUFIndex:
    # parsing a GGUF header (tokenizer arrays included) takes seconds: reuse it per file version
    return _GGUFIndex(file)


def _gguf(file: Path) -> _GGUFIndex:
    st = file.stat()
    return _gguf_index(file.resolve(), st.st_size, st.st_mtime_ns)


# ---------------------------------------------------------------------------- public
def list_tensors(path: str | Path) -> list[str]:
    """Tensor names of a checkpoint, reading no tensor data (GGUF: its header only)."""
    kind, file = checkpoint_kind(path)
    if kind == "parquet":
        return parquet_names(file)
    if kind == "safetensors":
        return _safetensors_names(file)
    if kind == "sharded":
        return list(_shard_map(file))
    if kind == "gguf":
        return _gguf(file).names
    return list(_load_bin(file))


def _load_bin(file: Path) -> dict[str, torch.Tensor]:
    try:
        sd = torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:
        raise InputError(f"{file} is not a loadable torch state dict (weights_only): {exc}") from exc
    if not isinstance(sd, dict):
        raise InputError(f"{file} holds a {type(sd).__name__}, not a state dict")
    return sd


def iter_tensors(path: str | Path, names: NameFilter = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) pairs lazily, one tensor in memory at a time (CPU tensors, stored dtype;
    GGUF dequantised to float32). Errors about the path and the filter are raised at the call,
    not at the first ``next``."""
    kind, file = checkpoint_kind(path)
    if kind == "parquet":
        keep = _predicate(names, parquet_names(file) if _is_collection(names) else [], file)
        return iter_parquet(file, keep)
    if kind in ("safetensors", "sharded"):
        shard_of = _shard_map(file) if kind == "sharded" else dict.fromkeys(_safetensors_names(file), file)
        keep = _predicate(names, list(shard_of), file)
        grouped: dict[Path, list[str]] = {}
        for name, shard in shard_of.items():
            if keep is None or keep(name):
                grouped.setdefault(shard, []).append(name)
        return _iter_safetensors(grouped)
    if kind == "gguf":
        index = _gguf(file)
        return index.iter(_predicate(names, index.names, file))
    sd = _load_bin(file)
    keep = _predicate(names, list(sd), file)
    return ((k, v) for k, v in sd.items() if keep is None or keep(k))


def _is_collection(names: NameFilter) -> bool:
    return names is not None and not isinstance(names, str) and not callable(names)


def load_state_dict(path: str | Path, include: NameFilter = None) -> dict[str, torch.Tensor]:
    """Every tensor (or those ``include`` selects) of a checkpoint, as a dict."""
    return dict(iter_tensors(path, names=include))
