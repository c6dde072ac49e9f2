"""ArrowEngine's Parquet weights layout (``weights.parquet``: one row per tensor with
``layer_name``, ``shape``, ``dtype``, ``data``, ``num_params``) and its checked, streaming reader.

Shared by :mod:`.converter` (which writes the layout) and :mod:`.checkpoints` (which reads
every checkpoint kind), so that neither of those imports the other.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..errors import InputError

__all__ = ["WEIGHTS_FILE", "METADATA_FILE", "COLUMNS", "DTYPES", "decode_row", "open_weights",
           "iter_parquet", "parquet_names"]

WEIGHTS_FILE = "weights.parquet"
METADATA_FILE = "metadata.json"
COLUMNS = ("layer_name", "shape", "dtype", "data", "num_params")
ROW_GROUP_BYTES = 64 << 20  # rows are grouped up to ~64 MiB so readers can stream by row group

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16,
    "float64": torch.float64, "int64": torch.int64, "int32": torch.int32, "int16": torch.int16,
    "int8": torch.int8, "uint8": torch.uint8, "bool": torch.bool,
}
_NAMES = {v: k for k, v in DTYPES.items()}


def _schema():
    import pyarrow as pa

    return pa.schema([
        ("layer_name", pa.string()), ("shape", pa.list_(pa.int32())), ("dtype", pa.string()),
        ("data", pa.binary()), ("num_params", pa.int64()),
    ])


def decode_row(name: str, shape: list | None, dtype: str | None, data: bytes | np.ndarray | None,
               num_params: int | None, where: str) -> torch.Tensor:
    """Validate one Parquet row and rebuild its tensor (a private copy, writable)."""
    if not isinstance(name, str) or not name:
        raise InputError(f"{where}: layer_name is empty or null")
    if dtype not in DTYPES:
        raise InputError(f"{where} ({name}): dtype {dtype!r} is unknown; expected one of {list(DTYPES)}")
    if shape is None or any(d is None or d < 0 for d in shape):
        raise InputError(f"{where} ({name}): shape {shape!r} must be a list of non-negative ints")
    numel = math.prod(shape)  # Python ints: no overflow on hostile shapes
    if num_params is not None and num_params != numel:
        raise InputError(f"{where} ({name}): num_params {num_params} != product of shape {shape} ({numel})")
    if data is None:
        raise InputError(f"{where} ({name}): data is null")
    itemsize = torch.empty((), dtype=DTYPES[dtype]).element_size()
    if len(data) != numel * itemsize:
        raise InputError(f"{where} ({name}): data has {len(data)} bytes, but shape {shape} x {dtype} "
                         f"needs {numel * itemsize}")
    if numel == 0:
        return torch.empty(shape, dtype=DTYPES[dtype])
    raw = np.array(data, dtype=np.uint8, copy=True) if isinstance(data, np.ndarray) \
        else np.frombuffer(data, dtype=np.uint8).copy()
    return torch.from_numpy(raw).view(DTYPES[dtype]).reshape(shape)


def _check_schema(pf, path: Path) -> None:
    import pyarrow as pa

    names = pf.schema_arrow.names
    missing = [c for c in COLUMNS if c not in names]
    if missing:
        raise InputError(f"{path} lacks column(s) {missing}; ArrowEngine's layout has {list(COLUMNS)}")
    want = {"layer_name": (pa.types.is_string, pa.types.is_large_string),
            "dtype": (pa.types.is_string, pa.types.is_large_string),
            "data": (pa.types.is_binary, pa.types.is_large_binary),
            "num_params": (pa.types.is_integer,),
            "shape": (pa.types.is_list, pa.types.is_large_list)}
    for col, checks in want.items():
        typ = pf.schema_arrow.field(col).type
        if not any(c(typ) for c in checks):
            raise InputError(f"{path}: column {col!r} has type {typ}, expected {_schema().field(col).type}")


def open_weights(path: Path):
    """The ``weights.parquet`` of ``path`` (a directory or the file) as a checked ParquetFile."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    file = path / WEIGHTS_FILE if path.is_dir() else path
    if not file.is_file():
        raise InputError(f"{file} does not exist; an ArrowEngine weights directory holds {WEIGHTS_FILE}")
    try:
        pf = pq.ParquetFile(file)
    except (pa.ArrowException, OSError) as exc:
        raise InputError(f"{file} is not a readable Parquet file: {exc}") from exc
    _check_schema(pf, file)
    return pf, file


class _BinaryColumn:
    """Row ``i`` of a binary column as a read-only uint8 view of Arrow's buffer (no copy;
    ``decode_row`` copies once into the tensor). ``None`` for nulls."""

    def __init__(self, column) -> None:
        import pyarrow as pa

        arr = column.combine_chunks() if column.num_chunks != 1 else column.chunk(0)
        self.arr = arr
        wide = pa.types.is_large_binary(arr.type)
        validity, offsets, values = arr.buffers()
        self.offsets = np.frombuffer(offsets, dtype=np.int64 if wide else np.int32)[arr.offset:]
        self.values = np.frombuffer(values, dtype=np.uint8) if values is not None else np.zeros(0, np.uint8)

    def __getitem__(self, i: int) -> np.ndarray | None:
        if not self.arr[i].is_valid:
            return None
        start, end = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.values[start:end]


def iter_parquet(path: Path, names=None) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (name, tensor) row group by row group; ``names`` (a set or a predicate) filters rows
    before their bytes are decoded, and row groups holding no wanted row are never read."""
    import pyarrow as pa

    pf, file = open_weights(path)
    keep = names if callable(names) or names is None else set(names).__contains__
    seen: set[str] = set()
    row = 0
    for g in range(pf.num_row_groups):
        try:
            layer_names = pf.read_row_group(g, columns=["layer_name"]).column(0).to_pylist()
            wanted = [i for i, n in enumerate(layer_names) if keep is None or keep(n)]
            if not wanted:
                row += len(layer_names)
                continue
            table = pf.read_row_group(g, columns=list(COLUMNS))
        except (pa.ArrowException, OSError) as exc:
            raise InputError(f"{file}: row group {g} is unreadable: {exc}") from exc
        shapes = table.column("shape").to_pylist()
        dtypes = table.column("dtype").to_pylist()
        counts = table.column("num_params").to_pylist()
        data = _BinaryColumn(table.column("data"))
        for i in wanted:
            name = layer_names[i]
            if name in seen:
                raise InputError(f"{file} row {row + i}: layer_name {name!r} appears twice")
            seen.add(name)
            tensor = decode_row(name, shapes[i], dtypes[i], data[i], counts[i], f"{file} row {row + i}")
            yield name, tensor
        row += len(layer_names)


def parquet_names(path: Path) -> list[str]:
    pf, _ = open_weights(path)
    return pf.read(columns=["layer_name"]).column(0).to_pylist()
