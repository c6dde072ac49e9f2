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

import os
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.ipc as ipc
import torch

from ..errors import CardFormatError
from . import spec
from .._atomic import atomic_write
from ._reader import _build_card, _infer_naming, _read
from .card import _SKIP_VALUE_SCAN, LoRACard, dtype_name

__all__ = ["LoRAFormat"]


_INLINE_HASH_BYTES = 4 << 20


@lru_cache(maxsize=1)
def _hash_pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="aios-card-hash")


class LoRAFormat:
    """Save and load :class:`LoRACard` as ``.lora.arrow`` files (ArrowEngine's method names)."""

    # ------------------------------------------------------------------ writing
    @staticmethod
    def save(card: LoRACard, path: str | os.PathLike, version: int = 2,
             checksum: str = spec.CHECKSUM_ALGO) -> Path:
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
            checksum: the v2 checksum's algorithm: ``"xxh3-128"`` (default) or ``"sha256"``,
                which aios-fast readers from before 2026-12-06 need (they refuse xxh3-128 as
                an unknown algorithm). Readers verify either.
        """
        if version not in (1, 2):
            raise CardFormatError(f"card version must be 1 or 2, got {version!r}")
        if checksum not in spec.CHECKSUM_ALGOS:
            raise CardFormatError(f"checksum must be one of {', '.join(spec.CHECKSUM_ALGOS)}, got {checksum!r}")
        card.validate()
        table = _to_table(card, version, checksum)

        def write(f) -> None:
            with ipc.new_file(f, table.schema, options=ipc.IpcWriteOptions(compression=None)) as w:
                w.write_batch(table.to_batches()[0])

        return atomic_write(path, write)

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
        parsed = _read(path if isinstance(path, Path) else Path(path), verify=verify, defer_checksum=True)
        # A large card's SHA-256 (cards written before XXH3) runs on a worker thread (hashlib
        # releases the GIL on large buffers) while this thread builds and value-scans the card;
        # no tensor leaves before both are done. XXH3 runs at memory speed and small cards hash
        # inline: handing them to a thread cost more (queue and wake-up) than hashing them here.
        job = parsed["checksum_job"]
        inline = job is not None and (not parsed["checksum_stored"].startswith("sha256:")
                                      or parsed["rows"].tensor_bytes() < _INLINE_HASH_BYTES)
        pending = _hash_pool().submit(job) if job is not None and not inline else None
        # The value scan, over each tensor column's values buffer at once instead of tensor by
        # tensor (a small card's verify time was mostly per-tensor calls); only when it finds a
        # NaN/inf does the card's per-tensor scan run, to name the module.
        token = _SKIP_VALUE_SCAN.set(not verify or _columns_finite(parsed))
        built: LoRACard | None = None
        error: CardFormatError | None = None
        try:
            built = _build_card(parsed)
        except CardFormatError as exc:
            error = CardFormatError(f"{path}: {exc}")
        finally:
            _SKIP_VALUE_SCAN.reset(token)
        if pending is not None or inline:
            computed = job() if inline else pending.result()
            if computed != parsed["checksum_stored"]:
                # a mismatch explains any other problem found in the same bytes: report it first
                raise CardFormatError(
                    f"{path}: checksum mismatch: file says {parsed['checksum_stored']}, "
                    f"content hashes to {computed} (corrupted or tampered)")
        if error is not None:
            raise error
        return built

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
        records = rows.records()
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
            "modules": records,
            "ranks": sorted({r["rank"] for r in records}),
            "dtypes": sorted({r[k] for r in records for k in ("dtype_a", "dtype_b")}),
            "file_bytes": p["file_bytes"],
            "tensor_bytes": rows.tensor_bytes(),
            "checksum": p["checksum_status"],
            "checksum_value": p["checksum_stored"],
            "metadata": p["metadata"],
        }


def _columns_finite(parsed: dict[str, Any]) -> bool:
    """True when every value of both tensor columns is finite, each column's values buffer
    (all its tensors, end to end) scanned at once; False when a column holds a NaN/inf or mixes
    dtypes or is unaligned (the card's per-tensor scan then decides and names the module)."""
    rows, mm = parsed["rows"], parsed["mmap"]
    for side in ("a", "b"):
        dt = rows.uniform[side]
        if dt not in spec.ITEMSIZE:  # mixed dtypes, or v1 float64 (converted per tensor anyway)
            return False
        start, end = rows.span(side)
        if start % spec.ITEMSIZE[dt] or not _finite(mm, start, end, dt):
            return False
    return True


def _finite(mm, start: int, end: int, dt: str) -> bool:
    """No NaN/inf among the ``dt`` values in ``mm[start:end]``. Single-threaded NumPy (a torch
    reduction this size wakes its OpenMP pool, which cost more than the scan)."""
    count = (end - start) // spec.ITEMSIZE[dt]
    if not count:
        return True
    if dt == "float32":
        # max and min propagate NaN and reach +-inf: two SIMD passes, no temporary array
        v = np.frombuffer(mm, dtype=np.float32, count=count, offset=start)
        return bool(np.isfinite(v.max()) and np.isfinite(v.min()))
    # 16-bit floats: NaN/inf <=> exponent bits all ones <=> magnitude bits >= the inf pattern
    # (NumPy's float16 max is not vectorised; bfloat16 is not a NumPy type)
    u = np.frombuffer(mm, dtype=np.uint16, count=count, offset=start)
    inf = _INF16[dt]
    for i in range(0, count, _CHUNK):  # bounded temporaries
        if (u[i:i + _CHUNK] & np.uint16(0x7FFF)).max() >= inf:
            return False
    return True


_INF16 = {"float16": 0x7C00, "bfloat16": 0x7F80}
_CHUNK = 1 << 22


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


def _to_table(card: LoRACard, version: int, checksum: str = spec.CHECKSUM_ALGO) -> pa.Table:
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
        meta[spec.KEY_CHECKSUM] = spec.checksum(rows, bmeta, checksum)
        names = spec.V2_COLUMNS
    _check_limits(card, meta)
    schema = pa.schema([pa.field(n, t) for n, t in names], metadata=meta)
    return pa.Table.from_arrays(cols, schema=schema)


def _check_limits(card: LoRACard, meta: dict[str, str]) -> None:
    """Refuse to write what a reader would refuse (spec.LIMITS), naming the limit."""
    lim = spec.LIMITS
    if len(card.modules) > lim["max_modules"]:
        raise CardFormatError(f"card {card.name!r}: {len(card.modules)} modules, over the "
                              f"format's limit of {lim['max_modules']}")
    long = [k for k in card.modules if len(k.encode()) > lim["max_module_name_bytes"]]
    ranks = [k for k in card.modules if card.module_rank(k) > lim["max_rank"]]
    if long or ranks:
        raise CardFormatError(f"card {card.name!r}: module names over {lim['max_module_name_bytes']} "
                              f"bytes {long[:2]} or ranks over {lim['max_rank']} {ranks[:2]}")
    sizes = {k: (len(k.encode()), len(v.encode())) for k, v in meta.items()}
    total = sum(a + b for a, b in sizes.values())
    big = [k for k, (a, b) in sizes.items()
           if a > lim["max_metadata_key_bytes"] or b > lim["max_metadata_value_bytes"]]
    if big or total > lim["max_metadata_bytes"] or len(meta) > lim["max_metadata_entries"]:
        raise CardFormatError(
            f"card {card.name!r}: metadata over the format's limits (entries {len(meta)} / "
            f"{lim['max_metadata_entries']}, total {total} / {lim['max_metadata_bytes']} bytes, "
            f"oversized keys {big[:3]}: keys <= {lim['max_metadata_key_bytes']} bytes, values <= "
            f"{lim['max_metadata_value_bytes']} bytes)")


def _row_bytes(col: pa.Array):
    offs = np.frombuffer(col.buffers()[1], dtype=np.int32)[col.offset:col.offset + len(col) + 1]
    data = memoryview(col.buffers()[2])
    return [data[offs[i]:offs[i + 1]] for i in range(len(col))]
