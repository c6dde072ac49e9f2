"""A bounds-checked look at the framing of an Arrow IPC file, before pyarrow reads it.

pyarrow checks buffer bounds itself, but it decompresses compressed bodies into buffers
whose size the file declares, and it would follow several record batches or dictionaries.
A card never has those, so this reader refuses them from the raw bytes first: the magic
strings, the footer length, exactly one record-batch block lying inside the file, no
dictionaries, a RecordBatch message with no ``compression`` field and every body buffer
inside the body. Only the few FlatBuffers fields needed are decoded (Arrow's
``File.fbs``/``Message.fbs``), each read checked against the bytes present.
"""

from __future__ import annotations

import struct
from operator import add

import pyarrow as pa

from . import spec

__all__ = ["check_ipc_file"]

_MAGIC = b"ARROW1"
_RECORD_BATCH = 3  # MessageHeader union tag


_STRUCTS = {f: struct.Struct("<" + f) for f in ("B", "H", "I", "i", "q")}
_U16, _U32, _I32 = _STRUCTS["H"], _STRUCTS["I"], _STRUCTS["i"]
_FEW_BUFFERS = 1024  # more are checked one by one, without a tuple of every offset at once


class _Flat:
    """Minimal FlatBuffers table reader over ``data`` (bytes), every access bounds-checked."""

    def __init__(self, data: bytes, bad):
        self.d, self.n, self.bad = data, len(data), bad

    def _u(self, st: struct.Struct, pos: int):
        if pos < 0 or pos + st.size > self.n:
            raise self.bad(f"IPC metadata read at {pos} runs past its {self.n} bytes (corrupt)")
        return st.unpack_from(self.d, pos)[0]

    def root(self) -> int:
        return self._u(_U32, 0)

    def field(self, table: int, index: int) -> int:
        """Absolute position of field ``index`` of ``table``, or 0 when absent."""
        vt = table - self._u(_I32, table)
        vt_size = self._u(_U16, vt)
        slot = 4 + 2 * index
        if slot + 2 > vt_size:
            return 0
        off = self._u(_U16, vt + slot)
        return table + off if off else 0

    def scalar(self, table: int, index: int, fmt: str, default=0):
        pos = self.field(table, index)
        return self._u(_STRUCTS[fmt], pos) if pos else default

    def ref(self, table: int, index: int) -> int:
        pos = self.field(table, index)
        return pos + self._u(_U32, pos) if pos else 0

    def vector(self, table: int, index: int, stride: int) -> tuple[int, int]:
        """(start, count) of a vector of ``stride``-byte structs; (0, 0) when absent."""
        pos = self.ref(table, index)
        if not pos:
            return 0, 0
        n = self._u(_U32, pos)
        if pos + 4 + n * stride > self.n:
            raise self.bad(f"IPC metadata vector of {n} entries runs past its bytes (corrupt)")
        return pos + 4, n


def check_ipc_file(buf: pa.Buffer, bad) -> None:
    """Raise ``bad(message)`` unless ``buf`` is a plain one-batch, uncompressed Arrow IPC file."""
    data = memoryview(buf)
    size = len(data)
    if bytes(data[:6]) != _MAGIC or bytes(data[size - 6:]) != _MAGIC:
        raise bad("not an Arrow IPC file (magic 'ARROW1' missing at start or end; truncated?)")
    footer_len = struct.unpack_from("<i", data, size - 10)[0]
    footer_end = size - 10
    if footer_len <= 0 or footer_len > footer_end - 8:
        raise bad(f"Arrow footer length {footer_len} does not fit the {size}-byte file")
    footer = _Flat(bytes(data[footer_end - footer_len:footer_end]), bad)
    root = footer.root()
    _, ndict = footer.vector(root, 2, 24)
    if ndict:
        raise bad(f"file has {ndict} dictionary batch(es); cards have none")
    start, nbatch = footer.vector(root, 3, 24)
    if nbatch != 1:
        raise bad(f"file has {nbatch} record batches; a card has exactly 1")
    offset, meta_len, _pad, body_len = struct.unpack_from("<qiiq", footer.d, start)
    limit = footer_end - footer_len
    if offset < 8 or meta_len < 8 or body_len < 0 or offset + meta_len + body_len > limit:
        raise bad(f"record batch block (offset {offset}, metadata {meta_len}, body {body_len} "
                  f"bytes) lies outside the {size}-byte file (truncated?)")
    head = offset
    first = struct.unpack_from("<I", data, head)[0]
    if first == 0xFFFFFFFF:  # continuation marker, then the metadata length
        head += 4
        first = struct.unpack_from("<I", data, head)[0]
    head += 4
    if first == 0 or head + first > offset + meta_len:
        raise bad(f"record batch metadata length {first} overruns its block")
    msg = _Flat(bytes(data[head:head + first]), bad)
    mroot = msg.root()
    if msg.scalar(mroot, 1, "B") != _RECORD_BATCH:
        raise bad("the record batch block does not hold a RecordBatch message")
    if msg.scalar(mroot, 3, "q") != body_len:
        raise bad("record batch body length disagrees with the footer")
    rb = msg.ref(mroot, 2)
    if not rb:
        raise bad("RecordBatch message has no header")
    if msg.field(rb, 3):
        raise bad("record batch is compressed; cards MUST be uncompressed (memory-mappable)")
    if not (0 <= msg.scalar(rb, 0, "q") <= spec.LIMITS["max_modules"]):
        raise bad(f"record batch declares {msg.scalar(rb, 0, 'q')} rows, over the limit")
    bstart, nbuf = msg.vector(rb, 2, 16)
    if 0 < nbuf <= _FEW_BUFFERS:
        # all (offset, length) pairs in one unpack, checked with builtins (a card has 30)
        vals = struct.unpack_from(f"<{2 * nbuf}q", msg.d, bstart)
        if min(vals) >= 0 and max(map(add, vals[0::2], vals[1::2])) <= body_len:
            return
    for i in range(nbuf):  # names the bad buffer; walks a (hostile) list of very many
        b_off, b_len = struct.unpack_from("<qq", msg.d, bstart + 16 * i)
        if b_off < 0 or b_len < 0 or b_off + b_len > body_len:
            raise bad(f"body buffer {i} (offset {b_off}, {b_len} bytes) lies outside the "
                      f"{body_len}-byte body")
