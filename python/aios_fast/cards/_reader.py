"""The checked ``.lora.arrow`` reader behind ``LoRAFormat.load`` / ``inspect``.

Order of trust: file size, then the IPC framing from raw bytes (``_ipc``), then pyarrow's
schema and batch (zero-copy over the mapping), then every column, row, shape, dtype and size
against the bytes present, then (optionally) the checksum, and only then tensors viewing the
mapping. Nothing is allocated from a size the file declares before it has been bounded.

First, though, the compiled reader (``_C.card_layout``, ``csrc/card_layout.cpp``) tries the
file: one call that verifies and decodes a card laid out exactly as pyarrow writes one, rows
checked, and declines anything else. pyarrow's general machinery (footer and schema objects,
a batch, an array per column, a Python object per value) was most of a small card's load
time. The compiled reader is a fast path, not a second judge: what it accepts, this path
accepts with the same rows (tests/test_card_layout.py fuzzes that), and what it declines
comes here, so every refusal keeps this path's reason.

The row checks run on whole columns (builtins over the lists Arrow hands over, no Python
loop per module); only when a row may be bad does the row-by-row pass run, to name it.

Every refusal is a deliberate check with its own reason (``_Bad``), including pyarrow's own
refusals of malformed IPC structures, which are caught where pyarrow is called. Any other
exception (``KeyError``, ``IndexError``, ``struct.error``...) escaping the checks is a reader
bug: users still get a :class:`CardFormatError` naming the file, but under :func:`strict`
(used by the tests) it propagates unchanged, so the hostile-file tests and the fuzz test can
tell a refusal from a bug.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import math
import mmap
import os
import stat
import struct
from itertools import chain, repeat
from operator import add, getitem, mul, sub
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import torch

from ..errors import CardFormatError
from . import naming as _naming
from . import spec
from ._ipc import check_ipc_file
from .card import _TRUSTED_LAYOUT, ALLOWED_DTYPES, LoRACard


class _Bad(Exception):
    """Internal: a problem found while reading; turned into CardFormatError with the path."""


_STRICT: contextvars.ContextVar[bool] = contextvars.ContextVar("aios_card_reader_strict", default=False)


@contextlib.contextmanager
def strict() -> Iterator[None]:
    """Tests: inside the block, an unexpected internal exception in the reader propagates as
    itself instead of being wrapped into a generic :class:`CardFormatError`."""
    token = _STRICT.set(True)
    try:
        yield
    finally:
        _STRICT.reset(token)


def is_strict() -> bool:
    """True inside :func:`strict`."""
    return _STRICT.get()


def _arrow(what: str, fn, *args):
    """Run a pyarrow call on untrusted bytes; its refusal becomes a ``_Bad`` naming ``what``."""
    try:
        return fn(*args)
    except (pa.ArrowException, OSError, ValueError) as exc:
        raise _Bad(f"{what}: {str(exc).splitlines()[0][:200]}") from None


def _read(path: Path, verify: bool = True, defer_checksum: bool = False) -> dict[str, Any]:
    """Parse and check ``path``. With ``defer_checksum`` the O(bytes) hash is not run here:
    ``result["checksum_job"]`` computes it, so the caller can overlap it with other work."""
    try:
        return _read_checked(path, verify, defer_checksum)
    except _Bad as exc:
        raise CardFormatError(f"{path}: {exc}") from None
    except OSError as exc:  # opening / mapping the file itself
        raise CardFormatError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except (pa.ArrowException, ValueError, OverflowError, UnicodeDecodeError,
            struct.error, IndexError, KeyError, TypeError) as exc:
        if isinstance(exc, CardFormatError) or _STRICT.get():
            raise  # strict: a reader bug, not a refusal
        raise CardFormatError(f"{path}: not a readable .lora.arrow card ({type(exc).__name__}: {exc})") from None


def _read_checked(path: Path, verify: bool, defer_checksum: bool = False) -> dict[str, Any]:
    size, mm = _map(path)
    # The compiled reader decodes a plainly laid out card in one call; anything else (damaged,
    # hostile, unusual, or no compiled module) goes through the checked pyarrow path, which
    # names the problem. Both hand over the same rows for every card the fast one accepts.
    layout = _layout_fast(mm)
    version, raw_meta, meta, rows = layout if layout is not None else _layout_checked(mm)
    header = _check_header(meta, rows, version)
    stored = meta.get(spec.KEY_CHECKSUM)
    computed, status, job = None, "absent", None
    if version == 2:
        if stored is None:
            raise _Bad(f"v2 card has no {spec.KEY_CHECKSUM} key")
        algo = stored.partition(":")[0]
        if algo not in spec.CHECKSUM_ALGOS:
            raise _Bad(f"checksum {stored[:40]!r} uses an unknown algorithm; expected one of "
                       f"{', '.join(spec.CHECKSUM_ALGOS)}")
        if verify:
            job = rows.checksum_job(memoryview(mm), raw_meta, algo)
            if defer_checksum:
                status = "pending"
            else:
                computed = job()
                status = "ok" if computed == stored else "mismatch"
        else:
            status = "unverified"
    return {**header, "version": version, "rows": rows, "metadata": header["metadata"],
            "file_bytes": size, "checksum_stored": stored, "checksum_computed": computed,
            "checksum_status": status, "checksum_job": job, "mmap": mm}


def _map(path: Path) -> tuple[int, mmap.mmap]:
    """(size, copy-on-write mapping) of a regular file within the size limits."""
    lim = spec.LIMITS
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise _Bad("no such file") from None
    if not stat.S_ISREG(st.st_mode):
        raise _Bad("not a regular file")
    size = st.st_size
    if size > lim["max_file_bytes"]:
        raise _Bad(f"file is {size} bytes, over the {lim['max_file_bytes']}-byte limit")
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_BINARY", 0))
    try:
        if size < 32:
            raise _Bad(f"file is {size} bytes, too short for an Arrow IPC file (truncated?)")
        # Copy-on-write mapping: tensors may be written to by callers; pages stay shared
        # with the page cache until then and the file itself is never modified.
        mm = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
    finally:
        os.close(fd)
    return size, mm


def _card_layout():
    """``_C.card_layout``, or None without the compiled module (looked up once)."""
    global _CARD_LAYOUT
    if _CARD_LAYOUT is False:
        from .. import _native

        _CARD_LAYOUT = _native.native().card_layout if _native.has("card_layout") else None
    return _CARD_LAYOUT


_CARD_LAYOUT: Any = False


def _layout_fast(mm: mmap.mmap | bytes) -> tuple[int, dict[bytes, bytes], dict[str, str], _Rows] | None:
    """(version, raw metadata, metadata, rows) from the compiled reader, or None whenever it
    declines the file or any check up to the rows would refuse it: the checked path then
    runs from the start and raises the first problem in its order, with its own words.

    The compiled reader (``csrc/card_layout.cpp``) accepts only files that the framing
    pre-check, pyarrow's reader and ``validate(full=True)`` accept, with the exact v1/v2
    schema, no nulls, and rows that pass every check of :func:`_rows_by_row`; what is left
    here is the metadata and its version key, checked as the checked path does."""
    fn = _card_layout()
    if fn is None:
        return None
    lim = spec.LIMITS
    got = fn(mm, lim["max_modules"], lim["max_module_name_bytes"], lim["max_dim"], lim["max_rank"])
    if got is None:
        return None
    version, raw_meta, (modules, dta, dtb, shape_a, shape_b, start_a, offs_a, start_b, offs_b, rank, alpha) = got
    try:
        meta = _check_metadata(raw_meta)
    except _Bad:
        return None
    declared = meta.get(spec.KEY_VERSION)
    if declared != ("2" if version == 2 else None) or (version == 1 and spec.KEY_CHECKSUM in meta):
        return None  # a version key that disagrees with the columns: the checked path says how
    rows = _Rows(modules, {"a": dta, "b": dtb}, {"a": shape_a, "b": shape_b}, {"a": start_a, "b": start_b},
                 {"a": offs_a, "b": offs_b}, rank, alpha)
    return version, raw_meta, meta, rows


def _layout_checked(mm: mmap.mmap | bytes) -> tuple[int, dict[bytes, bytes], dict[str, str], _Rows]:
    """The same as :func:`_layout_fast` through pyarrow, every refusal with its reason."""
    lim = spec.LIMITS
    base = pa.py_buffer(mm)
    # Structural pre-check of the IPC framing (magic, footer, block bounds, no compression),
    # so that pyarrow never allocates from a size we have not bounded.
    check_ipc_file(base, _Bad)
    reader = _arrow("invalid Arrow IPC footer or schema", ipc.open_file, base)
    if reader.num_record_batches != 1:
        raise _Bad(f"expected exactly 1 record batch, found {reader.num_record_batches}")
    schema = reader.schema
    try:
        names = schema.names
    except UnicodeDecodeError:
        raise _Bad("a column name is not UTF-8") from None
    raw_meta = schema.metadata or {}
    meta = _check_metadata(raw_meta)
    version = meta.get(spec.KEY_VERSION)
    if version is None:
        v2_only = [k for k in (spec.KEY_CHECKSUM,) if k in meta] + \
            [n for n, _ in spec.V2_COLUMNS[len(spec.V1_COLUMNS):] if n in names]
        if v2_only:
            # a damaged version key must not downgrade a v2 card to unchecked v1
            raise _Bad(f"has no {spec.KEY_VERSION} key (so v1) but carries v2 parts {v2_only}")
        version, columns = 1, spec.V1_COLUMNS
    elif version == "2":
        version, columns = 2, spec.V2_COLUMNS
    else:
        raise _Bad(f"{spec.KEY_VERSION} is {version!r}; this reader knows '2' (or none for v1)")
    exact = schema.equals(_SCHEMAS[version])  # exactly a card's columns: one comparison
    if not exact:
        for name, typ in columns:
            idx = schema.get_field_index(name)
            if idx < 0:
                raise _Bad(f"v{version} column {name!r} is missing (columns: {names})")
            if not schema.field(idx).type.equals(typ):
                raise _Bad(f"column {name!r} has type {schema.field(idx).type}, expected {typ}")
        if len(set(names)) != len(names):
            raise _Bad(f"duplicate column names in {names}")
    batch = _arrow("invalid Arrow record batch", reader.get_batch, 0)
    n = batch.num_rows
    if n < 1 or n > lim["max_modules"]:
        raise _Bad(f"has {n} rows; expected 1..{lim['max_modules']} modules")
    _arrow("invalid Arrow record batch", functools.partial(batch.validate, full=True))  # offsets in bounds
    if exact:
        cols = dict(zip(names, batch.columns))
    else:
        cols = {name: batch.column(name) for name, _ in columns}
    for name, col in cols.items():
        if col.null_count:
            raise _Bad(f"column {name!r} has {col.null_count} null value(s)")
    return version, raw_meta, meta, _check_rows(cols, version, base)


#: the exact schema a card has (field names, types, nullability; metadata aside), per version
_SCHEMAS = {1: pa.schema([pa.field(n, t) for n, t in spec.V1_COLUMNS]),
            2: pa.schema([pa.field(n, t) for n, t in spec.V2_COLUMNS])}


def _check_metadata(raw: dict[bytes, bytes]) -> dict[str, str]:
    lim = spec.LIMITS
    if len(raw) > lim["max_metadata_entries"]:
        raise _Bad(f"schema metadata has {len(raw)} entries, over the limit {lim['max_metadata_entries']}")
    total = 0
    out: dict[str, str] = {}
    for k, v in raw.items():
        total += len(k) + len(v)
        if len(k) > lim["max_metadata_key_bytes"] or len(v) > lim["max_metadata_value_bytes"]:
            raise _Bad(f"schema metadata entry {k[:40]!r} is too large ({len(k)}-byte key, "
                       f"{len(v)}-byte value)")
        try:
            out[k.decode("utf-8")] = v.decode("utf-8")
        except UnicodeDecodeError:
            raise _Bad(f"schema metadata entry {k[:40]!r} is not UTF-8") from None
    if total > lim["max_metadata_bytes"]:
        raise _Bad(f"schema metadata is {total} bytes, over the limit {lim['max_metadata_bytes']}")
    return out


def _offsets(col: pa.Array) -> np.ndarray:
    # the buffer may run past the last offset (padding, or bytes a hostile writer appended);
    # validate(full=True) has checked that it holds at least these
    return np.frombuffer(col.buffers()[1], dtype=np.int32, count=col.offset + len(col) + 1)[col.offset:]


class _Rows:
    """The checked rows, held column by column (one list per field, as Arrow hands them over),
    with no object per row: checks, checksum and tensors work on whole columns.

    Per side (``"a"``, ``"b"``): ``start``, where the tensor column's values begin in the
    mapping; ``offs``, its n + 1 value offsets (Arrow lays the values end to end, so tensor i is
    ``start + offs[i] .. start + offs[i + 1]``); ``shape``, ``[rows, cols]`` per tensor;
    ``dtype``, a name per tensor; ``uniform``, the side's one dtype name, or None when rows mix
    dtypes. ``alpha`` is None for v1 until the header supplies the card's alpha."""

    __slots__ = ("modules", "dtype", "shape", "start", "offs", "rank", "alpha", "uniform")

    def __init__(self, modules: list[str], dtype: dict[str, list[str]], shape: dict[str, list[list[int]]],
                 start: dict[str, int], offs: dict[str, list[int]], rank: list[int], alpha: list[float] | None):
        self.modules, self.dtype, self.shape, self.start, self.offs = modules, dtype, shape, start, offs
        self.rank, self.alpha = rank, alpha
        self.uniform = {s: d[0] if d.count(d[0]) == len(d) else None for s, d in dtype.items()}

    def __len__(self) -> int:
        return len(self.modules)

    def span(self, side: str) -> tuple[int, int]:
        """(start, end) in the mapping of all of one side's tensor bytes."""
        offs = self.offs[side]
        return self.start[side] + offs[0], self.start[side] + offs[-1]

    def pos(self, side: str) -> list[int]:
        return list(map(add, self.offs[side][:-1], repeat(self.start[side])))

    def nbytes(self, side: str) -> list[int]:
        offs = self.offs[side]
        return list(map(sub, offs[1:], offs[:-1]))

    def tensor_bytes(self) -> int:
        return sum(e - s for s, e in map(self.span, ("a", "b")))

    def records(self) -> list[dict[str, Any]]:
        """One dict per row (``inspect``)."""
        return [{"module": m, "rank": r, "alpha": al, "dtype_a": da, "dtype_b": db,
                 "shape_a": tuple(a), "shape_b": tuple(b)}
                for m, r, al, da, db, a, b in zip(self.modules, self.rank, self.alpha, self.dtype["a"],
                                                  self.dtype["b"], self.shape["a"], self.shape["b"])]

    def checksum_job(self, mv: memoryview, raw_meta: dict[bytes, bytes], algo: str) -> functools.partial:
        """A call computing the card's ``algo`` checksum over ``mv`` (the mapping), no copy."""
        if algo == "sha256":
            return functools.partial(spec.checksum, self.checksum_items(mv), raw_meta, "sha256")
        # xxh3-128 hashes each side's tensors as the one span Arrow stores them in
        headers = zip(self.modules, self.dtype["a"], self.dtype["b"], self.shape["a"], self.shape["b"],
                      self.rank, self.alpha, self.nbytes("a"), self.nbytes("b"))
        a, b = (mv[slice(*self.span(side))] for side in ("a", "b"))
        return functools.partial(spec.checksum_xxh3, headers, (a,), (b,), raw_meta)

    def checksum_items(self, mv: memoryview) -> list[tuple]:
        """The rows as ``spec.checksum`` takes them, tensors as views of ``mv`` (no copy)."""
        views = {}
        for side in ("a", "b"):
            pos = self.pos(side)
            views[side] = list(map(getitem, repeat(mv), map(slice, pos, map(add, pos, self.nbytes(side)))))
        return list(zip(self.modules, self.dtype["a"], self.dtype["b"], self.shape["a"], self.shape["b"],
                        self.rank, self.alpha, views["a"], views["b"]))


_SIDES = (("a", "weight_a"), ("b", "weight_b"))


def _check_rows(cols: dict[str, pa.Array], version: int, base: pa.Buffer) -> _Rows:
    lo, hi = base.address, base.address + base.size
    starts = {}
    for side, which in _SIDES:
        data = cols[which].buffers()[2]
        if data is not None and data.size and not (lo <= data.address and data.address + data.size <= hi):
            raise _Bad(f"column {which!r} does not lie in the file (compressed or foreign buffer)")
        if data is not None:
            starts[side] = data.address - lo  # offset of the column's values inside the mapping
    lists = {name: col.to_pylist() for name, col in cols.items() if name not in ("weight_a", "weight_b")}
    lists.update({f"offs_{side}": _offsets(cols[which]).tolist() for side, which in _SIDES})
    # Every check on whole columns at once; only when one fails does the row-by-row pass run,
    # to name the first bad row and its problem exactly.
    return _rows_by_column(lists, version, starts) or _rows_by_row(lists, version, starts)


def _rows_by_column(cols: dict[str, list], version: int, starts: dict[str, int]) -> _Rows | None:
    """The rows when every row passes every check of :func:`_rows_by_row`; None when some row
    might not (it is never more lenient). ``cols`` holds each column as a list (the tensor
    columns as their n + 1 offsets, ``offs_a`` / ``offs_b``); ``starts`` where each tensor
    column's values begin in the mapping.

    Each check is one builtin (``min``, ``max``, ``set``, list equality, ``map`` with an
    operator) over a whole column, looping in C: for a small card that is cheaper than NumPy,
    whose calls cost a microsecond or two each whatever the length, and for a large one it is
    still a small part of the load."""
    lim = spec.LIMITS
    if len(starts) != 2:
        return None
    modules = cols["module"]
    n = len(modules)
    # a name of at most max/4 characters has at most max UTF-8 bytes; longer ones go row by row
    if (min(map(len, modules)) < 1 or max(map(len, modules)) > lim["max_module_name_bytes"] // 4
            or len(set(modules)) != n):
        return None
    dtype = cols["dtype"]
    if version == 2:
        dtypes = {"a": cols["dtype_a"], "b": cols["dtype_b"]}
        if dtypes["a"] != dtype:
            return None
    else:
        dtypes = {"a": dtype, "b": dtype}
    sizes = spec.ITEMSIZE if version == 2 else spec.V1_ITEMSIZE
    shape, offs, dims = {}, {}, {}
    for side, which in _SIDES:
        dts = dtypes[side]
        kinds = set(dts)
        if not kinds <= sizes.keys():
            return None
        shp = cols[f"shape_{side}"]
        if set(map(len, shp)) != {2}:
            return None
        flat = list(chain.from_iterable(shp))
        if None in flat or min(flat) < 1 or max(flat) > lim["max_dim"]:
            return None
        off = cols[f"offs_{side}"]
        # Python ints: no overflow however large the declared dims
        elems = map(mul, flat[0::2], flat[1::2])
        item = repeat(sizes[dts[0]]) if len(kinds) == 1 else map(sizes.__getitem__, dts)
        if list(map(mul, elems, item)) != list(map(sub, off[1:], off[:-1])):
            return None
        shape[side], offs[side], dims[side] = shp, off, flat
    if version == 2:
        rank, alpha = cols["rank"], cols["alpha"]
        if (min(rank) < 1 or max(rank) > lim["max_rank"]
                or not all(map(math.isfinite, alpha)) or min(alpha) <= 0):
            return None
    else:
        rank, alpha = dims["a"][0::2], None
    if dims["a"][0::2] != rank or dims["b"][1::2] != rank:
        return None
    return _Rows(modules, dtypes, shape, starts, offs, rank, alpha)


def _rows_by_row(cols: dict[str, list], version: int, starts: dict[str, int]) -> _Rows:
    """Every check, row by row, raising ``_Bad`` that names the first bad row."""
    lim = spec.LIMITS
    modules, shape_a, shape_b, dtype = cols["module"], cols["shape_a"], cols["shape_b"], cols["dtype"]
    if version == 2:
        dta, dtb, ranks, alphas = cols["dtype_a"], cols["dtype_b"], cols["rank"], cols["alpha"]
    else:
        dta, dtb, ranks, alphas = dtype, dtype, [None] * len(modules), [None] * len(modules)
    seen: set[str] = set()
    offs = {s: cols[f"offs_{s}"] for s, _ in _SIDES}
    sizes = spec.ITEMSIZE if version == 2 else spec.V1_ITEMSIZE
    max_dim, max_name = lim["max_dim"], lim["max_module_name_bytes"]
    for i, m in enumerate(modules):
        if not m or len(m) > max_name // 4 and len(m.encode()) > max_name:
            raise _Bad(f"row {i} (module {m[:80]!r}): module name is empty or longer than {max_name} bytes")
        if m in seen:
            raise _Bad(f"row {i} (module {m[:80]!r}): duplicate module")
        seen.add(m)
        for side, shp, dt, col in (("a", shape_a[i], dta[i], "weight_a"), ("b", shape_b[i], dtb[i], "weight_b")):
            if dt not in sizes:
                raise _Bad(f"row {i} (module {m[:80]!r}): dtype {dt[:40]!r} for {col} is not one of {sorted(sizes)}")
            if len(shp) != 2 or any(d is None or d < 1 or d > max_dim for d in shp):
                raise _Bad(f"row {i} (module {m[:80]!r}): shape_{side} {shp[:4]} must be 2 positive dims")
            nbytes = offs[side][i + 1] - offs[side][i]
            want = shp[0] * shp[1] * sizes[dt]  # Python ints: no overflow
            if want != nbytes:
                raise _Bad(f"row {i} (module {m[:80]!r}): shape_{side} {shp} x {dt} needs {want} bytes "
                           f"but {col} holds {nbytes}")
        sa, sb = tuple(shape_a[i]), tuple(shape_b[i])
        if version == 2:
            if dtype[i] != dta[i]:
                raise _Bad(f"row {i} (module {m[:80]!r}): v1 column dtype {dtype[i][:40]!r} differs from "
                           f"dtype_a {dta[i]!r}")
            r, al = ranks[i], alphas[i]
            if not (1 <= r <= lim["max_rank"]):
                raise _Bad(f"row {i} (module {m[:80]!r}): rank {r} is outside 1..{lim['max_rank']}")
            if not (math.isfinite(al) and al > 0):
                raise _Bad(f"row {i} (module {m[:80]!r}): alpha {al} must be finite and > 0")
        else:
            r = sa[0]
            ranks[i] = r
        if sa[0] != r or sb[1] != r:
            raise _Bad(f"row {i} (module {m[:80]!r}): shapes {sa} / {sb} do not match rank {r}")
    # every row passed (a card the column checks turned away for a harmless reason)
    return _Rows(modules, {"a": dta, "b": dtb}, {"a": shape_a, "b": shape_b}, starts, offs, ranks,
                 alphas if version == 2 else None)


def _check_header(meta: dict[str, str], rows: _Rows, version: int) -> dict[str, Any]:
    for k in spec.HEADER_KEYS:
        if k not in meta:
            raise _Bad(f"schema metadata key {k!r} is missing")
    try:
        rank = int(meta["lora_rank"])
        alpha = float(meta["lora_alpha"])
    except ValueError:
        raise _Bad(f"lora_rank {meta['lora_rank'][:40]!r} / lora_alpha {meta['lora_alpha'][:40]!r} "
                   f"are not numbers") from None
    if not (1 <= rank <= spec.LIMITS["max_rank"]) or not (math.isfinite(alpha) and alpha > 0):
        raise _Bad(f"lora_rank {rank} / lora_alpha {alpha} out of range (rank 1..65536, alpha > 0)")
    if rows.alpha is None:  # v1: every module has the card's alpha
        rows.alpha = [alpha] * len(rows)
    naming = meta.get(spec.KEY_NAMING)
    if naming is None:
        # ArrowEngine's own cards use its internal names; infer the scheme from the keys
        naming = _infer_naming(rows.modules)
    if naming not in _naming.SCHEMES:
        raise _Bad(f"{spec.KEY_NAMING} {naming[:40]!r} is not one of {_naming.SCHEMES}")
    free = {k: v for k, v in meta.items()
            if k not in spec.HEADER_KEYS and not k.startswith("aios_")}
    # ArrowEngine may list short targets ("attention.query") or none at all
    targets = list(filter(None, meta["target_modules"].split(","))) or sorted(rows.modules)
    return {"name": meta["lora_name"], "rank": rank, "alpha": alpha, "targets": targets,
            "naming": naming, "fingerprint": meta.get(spec.KEY_FINGERPRINT), "metadata": free}


def _infer_naming(keys: list[str]) -> str:
    """v1 files without ``aios_naming``: ArrowEngine's own names mean "arrowengine"."""
    return "arrowengine" if any(_naming.to_hf(k) != k for k in keys) else "hf"


_NP = {"float32": np.float32, "float16": np.float16}


def _tensor(mm: mmap.mmap, pos: int, nbytes: int, dt: str, shape: tuple[int, int],
            arr: np.ndarray | None = None) -> torch.Tensor:
    if arr is not None and dt in _NP and not pos % spec.ITEMSIZE[dt]:
        # NumPy slicing and one from_numpy: cheaper than torch.frombuffer + reshape per tensor
        # (a small card's load time was mostly these per-tensor calls). Shares the mapping.
        return torch.from_numpy(arr[pos:pos + nbytes].view(_NP[dt]).reshape(shape))
    if dt == "float64":
        # v1 only (NumPy's default dtype, which ArrowEngine may have written): cards hold
        # float32 at most, so this one is converted, which copies
        raw = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=pos).clone()
        return raw.view(torch.float64).reshape(shape).to(torch.float32)
    dtype = ALLOWED_DTYPES[dt]
    count = nbytes // spec.ITEMSIZE[dt]
    if pos % spec.ITEMSIZE[dt]:
        # Values of mixed-dtype columns need not be aligned to their item size; kernels
        # may assume alignment, so such a tensor is copied (bytes, then reinterpreted).
        raw = torch.frombuffer(mm, dtype=torch.uint8, count=nbytes, offset=pos).clone()
        return raw.view(dtype).reshape(shape)
    return torch.frombuffer(mm, dtype=dtype, count=count, offset=pos).reshape(shape)


def _side_tensors(mm: mmap.mmap, rows: _Rows, side: str) -> dict[str, torch.Tensor]:
    """Module -> tensor for one side, each viewing the mapping (its own NumPy array, so its own
    torch storage). The loop runs in C (``map``): per tensor one ``np.ndarray`` over the mapping
    at the tensor's offset, and one ``torch.from_numpy``."""
    dt = rows.uniform[side]
    lo, _ = rows.span(side)
    if dt in _VIEW and not lo % spec.ITEMSIZE[dt]:
        npdt, torch_dt = _VIEW[dt]
        arrays = map(np.ndarray, rows.shape[side], repeat(npdt), repeat(mm), rows.pos(side))
        tensors = map(torch.from_numpy, arrays)
        if torch_dt is not None:
            tensors = map(torch.Tensor.view, tensors, repeat(torch_dt))
        return dict(zip(rows.modules, tensors))
    # rows of several dtypes, unaligned values, v1 float64: tensor by tensor
    arr = np.frombuffer(mm, dtype=np.uint8)  # one view of the whole (copy-on-write) mapping
    return {m: _tensor(mm, p, n, d, tuple(s), arr)
            for m, p, n, d, s in zip(rows.modules, rows.pos(side), rows.nbytes(side), rows.dtype[side],
                                     rows.shape[side])}


#: dtype name -> (NumPy dtype to view the bytes as, torch dtype to reinterpret that as, or None)
_VIEW = {"float32": (np.dtype(np.float32), None), "float16": (np.dtype(np.float16), None),
         "bfloat16": (np.dtype(np.uint16), torch.bfloat16)}


def _build_card(p: dict[str, Any]) -> LoRACard:
    mm, rows = p["mmap"], p["rows"]
    A = _side_tensors(mm, rows, "a")
    B = _side_tensors(mm, rows, "b")
    rank_pattern, alpha_pattern = {}, {}
    for pattern, values, default in ((rank_pattern, rows.rank, p["rank"]),
                                     (alpha_pattern, rows.alpha, p["alpha"])):
        if values.count(default) != len(values):  # per module only where some differ
            pattern.update((m, v) for m, v in zip(rows.modules, values) if v != default)
    # The rows' dtypes, 2-D shapes and ranks were checked above: the card skips those checks.
    token = _TRUSTED_LAYOUT.set(True)
    try:
        return LoRACard(name=p["name"], rank=p["rank"], alpha=p["alpha"],
                        target_modules=p["targets"], weights_A=A, weights_B=B,
                        metadata=p["metadata"], rank_pattern=rank_pattern,
                        alpha_pattern=alpha_pattern, naming=p["naming"],
                        base_fingerprint=p["fingerprint"])
    finally:
        _TRUSTED_LAYOUT.reset(token)
