"""SHA-256 of a file's bytes, read in chunks so a multi-GB model or card never sits in memory
whole. One helper for every place that names or checks a file by its content hash."""

from __future__ import annotations

import hashlib
import os

__all__ = ["file_sha256"]


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 (FIPS 180-4) of the bytes of the file at ``path``."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()
