"""``FederationClient``: talk to one peer's :class:`FederationServer`.

Every reply is untrusted: manifests are parsed strictly (bad ones are skipped and listed in
:attr:`FederationClient.problems`), a fetched card is streamed into a file of the caller's
choosing while it is hashed, and the transfer stops as soon as it exceeds the manifest's size.
What the bytes *mean* (signature, trust, format, base model) is checked afterwards by the
quarantine (``quarantine.py``).
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import os
import sys
import tempfile
from concurrent.futures import Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from ._pool import workers
from .errors import FederationError, ManifestError
from .manifest import Manifest, check_card_id
from .server import CHUNK_BYTES, CHUNK_SCHEMA, REVOKE_TAG
from .tls import TLSConfig

__all__ = ["FederationClient", "Fetched", "BearerTokenClientFactory"]


class _BearerMiddleware(flight.ClientMiddleware):
    def __init__(self, token: str) -> None:
        super().__init__()
        self._header = f"Bearer {token}"

    def sending_headers(self):
        return {"authorization": self._header}


class BearerTokenClientFactory(flight.ClientMiddlewareFactory):
    """Client middleware adding ``authorization: Bearer <token>`` to every call."""

    def __init__(self, token: str) -> None:
        super().__init__()
        self._token = token

    def start_call(self, info):
        return _BearerMiddleware(self._token)


@dataclass
class Fetched:
    """A card streamed from a peer: where it was written, its SHA-256 and size as received."""

    path: Path
    sha256: str
    size: int
    manifest: Manifest


class FederationClient:
    """A connection to one peer.

    Args:
        location: ``grpc+tcp://host:port`` or ``grpc+tls://host:port`` (or ``host:port``).
        token: bearer token sent with every call.
        tls: :class:`TLSConfig` with ``ca`` (server's CA), optionally ``cert``/``key`` (mutual TLS).
        timeout: seconds per call.
        max_card_bytes: refuse to receive more than this for one card.
        max_list: stop reading a listing after this many entries (a hostile peer could send
            an endless one).
    """

    def __init__(self, location: str, token: str | None = None, *, tls: TLSConfig | None = None,
                 timeout: float = 30.0, max_card_bytes: int = 1 << 30, max_list: int = 10_000) -> None:
        if "://" not in location:
            location = f"{'grpc+tls' if tls and tls.ca else 'grpc+tcp'}://{location}"
        self.location = location
        self.timeout = float(timeout)
        self.max_card_bytes = int(max_card_bytes)
        self.max_list = int(max_list)
        self.problems: list[str] = []
        kw: dict[str, Any] = {}
        if token:
            kw["middleware"] = [BearerTokenClientFactory(token)]
        if tls is not None:
            if tls.ca:
                kw["tls_root_certs"] = tls.read("ca")
            if tls.cert and tls.key:
                kw["cert_chain"] = tls.read("cert")
                kw["private_key"] = tls.read("key")
            if tls.override_hostname:
                kw["override_hostname"] = tls.override_hostname
        try:
            self._client = flight.FlightClient(location, **kw)
        except (pa.ArrowException, OSError) as exc:
            raise FederationError(f"cannot connect to {location}: {exc}") from None

    def _opts(self, timeout: float | None = None) -> flight.FlightCallOptions:
        return flight.FlightCallOptions(timeout=self.timeout if timeout is None else timeout)

    def _fail(self, what: str, exc: Exception) -> FederationError:
        msg = str(exc).split("\n")[0][:300]
        return FederationError(f"{self.location}: {what} failed: {type(exc).__name__}: {msg}")

    # ------------------------------------------------------------------ reads
    def health(self) -> dict[str, Any]:
        """The peer's ``health`` action (node id, key id, card count)."""
        return json.loads(self._action("health", b"")[:65536])

    def list(self, base_fingerprint: str | None = None, limit: int | None = None) -> list[Manifest]:
        """The peer's manifests (only for ``base_fingerprint`` when given). Malformed entries
        are skipped and described in :attr:`problems`."""
        crit: dict[str, Any] = {}
        if base_fingerprint is not None:
            crit["base_fingerprint"] = base_fingerprint
        if limit is not None:
            crit["limit"] = int(limit)
        out: list[Manifest] = []
        try:
            for n, info in enumerate(self._client.list_flights(json.dumps(crit).encode() if crit else b"",
                                                               self._opts())):
                if n >= self.max_list:
                    self.problems.append(f"{self.location}: listing cut at {self.max_list} entries")
                    break
                try:
                    m = Manifest.from_json(info.app_metadata)
                    if info.descriptor.command != m.id.encode():
                        raise ManifestError("listing's descriptor is not the manifest's id")
                    out.append(m)
                except ManifestError as exc:
                    self.problems.append(f"{self.location}: manifest skipped: {exc}")
                if limit is not None and len(out) >= limit:
                    break
        except (pa.ArrowException, OSError) as exc:
            raise self._fail("list", exc) from None
        return out

    def describe(self, cid: str) -> Manifest:
        cid = check_card_id(cid)
        m = Manifest.from_json(self._action("describe", cid.encode())[: 1 << 20])
        if m.id != cid:
            raise ManifestError(f"{self.location} described {m.id} when asked for {cid}")
        return m

    def fetch(self, manifest: Manifest, directory: str | Path) -> Fetched:
        """Stream card ``manifest.id`` into a new file in ``directory``, hashing as it arrives.
        Stops (and deletes the partial file) if the peer sends more than ``manifest.size``.
        Returns a :class:`Fetched`; the caller checks ``sha256 == manifest.id``.

        The file's blocks are reserved up front and its pages handed to the kernel's writeback
        as they are written, so the ``fsync`` of whoever keeps the file waits for little; this
        call itself does not fsync (a card that fails quarantine never needs it)."""
        limit = min(manifest.size, self.max_card_bytes)
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f"{manifest.id[:16]}-", suffix=".lora.arrow", dir=directory)
        path = Path(tmp)
        h = hashlib.sha256()
        total = 0

        # Hash and write chunk i on a worker while chunk i+1 arrives: hashlib (on buffers over
        # 2 KiB), file writes and Flight reads all release the GIL, so the three overlap. The
        # pieces are zero-copy views of the received batches: no concatenation, one pass.
        def consume(view: memoryview, offset: int) -> None:
            h.update(view)
            _write_all(fd, view)
            _start_writeback(fd, offset, len(view))

        pending: Future | None = None
        try:
            try:
                _preallocate(fd, limit)
                reader = self._client.do_get(flight.Ticket(manifest.id.encode()), self._opts())
                while True:
                    try:
                        chunk = reader.read_chunk()
                    except StopIteration:
                        break
                    for piece in _pieces(chunk.data):
                        offset = total
                        total += len(piece)
                        if total > limit:
                            raise FederationError(
                                f"{self.location} sent more than the {limit} bytes of card "
                                f"{manifest.id[:12]}; transfer stopped")
                        if pending is not None:
                            pending.result()
                        pending = workers().submit(consume, piece, offset)
                if pending is not None:
                    pending.result()
                if total < limit:
                    os.ftruncate(fd, total)  # frees blocks reserved past a short transfer's end
            finally:
                if pending is not None:
                    wait([pending])  # never close the file under a write still running
                os.close(fd)
        except FederationError:
            path.unlink(missing_ok=True)
            raise
        except (pa.ArrowException, OSError) as exc:
            path.unlink(missing_ok=True)
            raise self._fail(f"fetch of {manifest.id[:12]}", exc) from None
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return Fetched(path, h.hexdigest(), total, manifest)

    # ------------------------------------------------------------------ writes
    def publish(self, path: str | Path, manifest: Manifest) -> dict[str, Any]:
        """Upload the card file at ``path`` with its signed ``manifest``. Returns the server's
        acknowledgement ``{"id", "stored"}``."""
        size = os.path.getsize(path)
        if size != manifest.size:
            raise ManifestError(f"{path} is {size} bytes, its manifest says {manifest.size}")
        desc = flight.FlightDescriptor.for_command(manifest.to_json())
        try:
            writer, ack_reader = self._client.do_put(desc, CHUNK_SCHEMA, self._opts())
            with pa.memory_map(str(path), "r") as src:
                buf = src.read_buffer(size)
                for off in range(0, size, CHUNK_BYTES):
                    piece = buf.slice(off, min(CHUNK_BYTES, size - off))
                    offsets = pa.array([0, piece.size], pa.int32()).buffers()[1]
                    arr = pa.Array.from_buffers(pa.binary(), 1, [None, offsets, piece])
                    writer.write_batch(pa.RecordBatch.from_arrays([arr], schema=CHUNK_SCHEMA))
            writer.done_writing()
            ack = ack_reader.read()
            writer.close()
        except (pa.ArrowException, OSError) as exc:
            raise self._fail(f"publish of {manifest.name!r}", exc) from None
        try:
            return json.loads(ack.to_pybytes()) if ack is not None else {"id": manifest.id, "stored": None}
        except ValueError:
            raise FederationError(f"{self.location}: unreadable publish acknowledgement") from None

    def revoke(self, cid: str, key) -> dict[str, Any]:
        """Ask the peer to withdraw card ``cid``, signed with the publisher's ``SigningKey``."""
        cid = check_card_id(cid)
        body = json.dumps({"id": cid, "signature": key.sign(REVOKE_TAG + cid.encode()).hex()}).encode()
        return json.loads(self._action("revoke", body))

    # ------------------------------------------------------------------ plumbing
    def _action(self, kind: str, body: bytes) -> bytes:
        try:
            results = list(self._client.do_action(flight.Action(kind, body), self._opts()))
        except (pa.ArrowException, OSError) as exc:
            raise self._fail(kind, exc) from None
        if len(results) != 1:
            raise FederationError(f"{self.location}: {kind} returned {len(results)} results, expected 1")
        return results[0].body.to_pybytes()

    def close(self) -> None:
        try:
            self._client.close()
        except (pa.ArrowException, OSError):
            pass

    def __enter__(self) -> "FederationClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# ---------------------------------------------------------------------- receiving helpers
def _pieces(batch: pa.RecordBatch):
    """The non-null values of a chunk batch's binary column, as zero-copy memoryviews."""
    col = batch.column(0)
    for i in range(len(col)):
        if col[i].is_valid:
            yield memoryview(col[i].as_buffer())


def _write_all(fd: int, view: memoryview) -> None:
    while view:
        view = view[os.write(fd, view):]


def _libc(name: str, *argtypes):
    """A Linux system call wrapper from the C library, or ``None`` elsewhere."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        fn = getattr(ctypes.CDLL(None, use_errno=True), name)
    except (OSError, AttributeError):
        return None
    fn.argtypes = list(argtypes)
    fn.restype = ctypes.c_int
    return fn


# The two calls below are hints to the file system: where they are missing or fail, the bytes
# written and the fsync that makes them durable are the same, only slower.
_SYNC_FILE_RANGE = _libc("sync_file_range", ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint)
_SYNC_FILE_RANGE_WRITE = 2
_FALLOCATE = _libc("fallocate", ctypes.c_int, ctypes.c_int, ctypes.c_int64, ctypes.c_int64)
_FALLOC_FL_KEEP_SIZE = 1


def _preallocate(fd: int, size: int) -> None:
    """Reserve the blocks of a file about to be written, without changing its size (so a short
    transfer leaves a short file). One allocation instead of one per written page: about a
    quarter less time to write and fsync 20 MB on ext4. Bounded by the caller's byte limit."""
    if _FALLOCATE is not None and size > 0:
        _FALLOCATE(fd, _FALLOC_FL_KEEP_SIZE, 0, size)


def _start_writeback(fd: int, offset: int, length: int) -> None:
    """Start (without waiting) the disk writes of bytes just written, so that the final fsync
    overlaps the rest of the transfer instead of following it."""
    if _SYNC_FILE_RANGE is not None and length:
        _SYNC_FILE_RANGE(fd, offset, length, _SYNC_FILE_RANGE_WRITE)
