"""``FederationManager``: one node's part in the federation — its Flight server, its keys, its
peers (static and discovered), publishing, scanning and fetching with quarantine.

ArrowEngine's method names: ``start()``, ``stop()``, ``publish(card_or_path)``,
``scan_remote_skills()``, ``fetch_skill(name_or_id)``.

Storage layout under ``storage_dir``::

    store/          the content-addressed store this node serves (``store.py``)
    quarantine/     fetched cards waiting for their checks (``quarantine.py``)
    fetched/        admitted cards when no library is attached
    keys/           the keyring, unless one is given
"""

from __future__ import annotations

import os
import re
import threading
from concurrent.futures import Future, wait
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable

from .._atomic import fsync_dir
from ..errors import InputError, SkillRejectedError
from ._pool import workers
from .client import FederationClient
from .errors import FederationError, ManifestError, TrustError
from .manifest import LIMITS as MANIFEST_LIMITS
from .manifest import Manifest, card_id, is_card_id
from .quarantine import Admitted, Evaluator, Quarantine
from .server import FederationServer, ServerLimits
from .store import CardStore
from .tls import TLSConfig
from .trust import Keyring

if TYPE_CHECKING:  # pragma: no cover
    from ..route.library import SkillEntry, SkillLibrary
    from .discovery import Discovery

__all__ = ["FederationManager", "RemoteSkill", "Peer"]

_NODE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class Peer:
    """Where to reach a peer, with the token to send (``None``: the manager's own token)."""

    location: str
    token: str | None = None
    node_id: str = ""
    key_id: str = ""
    discovered: bool = False


@dataclass(frozen=True)
class RemoteSkill:
    """A manifest a peer offers."""

    peer: Peer
    manifest: Manifest


class FederationManager:
    """A node's federation endpoint.

    Args:
        node_name: this node's name (letters, digits, ``_ . -``); its node id is
            ``<node_name>.<first 8 hex of its key id>``.
        port: Flight port (0 = pick a free one; read :attr:`port` after :meth:`start`).
        storage_dir: where the store, quarantine and (default) keyring live.
        token: bearer token: required by this node's server, sent to peers.
        peers: static peers: ``"host:port"``, ``"grpc+tcp://host:port"``, or :class:`Peer`.
        discovery: announce and browse with zeroconf (``_ai-os._tcp.local.``).
        host: bind address (default 127.0.0.1); advertise: address announced to peers.
        keyring: a :class:`Keyring` or its directory (default ``storage_dir/keys``); the node's
            signing key is created on first start when the keyring has none.
        base_fingerprint: the node's model fingerprint; listings are filtered by it and
            fetched cards must match it.
        library: a ``SkillLibrary`` that admitted cards enter (origin ``"peer"``).
        evaluator: local gate for fetched cards (see ``quarantine.Evaluator``).
        tls: :class:`TLSConfig` for the server (cert/key/client_ca) and clients (ca, cert/key).
        limits: :class:`ServerLimits` of this node's server.
        reshare: serve admitted peer cards from this node too (with the original signature).
    """

    def __init__(self, node_name: str, port: int = 0, storage_dir: str | Path = "federation", *,
                 token: str | None = None, peers: Iterable[str | Peer] = (), discovery: bool = True,
                 host: str = "127.0.0.1", advertise: str | None = None,
                 keyring: Keyring | str | Path | None = None, base_fingerprint: str | None = None,
                 library: "SkillLibrary | None" = None, evaluator: Evaluator | None = None,
                 tls: TLSConfig | None = None, limits: ServerLimits | None = None,
                 reshare: bool = False, timeout: float = 30.0, discovery_expiry: float = 30.0) -> None:
        if not isinstance(node_name, str) or not _NODE.fullmatch(node_name):
            raise InputError(f"node_name must be 1-64 characters of letters, digits, '_', '.', '-', "
                             f"got {node_name!r}")
        if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port < 65536:
            raise InputError(f"port must be an int in [0, 65535], got {port!r}")
        self.node_name = node_name
        self.requested_port = port
        self.storage_dir = Path(storage_dir)
        self.storage_dir.mkdir(parents=True, exist_ok=True)
        self.token = token
        self.host, self.advertise = host, advertise
        self.keyring = keyring if isinstance(keyring, Keyring) else Keyring(
            keyring if keyring is not None else self.storage_dir / "keys")
        self.key = self.keyring.ensure_key(node_name if len(node_name) <= 64 else "node")
        self.node_id = f"{node_name}.{self.key.key_id[:8]}"
        self.base_fingerprint = base_fingerprint
        self.library = library
        self.tls = tls
        self.limits = limits
        self.reshare = reshare
        self.timeout = float(timeout)
        self.store = CardStore(self.storage_dir / "store")
        self.quarantine = Quarantine(self.storage_dir / "quarantine", self.keyring,
                                     base_fingerprint, evaluator)
        self._static = [self._as_peer(p) for p in peers]
        self.use_discovery = bool(discovery)
        self.discovery_expiry = float(discovery_expiry)
        self.server: FederationServer | None = None
        self.discovery: "Discovery | None" = None
        self.problems: list[str] = []
        self._clients: dict[tuple[str, str | None], FederationClient] = {}
        self._lock = threading.RLock()
        self._last_scan: list[RemoteSkill] = []

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "FederationManager":
        """Start the Flight server (and zeroconf when enabled). Returns self."""
        if self.server is not None:
            return self
        self.server = FederationServer(
            self.store, host=self.host, port=self.requested_port, token=self.token,
            tls=self.tls, limits=self.limits, advertise=self.advertise, node_id=self.node_id,
            key_id=self.key.key_id).serve_in_thread()
        if self.use_discovery:
            from .discovery import Discovery

            try:
                self.discovery = Discovery(self.node_id, self.server.port, self.key.key_id,
                                           self.server.advertise_host, tls=self.server.scheme == "grpc+tls",
                                           expiry=self.discovery_expiry).start()
            except Exception as exc:  # noqa: BLE001 - no multicast here: static peers still work
                self.problems.append(f"discovery disabled: {exc}")
                self.discovery = None
        return self

    def stop(self) -> None:
        if self.discovery is not None:
            self.discovery.stop()
            self.discovery = None
        for c in self._clients.values():
            c.close()
        self._clients.clear()
        if self.server is not None:
            self.server.shutdown()
            self.server = None

    def __enter__(self) -> "FederationManager":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    @property
    def port(self) -> int:
        return self.server.port if self.server is not None else self.requested_port

    @property
    def location(self) -> str:
        if self.server is None:
            raise FederationError(f"federation node {self.node_id} is not started")
        return self.server.location

    @property
    def key_id(self) -> str:
        return self.key.key_id

    # ------------------------------------------------------------------ peers
    def _as_peer(self, p: str | Peer) -> Peer:
        if isinstance(p, Peer):
            return p
        if not isinstance(p, str) or not p:
            raise InputError(f"a peer is 'host:port', a grpc+tcp:// or grpc+tls:// URI, or a Peer; got {p!r}")
        if "://" not in p:
            p = f"{'grpc+tls' if self.tls and self.tls.ca else 'grpc+tcp'}://{p}"
        return Peer(p)

    def add_peer(self, peer: str | Peer) -> Peer:
        """Add a static peer (works where multicast does not)."""
        p = self._as_peer(peer)
        if p not in self._static:
            self._static.append(p)
        return p

    def peers(self) -> list[Peer]:
        """Static peers plus those discovered (this node excluded)."""
        out = list(self._static)
        seen = {p.location for p in out}
        if self.discovery is not None:
            for d in self.discovery.peers():
                if d.location not in seen and d.node_id != self.node_id:
                    out.append(Peer(d.location, None, d.node_id, d.key_id, True))
                    seen.add(d.location)
        mine = self.server.location if self.server is not None else None
        return [p for p in out if p.location != mine]

    def client(self, peer: Peer) -> FederationClient:
        key = (peer.location, peer.token)
        with self._lock:
            c = self._clients.get(key)
            if c is None:
                c = FederationClient(peer.location, peer.token or self.token, tls=self.tls,
                                     timeout=self.timeout)
                self._clients[key] = c
            return c

    # ------------------------------------------------------------------ publishing
    def publish(self, card_or_path: Any, examples: Iterable[str] = (), description: str | None = None,
                *, version: int | None = None, validation: dict | None = None,
                push: bool = False) -> Manifest:
        """Offer a card from this node; returns its signed manifest.

        ``card_or_path``: a ``LoRACard``, a card file, or a library ``SkillEntry``. Own cards
        are signed with this node's key; a peer's card (a library entry of origin ``"peer"``,
        or a file whose hash is one) is re-shared only if it passed quarantine and the gate,
        with its original publisher's manifest and signature. ``push=True`` also uploads it
        to every peer (needs their token)."""
        from ..cards import LoRACard, LoRAFormat
        from ..route.library import SkillEntry

        tmp: Path | None = None
        try:
            if isinstance(card_or_path, LoRACard):
                out = self.storage_dir / "outgoing"
                out.mkdir(exist_ok=True)
                tmp = out / f".{os.getpid()}-{threading.get_ident()}.lora.arrow"
                LoRAFormat.save(card_or_path, tmp)
                path = tmp
                entry = None
            elif isinstance(card_or_path, SkillEntry):
                entry, path = card_or_path, Path(card_or_path.path)
            elif isinstance(card_or_path, (str, os.PathLike)):
                path = Path(card_or_path)
                if not path.is_file():
                    raise InputError(f"{path}: no such card file")
                entry = self.library.find_by_hash(card_id(path)) if self.library is not None else None
                if entry is not None and entry.origin != "peer":
                    entry = None  # an own card found in the library: described from the file
            else:
                raise InputError(f"publish takes a LoRACard, a card path or a SkillEntry, got "
                                 f"{type(card_or_path).__name__}")
            if entry is not None and entry.origin == "peer":
                m = self._reshare_manifest(entry)
            else:
                if entry is not None:
                    if not entry.passed:
                        raise SkillRejectedError(f"skill {entry.key} did not pass its gate; not published")
                    # a library keeps more and longer examples than a manifest carries: send the
                    # first ones that fit (explicit arguments are validated strictly instead)
                    examples = tuple(examples) or tuple(
                        e for e in entry.examples if len(e) <= MANIFEST_LIMITS["max_example_chars"]
                    )[:MANIFEST_LIMITS["max_examples"]]
                    if description is None:
                        description = entry.description[:MANIFEST_LIMITS["max_description_chars"]]
                    version = entry.version if version is None else version
                    validation = entry.validation if validation is None else validation
                m = Manifest.for_card(path, self.key, examples=tuple(examples),
                                      description=description, version=version or 1,
                                      validation=validation)
            self.store.add_file(path, m)
        finally:
            if tmp is not None:
                tmp.unlink(missing_ok=True)
        if push:
            for peer in self.peers():
                try:
                    self.client(peer).publish(self.store.card_path(m.id), m)
                except (FederationError, ManifestError) as exc:
                    self._problem(f"push of {m.key} to {peer.location}: {exc}")
        return m

    def _reshare_manifest(self, entry: "SkillEntry") -> Manifest:
        blob = entry.metadata.get("federation_manifest")
        if not entry.passed or not blob:
            raise SkillRejectedError(
                f"peer skill {entry.key} is re-shared only after it passed quarantine and the gate "
                f"(passed={entry.passed}, manifest {'kept' if blob else 'missing'})")
        m = Manifest.from_json(blob)
        self.keyring.verify_manifest(m)  # the publisher may have been revoked since
        if m.id != entry.content_hash or card_id(entry.path) != m.id:
            raise SkillRejectedError(f"peer skill {entry.key}: its bytes are not the card its manifest signs")
        return m

    def unpublish(self, cid: str) -> bool:
        return self.store.remove(cid)

    # ------------------------------------------------------------------ scanning and fetching
    def scan_remote_skills(self, base_fingerprint: str | None = ..., *,  # type: ignore[assignment]
                           trusted_only: bool = True) -> list[RemoteSkill]:
        """Ask every peer for its manifests (for the node's base model unless told otherwise).
        Manifests whose publisher this node does not trust are left out (``trusted_only``);
        unreachable peers are noted in :attr:`problems`. Returns them, newest versions first."""
        fp = self.base_fingerprint if base_fingerprint is ... else base_fingerprint
        found: dict[str, RemoteSkill] = {}
        for peer in self.peers():
            try:
                c = self.client(peer)
                manifests = c.list(base_fingerprint=fp)
                for p in c.problems:
                    self._problem(p)
                c.problems.clear()
            except FederationError as exc:
                self._problem(str(exc))
                continue
            for m in manifests:
                if trusted_only:
                    try:
                        self.keyring.verify_manifest(m)
                    except TrustError as exc:
                        self._problem(f"{peer.location}: {m.key} ({m.id[:12]}) ignored: {exc}")
                        continue
                found.setdefault(m.id, RemoteSkill(peer, m))
        out = sorted(found.values(), key=lambda r: (r.manifest.name, -r.manifest.version, r.manifest.id))
        self._last_scan = out
        return out

    def find_remote(self, name_or_id: str, scan: bool = True) -> RemoteSkill:
        """The remote skill with this id, or the newest version of this name."""
        if not isinstance(name_or_id, str) or not name_or_id:
            raise InputError(f"fetch_skill takes a skill name or a card id, got {name_or_id!r}")
        for attempt in (False, True) if scan else (False,):
            pool = self.scan_remote_skills() if attempt or not self._last_scan else self._last_scan
            if is_card_id(name_or_id):
                hits = [r for r in pool if r.manifest.id == name_or_id]
            else:
                hits = [r for r in pool if r.manifest.name == name_or_id]
            if hits:
                return max(hits, key=lambda r: (r.manifest.version, r.manifest.created))
        recent = "; ".join(self.problems[-3:])
        raise FederationError(f"no peer offers a trusted skill {name_or_id!r} for base model "
                              f"{self.base_fingerprint} (peers: {[p.location for p in self.peers()]})"
                              + (f"; recent problems: {recent}" if recent else ""))

    def fetch_skill(self, name_or_id: str | RemoteSkill, library: "SkillLibrary | None" = None):
        """Fetch a peer's card, run it through quarantine and add it to ``library`` (or the
        manager's). Returns the library ``SkillEntry``, or the admitted card's path under
        ``fetched/`` when no library is attached. Raises :class:`QuarantineError` (the card is
        deleted; the reason is also in ``quarantine.reports``) or :class:`FederationError`."""
        remote = name_or_id if isinstance(name_or_id, RemoteSkill) else self.find_remote(name_or_id)
        m = remote.manifest
        library = library if library is not None else self.library
        if library is not None:
            have = library.find_by_hash(m.id)
            if have is not None:
                return have
        fetched = self.client(remote.peer).fetch(m, self.quarantine.directory)
        # The quarantine's file is the one kept (moved, never copied): it is made durable while
        # the quarantine checks it (the checks use the CPU, the fsync waits on the disk).
        durable = workers().submit(_fsync_file, fetched.path)
        try:
            admitted = self.quarantine.check(fetched)
        except BaseException:
            wait([durable])  # the rejected file is gone; its fsync's outcome does not matter
            raise
        try:
            return self._admit(admitted, remote, library, durable)
        finally:
            self.quarantine.discard(admitted)

    def _admit(self, admitted: Admitted, remote: RemoteSkill, library: "SkillLibrary | None",
               durable: "Future | None" = None):
        m = admitted.manifest
        local = admitted.local_validation
        meta = {"federation_manifest": m.to_json().decode("ascii"), "card_id": m.id,
                "publisher": m.publisher, "signature": m.signature, "peer": remote.peer.location,
                "peer_version": str(m.version),
                "validation_source": "local" if local is not None else "publisher"}
        if library is None:
            dest = self.storage_dir / "fetched" / f"{m.id}.lora.arrow"
            dest.parent.mkdir(exist_ok=True)
            if self.reshare:
                self.store.add_file(admitted.path, m)
            if durable is not None:
                durable.result()  # its bytes are on disk before its name is
            else:
                _fsync_file(admitted.path)
            os.replace(admitted.path, dest)  # the quarantine's own file: moved, not copied
            fsync_dir(dest.parent)
            return dest
        if durable is not None:
            durable.result()  # done before the file moves under it
        # The library takes the quarantine's file (moved, not copied) with the hash the
        # quarantine proved equal to the signed id; it still loads it with verify=True.
        result = library.add(admitted.path, examples=m.examples, description=m.description,
                             origin="peer", validation=local if local is not None else m.validation,
                             metadata=meta, _owned_sha256=m.id)
        if self.reshare:
            self.store.add_file(result.path, m)
        return result

    @property
    def reports(self) -> list[dict[str, Any]]:
        """Every quarantine decision (id, name, ok, check, reason, time)."""
        return self.quarantine.reports

    def source(self, encoder: Any, **kw) -> "Any":
        """A Tier 1 :class:`FederationSource` over this manager's peers."""
        from .source import FederationSource

        return FederationSource(self, encoder, **kw)

    def _problem(self, msg: str) -> None:
        self.problems.append(msg)
        del self.problems[:-500]

    def status(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "key_id": self.key_id,
                "location": self.server.location if self.server else None,
                "cards": len(self.store), "peers": [p.location for p in self.peers()],
                "base_fingerprint": self.base_fingerprint,
                "refusals": dict(self.server.refusals) if self.server else {}}


def _fsync_file(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
