"""The checked ``.lora.arrow`` reader behind ``LoRAFormat.load`` / ``inspect``.

Order of trust: file size, then the IPC framing from raw bytes (``_ipc``), then pyarrow's
schema and batch (zero-copy over the mapping), then every column, row, shape, dtype and size
against the bytes present, then (optionally) the checksum, and only then tensors viewing the
mapping. Nothing is allocated from a size the file declares before it has been bounded.

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
import struct
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
    lim = spec.LIMITS
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        raise _Bad("no such file") from None
    if not path.is_file():
        raise _Bad("not a regular file")
    if size > lim["max_file_bytes"]:
        raise _Bad(f"file is {size} bytes, over the {lim['max_file_bytes']}-byte limit")
    with open(path, "rb") as f:
        if size < 32:
            raise _Bad(f"file is {size} bytes, too short for an Arrow IPC file (truncated?)")
        # Copy-on-write mapping: tensors may be written to by callers; pages stay shared
        # with the page cache until then and the file itself is never modified.
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
    base = pa.py_buffer(mm)
    # Structural pre-check of the IPC framing (magic, footer, block bounds, no compression),
    # so that pyarrow never allocates from a size we have not bounded.
    check_ipc_file(base, _Bad)
    reader = _arrow("invalid Arrow IPC footer or schema", ipc.open_file, pa.BufferReader(base))
    if reader.num_record_batches != 1:
        raise _Bad(f"expected exactly 1 record batch, found {reader.num_record_batches}")
    schema = reader.schema
    try:
        names = schema.names
    except UnicodeDecodeError:
        raise _Bad("a column name is not UTF-8") from None
    meta = _check_metadata(schema.metadata or {})
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
    cols = {name: batch.column(name) for name, _ in columns}
    for name, col in cols.items():
        if col.null_count:
            raise _Bad(f"column {name!r} has {col.null_count} null value(s)")
    rows = _check_rows(cols, version, mm, base)
    header = _check_header(meta, rows, version)
    stored = meta.get(spec.KEY_CHECKSUM)
    computed, status, job = None, "absent", None
    if version == 2:
        if stored is None:
            raise _Bad(f"v2 card has no {spec.KEY_CHECKSUM} key")
        if not stored.startswith(spec.CHECKSUM_ALGO + ":"):
            raise _Bad(f"checksum {stored[:40]!r} uses an unknown algorithm; expected {spec.CHECKSUM_ALGO}")
        if verify:
            raw = {k: v for k, v in (schema.metadata or {}).items()}
            items = [(r["module"], r["dtype_a"], r["dtype_b"], r["shape_a"], r["shape_b"],
                      r["rank"], r["alpha"], r["view_a"], r["view_b"]) for r in rows]
            job = functools.partial(spec.checksum, items, raw)
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
    return np.frombuffer(col.buffers()[1], dtype=np.int32)[col.offset:col.offset + len(col) + 1]


def _check_rows(cols: dict[str, pa.Array], version: int, mm: mmap.mmap, base: pa.Buffer) -> list[dict]:
    lim = spec.LIMITS
    modules = cols["module"].to_pylist()
    shape_a = cols["shape_a"].to_pylist()
    shape_b = cols["shape_b"].to_pylist()
    dtype = cols["dtype"].to_pylist()
    if version == 2:
        dta, dtb = cols["dtype_a"].to_pylist(), cols["dtype_b"].to_pylist()
        ranks, alphas = cols["rank"].to_pylist(), cols["alpha"].to_pylist()
    else:
        dta, dtb, ranks, alphas = dtype, dtype, [None] * len(modules), [None] * len(modules)
    seen: set[str] = set()
    rows = []
    lo, hi = base.address, base.address + base.size
    for which in ("weight_a", "weight_b"):
        data = cols[which].buffers()[2]
        if data is not None and data.size and not (lo <= data.address and data.address + data.size <= hi):
            raise _Bad(f"column {which!r} does not lie in the file (compressed or foreign buffer)")
    offs = {w: _offsets(cols[w]).tolist() for w in ("weight_a", "weight_b")}
    sizes = spec.ITEMSIZE if version == 2 else spec.V1_ITEMSIZE
    max_dim, max_name = lim["max_dim"], lim["max_module_name_bytes"]
    mv = memoryview(mm)  # one view; rows slice it (no copy)
    starts = {w: cols[w].buffers()[2].address - base.address for w in ("weight_a", "weight_b")
              if cols[w].buffers()[2] is not None}
    for i, m in enumerate(modules):
        if not m or len(m) > max_name // 4 and len(m.encode()) > max_name:
            raise _Bad(f"row {i} (module {m[:80]!r}): module name is empty or longer than {max_name} bytes")
        if m in seen:
            raise _Bad(f"row {i} (module {m[:80]!r}): duplicate module")
        seen.add(m)
        row: dict[str, Any] = {"module": m}
        for side, shp, dt, col in (("a", shape_a[i], dta[i], "weight_a"), ("b", shape_b[i], dtb[i], "weight_b")):
            if dt not in sizes:
                raise _Bad(f"row {i} (module {m[:80]!r}): dtype {dt[:40]!r} for {col} is not one of {sorted(sizes)}")
            if len(shp) != 2 or any(d is None or d < 1 or d > max_dim for d in shp):
                raise _Bad(f"row {i} (module {m[:80]!r}): shape_{side} {shp[:4]} must be 2 positive dims")
            start, end = offs[col][i], offs[col][i + 1]
            nbytes = end - start
            want = shp[0] * shp[1] * sizes[dt]  # Python ints: no overflow
            if want != nbytes:
                raise _Bad(f"row {i} (module {m[:80]!r}): shape_{side} {shp} x {dt} needs {want} bytes "
                           f"but {col} holds {nbytes}")
            pos = starts[col] + start  # offset of the value inside the mapping
            row[f"shape_{side}"] = (shp[0], shp[1])
            row[f"dtype_{side}"] = dt
            row[f"len_{side}"] = nbytes
            row[f"pos_{side}"] = pos
            row[f"view_{side}"] = mv[pos:pos + nbytes]
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
            r, al = row["shape_a"][0], None
        if row["shape_a"][0] != r or row["shape_b"][1] != r:
            raise _Bad(f"row {i} (module {m[:80]!r}): shapes {row['shape_a']} / {row['shape_b']} do not "
                       f"match rank {r}")
        row["rank"] = r
        row["alpha"] = al
        rows.append(row)
    return rows


def _check_header(meta: dict[str, str], rows: list[dict], version: int) -> dict[str, Any]:
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
    for r in rows:
        if r["alpha"] is None:
            r["alpha"] = alpha
    naming = meta.get(spec.KEY_NAMING)
    if naming is None:
        # ArrowEngine's own cards use its internal names; infer the scheme from the keys
        naming = _infer_naming([r["module"] for r in rows])
    if naming not in _naming.SCHEMES:
        raise _Bad(f"{spec.KEY_NAMING} {naming[:40]!r} is not one of {_naming.SCHEMES}")
    free = {k: v for k, v in meta.items()
            if k not in spec.HEADER_KEYS and not k.startswith("aios_")}
    # ArrowEngine may list short targets ("attention.query") or none at all
    targets = [t for t in meta["target_modules"].split(",") if t] or sorted(r["module"] for r in rows)
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


def _build_card(p: dict[str, Any]) -> LoRACard:
    mm = p["mmap"]
    arr = np.frombuffer(mm, dtype=np.uint8)  # one view of the whole (copy-on-write) mapping
    A, B, rank_pattern, alpha_pattern = {}, {}, {}, {}
    for r in p["rows"]:
        m = r["module"]
        A[m] = _tensor(mm, r["pos_a"], r["len_a"], r["dtype_a"], r["shape_a"], arr)
        B[m] = _tensor(mm, r["pos_b"], r["len_b"], r["dtype_b"], r["shape_b"], arr)
        if r["rank"] != p["rank"]:
            rank_pattern[m] = r["rank"]
        if r["alpha"] != p["alpha"]:
            alpha_pattern[m] = r["alpha"]
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
