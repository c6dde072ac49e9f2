"""Model weights to and from ArrowEngine's Parquet layout, plus one entry point for reading
checkpoints of every kind the node meets.

ArrowEngine's layout is a directory with

* ``weights.parquet``: one row per tensor, columns ``layer_name`` (string), ``shape``
  (list<int32>), ``dtype`` (string: ``float32``, ``float16``, ``bfloat16``, ``int64``...), ``data``
  (binary, the tensor's C-order bytes; bfloat16 as its raw 2-byte words) and ``num_params`` (int64);
* ``metadata.json``: ``{"model_info": {...}}`` with at least ``architecture``, ``num_params`` and
  ``dtypes``, plus whatever the caller passes.

Both files are written atomically (temporary file in the same directory, fsync, rename). Reading
checks every row (known dtype, non-negative shape, ``num_params`` and byte length consistent with
the shape) before building a tensor, so a corrupt or hostile file is refused with an error naming
the file and the row, and nothing is allocated from an unchecked size.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterator, Mapping

import numpy as np
import torch

from ..errors import InputError
from .._atomic import atomic_write_bytes, replace_durably
from ._util import temp_path_beside

__all__ = ["ModelConverter", "DTYPES", "WEIGHTS_FILE", "METADATA_FILE"]

# The format itself (names, dtypes, schema, the checked reader) lives in parquet_format, which
# checkpoints.py reads through too: both import it, neither imports the other at load time.
from .parquet_format import (COLUMNS, DTYPES, METADATA_FILE, ROW_GROUP_BYTES, WEIGHTS_FILE, _NAMES,  # noqa: F401
                             _schema, decode_row, iter_parquet, open_weights, parquet_names)


def _state_dict_of(model_or_state_dict: Any) -> Mapping[str, torch.Tensor]:
    if isinstance(model_or_state_dict, torch.nn.Module):
        return model_or_state_dict.state_dict()
    if isinstance(model_or_state_dict, Mapping):
        bad = [k for k, v in model_or_state_dict.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
        if bad:
            raise InputError(f"state dict entry {bad[0]!r} is not a str -> torch.Tensor pair")
        return model_or_state_dict
    raise InputError(f"expected an nn.Module or a dict of tensors, got {type(model_or_state_dict).__name__}")


def _tensor_bytes(t: torch.Tensor) -> np.ndarray:
    # a uint8 view of the contiguous tensor is its exact C-order bytes, for bfloat16 too (no copy
    # for a contiguous CPU tensor; the copy happens once, into the Arrow buffer)
    return t.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy()


def _binary_array(chunks: list[np.ndarray]):
    """One Arrow binary array over the byte chunks, copying each chunk once into its buffer."""
    import pyarrow as pa

    lengths = np.array([c.nbytes for c in chunks], dtype=np.int64)
    offsets = np.zeros(len(chunks) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    if offsets[-1] > np.iinfo(np.int32).max:  # a row group is capped far below 2 GiB
        raise InputError(f"row group of {offsets[-1]} bytes exceeds Arrow's binary limit")
    data = np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint8)
    return pa.Array.from_buffers(pa.binary(), len(chunks),
                                 [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data)])


def _write_weights(file: Path, sd: Mapping[str, torch.Tensor]) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = _schema()
    # Uncompressed, no dictionary and no statistics on ``data``: weights barely compress, and
    # dictionary-encoding or min/max-scanning megabyte-sized values only costs time.
    with pq.ParquetWriter(file, schema, compression="none", use_dictionary=["dtype"],
                          write_statistics=["layer_name", "num_params"]) as writer:
        rows: list[tuple[str, torch.Tensor]] = []
        size = 0

        def flush() -> None:
            if not rows:
                return
            chunks = [_tensor_bytes(t) for _, t in rows]
            table = pa.Table.from_arrays([
                pa.array([n for n, _ in rows], pa.string()),
                pa.array([[int(d) for d in t.shape] for _, t in rows], pa.list_(pa.int32())),
                pa.array([_NAMES[t.dtype] for _, t in rows], pa.string()),
                _binary_array(chunks),
                pa.array([int(t.numel()) for _, t in rows], pa.int64()),
            ], schema=schema)
            writer.write_table(table, row_group_size=len(rows))
            rows.clear()

        for name, t in sd.items():
            nbytes = t.numel() * t.element_size()
            if size and size + nbytes > ROW_GROUP_BYTES:
                flush()
                size = 0
            rows.append((name, t))
            size += nbytes
        flush()


def _model_info(model_or_state_dict: Any, sd: Mapping[str, torch.Tensor], extra: Mapping | None) -> dict:
    info: dict[str, Any] = {}
    config = getattr(model_or_state_dict, "config", None)
    if isinstance(model_or_state_dict, torch.nn.Module):
        arch = (getattr(config, "architectures", None) or [type(model_or_state_dict).__name__])[0]
        info["architecture"] = arch
        if config is not None and hasattr(config, "to_dict"):
            info["model_type"] = getattr(config, "model_type", None)
            info["config"] = json.loads(json.dumps(config.to_dict(), default=str))
    else:
        info["architecture"] = "unknown"
    info["num_params"] = int(sum(t.numel() for t in sd.values()))
    info["num_tensors"] = len(sd)
    info["dtypes"] = sorted({_NAMES.get(t.dtype, str(t.dtype)) for t in sd.values()})
    if extra:
        info.update(dict(extra))
    return info


class ModelConverter:
    """Writes and reads ArrowEngine's Parquet weight layout; reads other checkpoints too."""

    @staticmethod
    def to_parquet(model_or_state_dict: Any, out_dir: str | Path, model_info: Mapping | None = None) -> Path:
        """Write every tensor of a model (its ``state_dict()``) or of a state dict to ``out_dir``.

        Returns ``out_dir``. ``model_info`` entries are merged into ``metadata.json``'s
        ``model_info`` (they win over the computed ``architecture``/``num_params``/``dtypes``).
        """
        sd = _state_dict_of(model_or_state_dict)
        if model_info is not None and not isinstance(model_info, Mapping):
            raise InputError(f"model_info must be a dict, got {type(model_info).__name__}")
        for name, t in sd.items():
            if t.dtype not in _NAMES:
                raise InputError(f"tensor {name!r} has dtype {t.dtype}, not one of {list(DTYPES)}")
            if any(d > 2**31 - 1 for d in t.shape):
                raise InputError(f"tensor {name!r} has a dimension beyond int32: {tuple(t.shape)}")
            if t.numel() * t.element_size() > 2**31 - 1:
                raise InputError(f"tensor {name!r} has {t.numel() * t.element_size()} bytes, beyond the "
                                 "2 GiB a binary cell of ArrowEngine's layout holds; split it first")
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        info = _model_info(model_or_state_dict, sd, model_info)
        try:
            meta = json.dumps({"model_info": info}, indent=2, sort_keys=True, allow_nan=False)
        except (TypeError, ValueError) as exc:
            raise InputError(f"model_info is not JSON-serialisable: {exc}") from exc

        final = out / WEIGHTS_FILE
        tmp = temp_path_beside(final)
        try:
            _write_weights(tmp, sd)
            replace_durably(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        atomic_write_bytes(out / METADATA_FILE, meta.encode("utf-8"))
        return out

    @staticmethod
    def from_parquet(path: str | Path) -> dict[str, torch.Tensor]:
        """Read an ArrowEngine weights directory (or its ``weights.parquet``) back, exactly."""
        return dict(iter_parquet(Path(path)))

    @staticmethod
    def read_metadata(path: str | Path) -> dict:
        """``metadata.json`` of a weights directory."""
        file = Path(path) / METADATA_FILE
        if not file.is_file():
            raise InputError(f"{file} does not exist")
        try:
            meta = json.loads(file.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as exc:
            raise InputError(f"{file} is not readable JSON: {exc}") from exc
        if not isinstance(meta, dict) or not isinstance(meta.get("model_info"), dict):
            raise InputError(f"{file} has no 'model_info' object")
        return meta

    @staticmethod
    def load_state_dict(path: str | Path, include=None) -> dict[str, torch.Tensor]:
        """All (or the ``include``d) tensors of a checkpoint, see :func:`checkpoints.load_state_dict`."""
        from .checkpoints import load_state_dict

        return load_state_dict(path, include=include)

    @staticmethod
    def iter_tensors(path: str | Path, names=None) -> Iterator[tuple[str, torch.Tensor]]:
        """Stream (name, tensor) pairs of a checkpoint, see :func:`checkpoints.iter_tensors`."""
        from .checkpoints import iter_tensors

        return iter_tensors(path, names=names)

    @staticmethod
    def list_tensors(path: str | Path) -> list[str]:
        """Tensor names of a checkpoint, without reading tensor data."""
        from .checkpoints import list_tensors

        return list_tensors(path)
