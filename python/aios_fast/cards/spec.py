"""Constants of the ``.lora.arrow`` format (see ``docs/card-format.md``) and its checksum.

Kept apart from the reader/writer so that the normative numbers live in one short file.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping

import pyarrow as pa

__all__ = [
    "V1_COLUMNS", "V2_COLUMNS", "HEADER_KEYS", "KEY_VERSION", "KEY_NAMING", "KEY_FINGERPRINT",
    "KEY_CHECKSUM", "CHECKSUM_ALGO", "ITEMSIZE", "V1_ITEMSIZE", "LIMITS", "checksum",
]

#: v1 columns, in order, with their exact Arrow types (ArrowEngine's writer)
V1_COLUMNS: tuple[tuple[str, pa.DataType], ...] = (
    ("module", pa.string()),
    ("weight_a", pa.binary()),
    ("weight_b", pa.binary()),
    ("shape_a", pa.list_(pa.int32())),
    ("shape_b", pa.list_(pa.int32())),
    ("dtype", pa.string()),
)
#: v2 = v1 columns first, then these
V2_COLUMNS: tuple[tuple[str, pa.DataType], ...] = V1_COLUMNS + (
    ("dtype_a", pa.string()),
    ("dtype_b", pa.string()),
    ("rank", pa.int32()),
    ("alpha", pa.float64()),
)

HEADER_KEYS = ("lora_name", "lora_rank", "lora_alpha", "target_modules")
KEY_VERSION = "aios_format_version"
KEY_NAMING = "aios_naming"
KEY_FINGERPRINT = "aios_base_fingerprint"
KEY_CHECKSUM = "aios_checksum"
CHECKSUM_ALGO = "sha256"

#: bytes per element of each allowed dtype name
ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
#: v1 files hold NumPy dtype names: float32 and float16, and float64 (NumPy's default), which
#: readers convert to float32 on load
V1_ITEMSIZE = {"float32": 4, "float16": 2, "float64": 8}

#: hard limits a reader enforces before trusting any declared size
LIMITS = {
    "max_file_bytes": 1 << 34,          # 16 GiB (binary columns hold < 2 GiB each anyway)
    "max_modules": 1 << 16,             # rows
    "max_dim": (1 << 31) - 1,           # each entry of shape_a / shape_b (int32)
    "max_rank": 1 << 16,
    "max_metadata_entries": 1024,
    "max_metadata_key_bytes": 256,
    "max_metadata_value_bytes": 1 << 20,   # 1 MiB per value (room for per-module JSON reports)
    "max_metadata_bytes": 4 << 20,         # 4 MiB in all
    "max_module_name_bytes": 1024,
}


_U64 = struct.Struct("<Q")
_RANK_ALPHA = struct.Struct("<qd")


def _field(h, data) -> None:
    h.update(struct.pack("<Q", len(data)))
    h.update(data)


def checksum(rows: Iterable[tuple], metadata: Mapping[bytes, bytes]) -> str:
    """The v2 checksum, ``"sha256:<64 hex digits>"``.

    SHA-256 (FIPS 180-4) from the standard library (OpenSSL: SHA-NI / ARMv8 crypto
    instructions where present, about 2x faster than hashlib's BLAKE2b here), over, in order:
    the ASCII tag ``aios-lora-arrow-v2``; for each row in file order the length-prefixed
    (u64 little-endian) module name (UTF-8), dtype_a, dtype_b, the shapes (u32 count then
    i64 per dim), rank (i64), alpha (IEEE float64), A bytes and B bytes; then every schema
    metadata entry except ``aios_checksum``, sorted by key bytes, as length-prefixed key and
    value. ``rows`` yields ``(module, dtype_a, dtype_b, shape_a, shape_b, rank, alpha, a, b)``
    with ``a``/``b`` any bytes-like object (memoryviews of the mapped file: no copy).
    """
    h = hashlib.sha256()
    h.update(b"aios-lora-arrow-v2")
    u64 = _U64.pack
    for module, dta, dtb, sa, sb, rank, alpha, a, b in rows:
        m, da, db = module.encode(), dta.encode(), dtb.encode()
        # the fields between two tensors' bytes in one update: the same stream, fewer calls
        h.update(b"".join((u64(len(m)), m, u64(len(da)), da, u64(len(db)), db,
                           struct.pack(f"<I{len(sa)}q", len(sa), *sa),
                           struct.pack(f"<I{len(sb)}q", len(sb), *sb),
                           _RANK_ALPHA.pack(rank, alpha), u64(len(a)))))
        h.update(a)
        h.update(u64(len(b)))
        h.update(b)
    for k in sorted(metadata):
        if k != KEY_CHECKSUM.encode():
            _field(h, k)
            _field(h, metadata[k])
    return f"{CHECKSUM_ALGO}:{h.hexdigest()}"
