"""``FederationServer``: an Arrow Flight service that shares content-addressed skill cards.

Protocol (every ticket and descriptor is a card id, 64 hex; anything else is refused):

- ``list_flights(criteria)``: one ``FlightInfo`` per stored card, its signed manifest (JSON) in
  ``app_metadata``; criteria, optional JSON ``{"base_fingerprint": ..., "limit": n}``.
- ``get_flight_info(for_command(id))`` and ``do_get(Ticket(id))``: the card's bytes, streamed
  as record batches of one binary ``chunk`` each (so the receiver gets the file verbatim).
- ``do_put(for_command(manifest JSON))`` + chunks: publish. Needs the write token; the manifest
  must parse strictly and be self-signed (and by a trusted key when the server has a keyring);
  size, count and rate limits apply; the server recomputes the SHA-256 while receiving and
  refuses a mismatch; the card must load under the reader's hostile-input checks and match its
  manifest.
- ``do_action``: ``health``, ``describe`` (body: id), ``revoke`` (body: JSON ``{"id", "signature"}``,
  an Ed25519 signature by the card's publisher over ``b"aios-revoke/1\\n" + id``).

Authentication: bearer tokens checked by server middleware before any handler runs (constant
time comparison). With a token configured every call needs it; without one the server is
read-only (uploads and revocations refused). TLS and mutual TLS through :class:`TLSConfig`.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.flight as flight

from ..errors import CardFormatError, InputError
from .errors import ManifestError, TrustError
from .manifest import Manifest, is_card_id
from .store import CardStore
from .tls import TLSConfig
from .trust import Keyring

__all__ = ["FederationServer", "ServerLimits", "CHUNK_SCHEMA", "REVOKE_TAG", "advertised_host"]

CHUNK_SCHEMA = pa.schema([pa.field("chunk", pa.binary())])
CHUNK_BYTES = 4 << 20
REVOKE_TAG = b"aios-revoke/1\n"


@dataclass(frozen=True)
class ServerLimits:
    """Bounds on what peers may ask of a server.

    ``max_card_bytes`` per upload, ``max_cards`` stored, ``max_list`` manifests per listing,
    ``rate``/``burst``: calls per second per client host (token bucket), ``put_rate``/``put_burst``:
    uploads per second per host, ``max_criteria_bytes``: size of a listing's criteria.
    """

    max_card_bytes: int = 256 << 20
    max_cards: int = 10_000
    max_list: int = 1_000
    rate: float = 50.0
    burst: int = 100
    put_rate: float = 1.0
    put_burst: int = 20
    max_criteria_bytes: int = 4096


class _Bucket:
    """Token buckets per client host (thread-safe)."""

    def __init__(self, rate: float, burst: int) -> None:
        self.rate, self.burst = float(rate), float(burst)
        self._state: dict[str, tuple[float, float]] = {}
        self._lock = threading.Lock()

    def take(self, who: str) -> bool:
        now = time.monotonic()
        with self._lock:
            tokens, last = self._state.get(who, (self.burst, now))
            tokens = min(self.burst, tokens + (now - last) * self.rate)
            ok = tokens >= 1.0
            self._state[who] = (tokens - 1.0 if ok else tokens, now)
            if len(self._state) > 10_000:  # bounded memory under address churn
                self._state.pop(next(iter(self._state)))
            return ok


class _BearerAuthFactory(flight.ServerMiddlewareFactory):
    """Refuses any call without ``authorization: Bearer <token>`` when a token is set."""

    def __init__(self, token: str | None, refusals: Counter) -> None:
        super().__init__()
        self._token = token.encode() if token else None
        self._refusals = refusals

    def start_call(self, info, headers):
        if self._token is None:
            return None
        values = headers.get("authorization") or headers.get("Authorization") or []
        given = values[0] if values else ""
        given = given.decode("latin-1") if isinstance(given, bytes) else given
        scheme, _, tok = given.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(tok.strip().encode(), self._token):
            self._refusals["unauthenticated"] += 1
            raise flight.FlightUnauthenticatedError(
                "missing or wrong bearer token (send 'authorization: Bearer <token>')")
        return None


def advertised_host(bind: str, advertise: str | None = None) -> str:
    """The address peers should dial: ``advertise`` when given, the bind address unless it is
    a wildcard, else this machine's primary address (the interface of its default route,
    found without sending a packet), else 127.0.0.1. Never 0.0.0.0."""
    if advertise:
        return advertise
    if bind not in ("0.0.0.0", "::", "", "[::]"):
        return bind
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.connect(("10.255.255.255", 1))  # UDP connect: routing lookup only
            ip = s.getsockname()[0]
            if ip and ip != "0.0.0.0":
                return ip
    except OSError:
        pass
    return "127.0.0.1"


class FederationServer(flight.FlightServerBase):
    """Serve a :class:`CardStore` over Arrow Flight (see the module docstring).

    Args:
        store: a :class:`CardStore` or its directory.
        host: address to bind (default 127.0.0.1: only this machine).
        port: 0 picks a free port (read :attr:`port`).
        token: the bearer token every call must carry; ``None`` = read-only open server.
        keyring: when given, only manifests signed by keys it trusts may be uploaded.
        tls: :class:`TLSConfig` with ``cert``/``key`` (and ``client_ca`` for mutual TLS).
        limits: :class:`ServerLimits`.
        advertise: address put in listings (default: see :func:`advertised_host`).
        node_id, key_id: reported by ``health``.

    The server listens once constructed; :meth:`serve_in_thread` runs it in the background and
    :meth:`shutdown` stops it. :attr:`refusals` counts refused calls by reason.
    """

    def __init__(self, store: CardStore | str | Path, *, host: str = "127.0.0.1", port: int = 0,
                 token: str | None = None, keyring: Keyring | None = None,
                 tls: TLSConfig | None = None, limits: ServerLimits | None = None,
                 advertise: str | None = None, node_id: str = "", key_id: str = "") -> None:
        self.store = store if isinstance(store, CardStore) else CardStore(store)
        self.limits = limits or ServerLimits()
        self.keyring = keyring
        self.node_id, self.key_id = node_id, key_id
        self.refusals: Counter = Counter()
        self.served: Counter = Counter()
        self._token_set = bool(token)
        self._calls = _Bucket(self.limits.rate, self.limits.burst)
        self._puts = _Bucket(self.limits.put_rate, self.limits.put_burst)
        kw: dict[str, Any] = {"middleware": {"auth": _BearerAuthFactory(token, self.refusals)}}
        scheme = "grpc+tcp"
        if tls is not None and (tls.cert or tls.key):
            if not (tls.cert and tls.key):
                raise InputError(f"TLS needs both a certificate and a key (cert={tls.cert!r}, key={tls.key!r})")
            scheme = "grpc+tls"
            kw["tls_certificates"] = [flight.CertKeyPair(cert=tls.read("cert"), key=tls.read("key"))]
            if tls.client_ca:
                kw["verify_client"] = True
                kw["root_certificates"] = tls.read("client_ca")
        self.scheme = scheme
        bind = f"[{host}]" if ":" in host else host
        super().__init__(f"{scheme}://{bind}:{port}", **kw)
        self.host = host
        self.advertise_host = advertised_host(host, advertise)
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    @property
    def location(self) -> str:
        """Where peers reach this server (never a wildcard address)."""
        h = self.advertise_host
        return f"{self.scheme}://{'[' + h + ']' if ':' in h else h}:{self.port}"

    def serve_in_thread(self) -> "FederationServer":
        self._thread = threading.Thread(target=self.serve, name=f"aios-flight-{self.port}", daemon=True)
        self._thread.start()
        return self

    def shutdown(self) -> None:
        super().shutdown()
        if self._thread is not None:
            self._thread.join(timeout=10)
            self._thread = None

    # ------------------------------------------------------------------ helpers
    def _admit(self, context, what: str) -> None:
        peer = context.peer() or "?"
        host = peer.rsplit(":", 1)[0] if peer.count(":") >= 2 else peer  # "ipv4:1.2.3.4:port"
        if not self._calls.take(host) or (what == "put" and not self._puts.take(host)):
            self.refusals["rate_limited"] += 1
            raise flight.FlightUnavailableError(
                f"rate limited: over {self.limits.rate:g} calls/s (burst {self.limits.burst}) per "
                f"client; retry later")

    def _refuse(self, reason: str, message: str, exc=pa.ArrowInvalid):
        self.refusals[reason] += 1
        return exc(message)

    def _id_from(self, raw: bytes, what: str) -> str:
        if not is_card_id(raw):
            shown = repr(raw[:40]) + ("..." if len(raw) > 40 else "")
            raise self._refuse("bad_id", f"{what} must be a card id (64 lowercase hex, a SHA-256), "
                                         f"got {shown}")
        return raw.decode("ascii")

    def _info(self, m: Manifest) -> flight.FlightInfo:
        endpoint = flight.FlightEndpoint(m.id.encode(), [self.location])
        return flight.FlightInfo(CHUNK_SCHEMA, flight.FlightDescriptor.for_command(m.id.encode()),
                                 [endpoint], total_records=-1, total_bytes=m.size,
                                 app_metadata=m.to_json())

    # ------------------------------------------------------------------ reads
    def list_flights(self, context, criteria):
        self._admit(context, "list")
        fingerprint, limit = None, self.limits.max_list
        if criteria:
            if len(criteria) > self.limits.max_criteria_bytes:
                raise self._refuse("bad_request", f"criteria over {self.limits.max_criteria_bytes} bytes")
            try:
                c = json.loads(criteria)
                if not isinstance(c, dict) or set(c) - {"base_fingerprint", "limit"}:
                    raise ValueError("expected an object with 'base_fingerprint' and/or 'limit'")
                fingerprint = c.get("base_fingerprint")
                if fingerprint is not None and not isinstance(fingerprint, str):
                    raise ValueError("'base_fingerprint' must be a string")
                lim = c.get("limit", limit)
                if isinstance(lim, bool) or not isinstance(lim, int) or lim < 1:
                    raise ValueError("'limit' must be an integer >= 1")
                limit = min(limit, lim)
            except (ValueError, RecursionError) as exc:
                raise self._refuse("bad_request", f"list_flights criteria: {str(exc)[:200]}") from None
        self.served["list"] += 1
        n = 0
        for m in self.store.manifests():
            if fingerprint is not None and m.base_fingerprint != fingerprint:
                continue
            if n >= limit:
                break
            n += 1
            yield self._info(m)

    def get_flight_info(self, context, descriptor):
        self._admit(context, "info")
        if descriptor.descriptor_type != flight.DescriptorType.CMD:
            raise self._refuse("bad_id", "descriptors are card ids given as commands, not paths")
        cid = self._id_from(descriptor.command, "descriptor")
        m = self.store.get(cid)
        if m is None:
            raise self._refuse("not_found", f"no card {cid} here", pa.ArrowKeyError)
        return self._info(m)

    def do_get(self, context, ticket):
        self._admit(context, "get")
        cid = self._id_from(ticket.ticket, "ticket")
        m = self.store.get(cid)
        if m is None:
            raise self._refuse("not_found", f"no card {cid} here", pa.ArrowKeyError)
        path = self.store.card_path(cid)
        try:
            source = pa.memory_map(str(path), "r")
        except OSError:
            raise self._refuse("not_found", f"card {cid} vanished", pa.ArrowKeyError) from None
        self.served["get"] += 1
        return flight.GeneratorStream(CHUNK_SCHEMA, _chunks(source))

    # ------------------------------------------------------------------ publish
    def do_put(self, context, descriptor, reader, writer):
        self._admit(context, "put")
        if not self._token_set:
            raise self._refuse("read_only", "this server accepts no uploads (no token configured)",
                               flight.FlightUnauthorizedError)
        if descriptor.descriptor_type != flight.DescriptorType.CMD:
            raise self._refuse("bad_request", "publish with FlightDescriptor.for_command(manifest JSON)")
        try:
            m = Manifest.from_json(descriptor.command)
            m.verify_signature()
            if self.keyring is not None:
                self.keyring.verify_manifest(m)
        except (ManifestError, TrustError) as exc:
            raise self._refuse("bad_manifest", f"manifest refused: {exc}") from None
        lim = self.limits
        if m.size > lim.max_card_bytes:
            raise self._refuse("too_large", f"card of {m.size} bytes is over this server's limit of "
                                            f"{lim.max_card_bytes} bytes")
        if self.store.is_revoked(m.id):
            raise self._refuse("revoked", f"card {m.id} was revoked by its publisher")
        if m.id in self.store:
            _drain(reader, lim.max_card_bytes)
            writer.write(json.dumps({"id": m.id, "stored": False}).encode())
            return
        if len(self.store) >= lim.max_cards:
            raise self._refuse("store_full", f"this server holds its limit of {lim.max_cards} cards")
        if not reader.schema.equals(CHUNK_SCHEMA):
            raise self._refuse("bad_request", f"upload schema must be {CHUNK_SCHEMA}, got {reader.schema}")
        staged = self.store.new_incoming()
        try:
            digest, total = _receive(reader, staged, min(m.size, lim.max_card_bytes))
            if total == -1:
                raise self._refuse("too_large", f"upload is larger than its manifest's size {m.size} "
                                                f"(or the limit {lim.max_card_bytes}); refused")
            if total != m.size or digest != m.id:
                raise self._refuse("hash_mismatch", f"upload of {total} bytes hashes to {digest}, but "
                                                    f"the manifest says {m.id} ({m.size} bytes)")
            from ..cards import LoRAFormat

            try:
                m.check_card(LoRAFormat.inspect(staged))
            except (CardFormatError, ManifestError) as exc:
                raise self._refuse("bad_card", f"not a valid card: {str(exc).replace(str(staged), 'upload')}") from None
            stored = self.store.commit(staged, m)
        finally:
            staged.unlink(missing_ok=True)
        self.served["put"] += 1
        writer.write(json.dumps({"id": m.id, "stored": stored}).encode())

    # ------------------------------------------------------------------ actions
    def list_actions(self, context):
        return [("health", "node id, key id, card count"),
                ("describe", "body: card id -> its signed manifest (JSON)"),
                ("revoke", "body: {id, signature}: the publisher withdraws a card")]

    def do_action(self, context, action):
        self._admit(context, "action")
        kind, body = action.type, action.body.to_pybytes() if action.body is not None else b""
        if kind == "health":
            out = {"status": "ok", "node_id": self.node_id, "key_id": self.key_id,
                   "cards": len(self.store), "location": self.location, "time": time.time()}
            yield flight.Result(json.dumps(out).encode())
        elif kind == "describe":
            cid = self._id_from(body, "describe body")
            m = self.store.get(cid)
            if m is None:
                raise self._refuse("not_found", f"no card {cid} here", pa.ArrowKeyError)
            yield flight.Result(m.to_json())
        elif kind == "revoke":
            yield flight.Result(self._revoke(body))
        else:
            raise self._refuse("bad_request", f"unknown action {kind[:40]!r}; use health, describe, revoke")

    def _revoke(self, body: bytes) -> bytes:
        if not self._token_set:
            raise self._refuse("read_only", "this server accepts no revocations (no token configured)",
                               flight.FlightUnauthorizedError)
        try:
            if len(body) > 1024:
                raise ValueError("body over 1024 bytes")
            d = json.loads(body)
            cid, sig = d["id"], bytes.fromhex(d["signature"])
        except (ValueError, KeyError, TypeError) as exc:
            raise self._refuse("bad_request", f"revoke body must be JSON {{id, signature}}: {exc}") from None
        cid = self._id_from(cid.encode() if isinstance(cid, str) else b"", "revoke id")
        m = self.store.get(cid)
        if m is None:
            raise self._refuse("not_found", f"no card {cid} here", pa.ArrowKeyError)
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(m.publisher_key)).verify(sig, REVOKE_TAG + cid.encode())
        except (InvalidSignature, ValueError):
            raise self._refuse("bad_signature", f"revocation of {cid} is not signed by its publisher "
                                                f"{m.publisher}", flight.FlightUnauthorizedError) from None
        self.store.remove(cid, revoke=True)
        self.served["revoke"] += 1
        return json.dumps({"id": cid, "revoked": True}).encode()


def _chunks(source: pa.NativeFile):
    """Yield the mapped file as one-row batches of ``CHUNK_BYTES`` (zero-copy slices)."""
    try:
        size = source.size()
        buf = source.read_buffer(size)
        for off in range(0, size, CHUNK_BYTES):
            piece = buf.slice(off, min(CHUNK_BYTES, size - off))
            offsets = pa.array([0, piece.size], pa.int32()).buffers()[1]
            arr = pa.Array.from_buffers(pa.binary(), 1, [None, offsets, piece])
            yield pa.RecordBatch.from_arrays([arr], schema=CHUNK_SCHEMA)
    finally:
        source.close()


def _receive(reader, staged: Path, limit: int) -> tuple[str, int]:
    """Write an upload's chunks to ``staged``, hashing as they come; stop as soon as more than
    ``limit`` bytes arrive (returns total -1). Returns (hex SHA-256, bytes)."""
    h = hashlib.sha256()
    total = 0
    with open(staged, "wb") as fh:
        while True:
            try:
                batch, _ = reader.read_chunk()
            except StopIteration:
                break
            if batch is None:
                continue
            for piece in batch.column(0).to_pylist() if batch.num_rows > 1 else [_single(batch)]:
                if piece is None:
                    continue
                total += len(piece)
                if total > limit:
                    return "", -1
                h.update(piece)
                fh.write(piece)
    return h.hexdigest(), total


def _single(batch: pa.RecordBatch):
    """The one binary value of a one-row chunk batch, as a zero-copy memoryview."""
    if batch.num_rows == 0:
        return None
    col = batch.column(0)
    if col.null_count:
        return None
    offs = memoryview(col.buffers()[1]).cast("i")
    data = col.buffers()[2]
    start, end = offs[col.offset], offs[col.offset + 1]
    return memoryview(data)[start:end] if data is not None else b""


def _drain(reader, limit: int) -> None:
    total = 0
    while total <= limit:
        try:
            batch, _ = reader.read_chunk()
        except StopIteration:
            return
        if batch is not None:
            total += batch.nbytes
