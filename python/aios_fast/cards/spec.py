"""Constants of the ``.lora.arrow`` format (see ``docs/card-format.md``) and its checksum.

Kept apart from the reader/writer so that the normative numbers live in one short file.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Iterable, Mapping

import pyarrow as pa
import xxhash

__all__ = [
    "V1_COLUMNS", "V2_COLUMNS", "HEADER_KEYS", "KEY_VERSION", "KEY_NAMING", "KEY_FINGERPRINT",
    "KEY_CHECKSUM", "CHECKSUM_ALGO", "CHECKSUM_ALGOS", "ITEMSIZE", "V1_ITEMSIZE", "LIMITS", "checksum",
    "checksum_xxh3",
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
#: the algorithm writers use
CHECKSUM_ALGO = "xxh3-128"
#: the algorithms readers verify: ``sha256`` is what cards written before 2026-12-06 carry
CHECKSUM_ALGOS = ("xxh3-128", "sha256")

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
_LENS = struct.Struct("<QQ")


def _field(h, data) -> None:
    h.update(struct.pack("<Q", len(data)))
    h.update(data)


def checksum(rows: Iterable[tuple], metadata: Mapping[bytes, bytes], algo: str = CHECKSUM_ALGO) -> str:
    """The v2 checksum of a card, ``"<algo>:<hex digest>"`` (``docs/card-format.md`` section 5).

    ``rows`` yields ``(module, dtype_a, dtype_b, shape_a, shape_b, rank, alpha, a, b)`` with
    ``a``/``b`` any bytes-like object (memoryviews of the mapped file: no copy); ``metadata`` is
    the raw schema metadata (the ``aios_checksum`` entry, if present, is left out).
    """
    if algo == "xxh3-128":
        rows = list(rows)
        return checksum_xxh3([r[:7] + (memoryview(r[7]).nbytes, memoryview(r[8]).nbytes)
                              for r in rows],
                             [r[7] for r in rows], [r[8] for r in rows], metadata)
    if algo != "sha256":
        raise ValueError(f"checksum algorithm {algo!r} is not one of {CHECKSUM_ALGOS}")
    return _checksum_sha256(rows, metadata)


def checksum_xxh3(headers: Iterable[tuple], a_parts: Iterable, b_parts: Iterable,
                  metadata: Mapping[bytes, bytes]) -> str:
    """``"xxh3-128:<32 hex digits>"``: XXH3-128 (seed 0) over the tag
    ``aios-lora-arrow-v2/xxh3-128``; for each row in file order its length-prefixed module name,
    dtype_a and dtype_b, the shapes (u32 count then i64 per dim), rank (i64), alpha (f64) and the
    byte lengths of A and B (u64 each); then every A's bytes in row order; then every B's; then
    the metadata entries as in :func:`checksum`.

    The tensor bytes come after all the row fields so that a reader hashes each tensor column's
    values as the one contiguous span Arrow stores them in (``a_parts``/``b_parts`` may be that
    span, or the tensors one by one: the stream is the same). ``headers`` yields
    ``(module, dtype_a, dtype_b, shape_a, shape_b, rank, alpha, len_a, len_b)``.

    XXH3 detects corruption like SHA-256 does and runs at memory speed (about 30x SHA-256 with
    SHA-NI here), so that verifying a card costs little more than mapping it. Neither is a
    defence against a deliberate forger, who can rewrite the key as easily as the tensors: the
    federation's signed SHA-256 of the whole file is that defence.
    """
    parts = [b"aios-lora-arrow-v2/xxh3-128"]
    parts += [_row_fields(*row) + _LENS.pack(la, lb) for *row, la, lb in headers]
    h = xxhash.xxh3_128(b"".join(parts))
    for part in a_parts:
        h.update(part)
    for part in b_parts:
        h.update(part)
    _hash_metadata(h, metadata)
    return f"xxh3-128:{h.hexdigest()}"


def _checksum_sha256(rows: Iterable[tuple], metadata: Mapping[bytes, bytes]) -> str:
    """The ``sha256`` checksum (cards written before 2026-12-06; still verified).

    SHA-256 (FIPS 180-4) from the standard library, over, in order:
    the ASCII tag ``aios-lora-arrow-v2``; for each row in file order the length-prefixed
    (u64 little-endian) module name (UTF-8), dtype_a, dtype_b, the shapes (u32 count then
    i64 per dim), rank (i64), alpha (IEEE float64), A bytes and B bytes; then every schema
    metadata entry except ``aios_checksum``, sorted by key bytes, as length-prefixed key and
    value.
    """
    h = hashlib.sha256()
    h.update(b"aios-lora-arrow-v2")
    u64 = _U64.pack
    for *fields, a, b in rows:
        # the fields between two tensors' bytes in one update: the same stream, fewer calls
        h.update(_row_fields(*fields) + u64(len(a)))
        h.update(a)
        h.update(u64(len(b)))
        h.update(b)
    _hash_metadata(h, metadata)
    return f"sha256:{h.hexdigest()}"


def _row_fields(module: str, dta: str, dtb: str, sa, sb, rank: int, alpha: float) -> bytes:
    """One row's fields as both checksums hash them: length-prefixed module name and dtypes,
    the shapes (u32 count, i64 per dim), rank (i64) and alpha (f64)."""
    u64 = _U64.pack
    m, da, db = module.encode(), dta.encode(), dtb.encode()
    return b"".join((u64(len(m)), m, u64(len(da)), da, u64(len(db)), db,
                     struct.pack(f"<I{len(sa)}q", len(sa), *sa), struct.pack(f"<I{len(sb)}q", len(sb), *sb),
                     _RANK_ALPHA.pack(rank, alpha)))


def _hash_metadata(h, metadata: Mapping[bytes, bytes]) -> None:
    """Every schema metadata entry except the checksum's own, sorted by key bytes, each
    length-prefixed key then value."""
    for k in sorted(metadata):
        if k != KEY_CHECKSUM.encode():
            _field(h, k)
            _field(h, metadata[k])
