"""``LoRAFormat``: reads and writes ``.lora.arrow`` skill cards (v1 and v2).

The normative description is ``docs/card-format.md``. In short: an uncompressed Arrow IPC
file, one record batch, one row per module, tensors as C-order bytes in binary columns.
v1 is ArrowEngine's format; v2 adds per-tensor dtypes, per-module rank and alpha, the naming
scheme, a base-model fingerprint and a checksum, while keeping every v1 column and key.

Loading maps the file copy-on-write (``mmap.ACCESS_COPY``) and returns tensors that view the
mapped pages: nothing is copied until a device or dtype change, and writing to a tensor never
reaches the file. Every declared size is checked against the bytes actually present before
anything is viewed, the way safetensors checks its header.
"""

from __future__ import annotations

import math
import mmap
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import torch

from ..errors import CardFormatError
from . import naming as _naming
from . import spec
from ._ipc import check_ipc_file
from .card import _SKIP_VALUE_SCAN, ALLOWED_DTYPES, LoRACard, dtype_name

__all__ = ["LoRAFormat"]


class _Bad(Exception):
    """Internal: a problem found while reading; turned into CardFormatError with the path."""


class LoRAFormat:
    """Save and load :class:`LoRACard` as ``.lora.arrow`` files (ArrowEngine's method names)."""

    # ------------------------------------------------------------------ writing
    @staticmethod
    def save(card: LoRACard, path: str | os.PathLike, version: int = 2) -> Path:
        """Write ``card`` to ``path`` atomically and return the path.

        Args:
            card: a valid card (it is validated again).
            path: destination; its directory must exist. The file appears complete or not at
                all (temporary file in the same directory, fsync, ``os.replace``, fsync of the
                directory).
            version: 2 (default) or 1. v1 cannot hold bfloat16, A and B of different dtypes,
                or per-module alpha, and refuses such cards rather than losing information;
                the naming scheme and fingerprint go into ``aios_*`` metadata keys, which
                ArrowEngine reads as free metadata.
        """
        if version not in (1, 2):
            raise CardFormatError(f"card version must be 1 or 2, got {version!r}")
        card.validate()
        path = Path(path)
        table = _to_table(card, version)
        directory = path.parent if str(path.parent) else Path(".")
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
        try:
            with os.fdopen(fd, "wb") as f:
                with ipc.new_file(f, table.schema,
                                  options=ipc.IpcWriteOptions(compression=None)) as writer:
                    writer.write_batch(table.to_batches()[0])
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
        _fsync_dir(directory)
        return path

    # ------------------------------------------------------------------ reading
    @staticmethod
    def load(path: str | os.PathLike, verify: bool = True) -> LoRACard:
        """Load a v1 or v2 card, its tensors viewing the mapped file (no copy).

        Args:
            path: a ``.lora.arrow`` file.
            verify: check the v2 checksum and scan values for NaN/inf (default). ``False`` is
                for trusted hot paths: structure, sizes and bounds are still fully checked
                (they guard memory safety), only the O(bytes) hash and value scan are skipped.

        Raises:
            CardFormatError: naming the file and the problem, for anything corrupt,
                truncated, inconsistent or hostile.
        """
        parsed = _read(Path(path), verify=verify)
        if verify and parsed["checksum_status"] == "mismatch":
            raise CardFormatError(
                f"{path}: checksum mismatch: file says {parsed['checksum_stored']}, "
                f"content hashes to {parsed['checksum_computed']} (corrupted or tampered)")
        token = _SKIP_VALUE_SCAN.set(not verify)
        try:
            return _build_card(parsed)
        except CardFormatError as exc:
            raise CardFormatError(f"{path}: {exc}") from None
        finally:
            _SKIP_VALUE_SCAN.reset(token)

    @staticmethod
    def inspect(path: str | os.PathLike) -> dict[str, Any]:
        """Describe a card without building it: name, version, modules with ranks, alphas,
        dtypes and shapes, sizes, metadata and ``checksum`` status (``ok``, ``mismatch`` or
        ``absent``). Raises :class:`CardFormatError` if the file is not a readable card."""
        p = _read(Path(path), verify=True)
        token = _SKIP_VALUE_SCAN.set(True)  # card-level rules, without the value scan
        try:
            _build_card(p)
        except CardFormatError as exc:
            raise CardFormatError(f"{path}: {exc}") from None
        finally:
            _SKIP_VALUE_SCAN.reset(token)
        rows = p["rows"]
        return {
            "path": str(path),
            "version": p["version"],
            "name": p["name"],
            "rank": p["rank"],
            "alpha": p["alpha"],
            "naming": p["naming"],
            "base_fingerprint": p["fingerprint"],
            "target_modules": p["targets"],
            "num_modules": len(rows),
            "modules": [{"module": r["module"], "rank": r["rank"], "alpha": r["alpha"],
                         "dtype_a": r["dtype_a"], "dtype_b": r["dtype_b"],
                         "shape_a": r["shape_a"], "shape_b": r["shape_b"]} for r in rows],
            "ranks": sorted({r["rank"] for r in rows}),
            "dtypes": sorted({r[k] for r in rows for k in ("dtype_a", "dtype_b")}),
            "file_bytes": p["file_bytes"],
            "tensor_bytes": sum(r["len_a"] + r["len_b"] for r in rows),
            "checksum": p["checksum_status"],
            "checksum_value": p["checksum_stored"],
            "metadata": p["metadata"],
        }


# ---------------------------------------------------------------------- writer helpers
def _binary_column(tensors: list[torch.Tensor]) -> pa.Array:
    # One copy: tensor bytes -> one contiguous buffer, offsets computed here.
    parts = [t.detach().to("cpu").contiguous().view(torch.uint8).reshape(-1).numpy() for t in tensors]
    offsets = np.zeros(len(parts) + 1, dtype=np.int64)
    np.cumsum([p.size for p in parts], out=offsets[1:])
    if offsets[-1] >= 2**31:
        raise CardFormatError(
            f"card tensors take {offsets[-1]} bytes in one column; the format's binary columns "
            f"hold < 2 GiB (split the card)")
    data = np.concatenate(parts) if parts else np.zeros(0, np.uint8)
    return pa.Array.from_buffers(pa.binary(), len(parts),
                                 [None, pa.py_buffer(offsets.astype(np.int32)), pa.py_buffer(data)])


def _to_table(card: LoRACard, version: int) -> pa.Table:
    keys = card.modules
    A = [card.weights_A[k] for k in keys]
    B = [card.weights_B[k] for k in keys]
    dta = [dtype_name(t.dtype) for t in A]
    dtb = [dtype_name(t.dtype) for t in B]
    if version == 1:
        bad = [k for k, a, b in zip(keys, dta, dtb) if a != b or a == "bfloat16"]
        if bad:
            raise CardFormatError(
                f"card {card.name!r}: v1 stores one NumPy dtype per row, so it cannot hold "
                f"bfloat16 or A/B of different dtypes (modules {bad[:3]}); save as version=2")
        if card.alpha_pattern:
            raise CardFormatError(
                f"card {card.name!r}: v1 has no per-module alpha (alpha_pattern for "
                f"{sorted(card.alpha_pattern)[:3]}); save as version=2")
    meta: dict[str, str] = {
        "lora_name": card.name,
        "lora_rank": str(card.rank),
        "lora_alpha": repr(float(card.alpha)),
        "target_modules": ",".join(card.target_modules),
        **card.metadata,
    }
    cols: list[pa.Array] = [
        pa.array(keys, pa.string()),
        _binary_column(A),
        _binary_column(B),
        pa.array([list(t.shape) for t in A], pa.list_(pa.int32())),
        pa.array([list(t.shape) for t in B], pa.list_(pa.int32())),
        pa.array(dta, pa.string()),
    ]
    if version == 1:
        if card.naming != _infer_naming(keys):  # only when a reader could not infer it
            meta[spec.KEY_NAMING] = card.naming
        if card.base_fingerprint:
            meta[spec.KEY_FINGERPRINT] = card.base_fingerprint
        names = spec.V1_COLUMNS
    else:
        ranks = [card.module_rank(k) for k in keys]
        alphas = [card.module_alpha(k) for k in keys]
        cols += [pa.array(dta, pa.string()), pa.array(dtb, pa.string()),
                 pa.array(ranks, pa.int32()), pa.array(alphas, pa.float64())]
        meta[spec.KEY_VERSION] = "2"
        meta[spec.KEY_NAMING] = card.naming
        if card.base_fingerprint:
            meta[spec.KEY_FINGERPRINT] = card.base_fingerprint
        bmeta = {k.encode(): v.encode() for k, v in meta.items()}
        rows = zip(keys, dta, dtb, [tuple(t.shape) for t in A], [tuple(t.shape) for t in B],
                   ranks, alphas, _row_bytes(cols[1]), _row_bytes(cols[2]))
        meta[spec.KEY_CHECKSUM] = spec.checksum(rows, bmeta)
        names = spec.V2_COLUMNS
    schema = pa.schema([pa.field(n, t) for n, t in names], metadata=meta)
    return pa.Table.from_arrays(cols, schema=schema)


def _row_bytes(col: pa.Array):
    offs = np.frombuffer(col.buffers()[1], dtype=np.int32)[col.offset:col.offset + len(col) + 1]
    data = memoryview(col.buffers()[2])
    return [data[offs[i]:offs[i + 1]] for i in range(len(col))]


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds (Windows)
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover - some filesystems refuse fsync on directories
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------- reader
def _read(path: Path, verify: bool = True) -> dict[str, Any]:
    try:
        return _read_checked(path, verify)
    except _Bad as exc:
        raise CardFormatError(f"{path}: {exc}") from None
    except (pa.ArrowException, OSError, ValueError, OverflowError, UnicodeDecodeError) as exc:
        if isinstance(exc, CardFormatError):
            raise
        raise CardFormatError(f"{path}: not a readable .lora.arrow card ({type(exc).__name__}: {exc})") from None


def _read_checked(path: Path, verify: bool) -> dict[str, Any]:
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
    reader = ipc.open_file(pa.BufferReader(base))
    if reader.num_record_batches != 1:
        raise _Bad(f"expected exactly 1 record batch, found {reader.num_record_batches}")
    schema = reader.schema
    meta = _check_metadata(schema.metadata or {})
    version = meta.get(spec.KEY_VERSION)
    if version is None:
        v2_only = [k for k in (spec.KEY_CHECKSUM,) if k in meta] + \
            [n for n, _ in spec.V2_COLUMNS[len(spec.V1_COLUMNS):] if n in schema.names]
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
            raise _Bad(f"v{version} column {name!r} is missing (columns: {schema.names})")
        if not schema.field(idx).type.equals(typ):
            raise _Bad(f"column {name!r} has type {schema.field(idx).type}, expected {typ}")
    if len(set(schema.names)) != len(schema.names):
        raise _Bad(f"duplicate column names in {schema.names}")
    batch = reader.get_batch(0)
    n = batch.num_rows
    if n < 1 or n > lim["max_modules"]:
        raise _Bad(f"has {n} rows; expected 1..{lim['max_modules']} modules")
    batch.validate(full=True)  # offsets monotone and within the buffers
    cols = {name: batch.column(name) for name, _ in columns}
    for name, col in cols.items():
        if col.null_count:
            raise _Bad(f"column {name!r} has {col.null_count} null value(s)")
    rows = _check_rows(cols, version, mm, base)
    header = _check_header(meta, rows, version)
    stored = meta.get(spec.KEY_CHECKSUM)
    computed, status = None, "absent"
    if version == 2:
        if stored is None:
            raise _Bad(f"v2 card has no {spec.KEY_CHECKSUM} key")
        if not stored.startswith(spec.CHECKSUM_ALGO + ":"):
            raise _Bad(f"checksum {stored[:40]!r} uses an unknown algorithm; expected {spec.CHECKSUM_ALGO}")
        if verify:
            raw = {k: v for k, v in (schema.metadata or {}).items()}
            computed = spec.checksum(
                ((r["module"], r["dtype_a"], r["dtype_b"], r["shape_a"], r["shape_b"], r["rank"],
                  r["alpha"], r["view_a"], r["view_b"]) for r in rows), raw)
            status = "ok" if computed == stored else "mismatch"
        else:
            status = "unverified"
    return {**header, "version": version, "rows": rows, "metadata": header["metadata"],
            "file_bytes": size, "checksum_stored": stored, "checksum_computed": computed,
            "checksum_status": status, "mmap": mm}


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
    offs = {w: _offsets(cols[w]) for w in ("weight_a", "weight_b")}
    for i, m in enumerate(modules):
        where = f"row {i} (module {m[:80]!r})"
        if not m or len(m.encode()) > lim["max_module_name_bytes"]:
            raise _Bad(f"{where}: module name is empty or longer than {lim['max_module_name_bytes']} bytes")
        if m in seen:
            raise _Bad(f"{where}: duplicate module")
        seen.add(m)
        row: dict[str, Any] = {"module": m}
        for side, shp, dt, col in (("a", shape_a[i], dta[i], "weight_a"), ("b", shape_b[i], dtb[i], "weight_b")):
            if dt not in spec.ITEMSIZE:
                raise _Bad(f"{where}: dtype {dt[:40]!r} for {col} is not one of {sorted(spec.ITEMSIZE)}")
            if len(shp) != 2 or any(d is None or d < 1 or d > lim["max_dim"] for d in shp):
                raise _Bad(f"{where}: shape_{side} {shp[:4]} must be 2 positive dims")
            start, end = int(offs[col][i]), int(offs[col][i + 1])
            nbytes = end - start
            want = shp[0] * shp[1] * spec.ITEMSIZE[dt]  # Python ints: no overflow
            if want != nbytes:
                raise _Bad(f"{where}: shape_{side} {shp} x {dt} needs {want} bytes but {col} "
                           f"holds {nbytes}")
            buf = cols[col].buffers()[2]
            pos = buf.address - base.address + start  # offset of the value inside the mapping
            row.update({f"shape_{side}": tuple(shp), f"dtype_{side}": dt, f"len_{side}": nbytes,
                        f"pos_{side}": pos, f"view_{side}": memoryview(mm)[pos:pos + nbytes]})
        if version == 2:
            if dtype[i] != dta[i]:
                raise _Bad(f"{where}: v1 column dtype {dtype[i][:40]!r} differs from dtype_a {dta[i]!r}")
            r, al = ranks[i], alphas[i]
            if not (1 <= r <= lim["max_rank"]):
                raise _Bad(f"{where}: rank {r} is outside 1..{lim['max_rank']}")
            if not (math.isfinite(al) and al > 0):
                raise _Bad(f"{where}: alpha {al} must be finite and > 0")
        else:
            r, al = row["shape_a"][0], None
        if row["shape_a"][0] != r or row["shape_b"][1] != r:
            raise _Bad(f"{where}: shapes {row['shape_a']} / {row['shape_b']} do not match rank {r}")
        row.update(rank=r, alpha=al)
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


def _tensor(mm: mmap.mmap, pos: int, nbytes: int, dt: str, shape: tuple[int, int]) -> torch.Tensor:
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
    A, B, rank_pattern, alpha_pattern = {}, {}, {}, {}
    for r in p["rows"]:
        m = r["module"]
        A[m] = _tensor(mm, r["pos_a"], r["len_a"], r["dtype_a"], r["shape_a"])
        B[m] = _tensor(mm, r["pos_b"], r["len_b"], r["dtype_b"], r["shape_b"])
        if r["rank"] != p["rank"]:
            rank_pattern[m] = r["rank"]
        if r["alpha"] != p["alpha"]:
            alpha_pattern[m] = r["alpha"]
    return LoRACard(name=p["name"], rank=p["rank"], alpha=p["alpha"],
                    target_modules=p["targets"], weights_A=A, weights_B=B,
                    metadata=p["metadata"], rank_pattern=rank_pattern,
                    alpha_pattern=alpha_pattern, naming=p["naming"],
                    base_fingerprint=p["fingerprint"])
