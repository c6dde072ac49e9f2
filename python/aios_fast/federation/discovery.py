"""Finding peers on the local network: zeroconf (mDNS/DNS-SD, RFC 6762/6763) service
``_ai-os._tcp.local.``, as ArrowEngine announces it.

Each node registers one service instance whose TXT properties carry its node id, Flight port
and publisher key id; it browses for the others, ignores itself, and forgets peers that say
goodbye or stop answering (records carry a TTL of ``expiry`` seconds and known peers are
re-resolved every ``expiry / 3`` seconds). Discovery is only a hint of where to dial: every
call to a discovered peer is still authenticated, and every card it offers is still checked.
"""

from __future__ import annotations

import re
import socket
import threading
import time
from dataclasses import dataclass

__all__ = ["Discovery", "DiscoveredPeer", "SERVICE_TYPE"]

SERVICE_TYPE = "_ai-os._tcp.local."
_SAFE = re.compile(r"[^A-Za-z0-9-]")


@dataclass
class DiscoveredPeer:
    """A peer seen through zeroconf."""

    node_id: str
    host: str
    port: int
    key_id: str
    tls: bool
    last_seen: float

    @property
    def location(self) -> str:
        return f"{'grpc+tls' if self.tls else 'grpc+tcp'}://{self.host}:{self.port}"


class Discovery:
    """Announce this node and browse for peers.

    Args:
        node_id: this node's id (also how it recognises itself).
        port: its Flight port.
        key_id: its publisher key id.
        host: the address it advertises (an IPv4 address peers can reach; never 0.0.0.0).
        tls: whether its server speaks TLS.
        expiry: seconds after which a silent peer is forgotten.
        interfaces: addresses to run mDNS on (default: ``[host]``, or all when host is loopback).
    """

    def __init__(self, node_id: str, port: int, key_id: str, host: str, *, tls: bool = False,
                 expiry: float = 30.0, interfaces: list[str] | None = None) -> None:
        if host in ("0.0.0.0", "::", ""):
            raise ValueError("Discovery must advertise a reachable address, not a wildcard")
        self.node_id, self.port, self.key_id, self.host, self.tls = node_id, int(port), key_id, host, tls
        self.expiry = float(expiry)
        self.interfaces = interfaces
        self._peers: dict[str, DiscoveredPeer] = {}
        self._names: dict[str, str] = {}  # service name -> node id
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._zc = None
        self._browser = None
        self._info = None
        self._refresher: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "Discovery":
        from zeroconf import InterfaceChoice, IPVersion, ServiceBrowser, ServiceInfo, Zeroconf

        ifaces = self.interfaces
        if ifaces is None:
            ifaces = InterfaceChoice.All if self.host.startswith("127.") else [self.host]
        self._zc = Zeroconf(interfaces=ifaces, ip_version=IPVersion.V4Only)
        name = f"{_SAFE.sub('-', self.node_id)[:50]}.{SERVICE_TYPE}"
        self._info = ServiceInfo(
            SERVICE_TYPE, name, addresses=[socket.inet_aton(self.host)], port=self.port,
            properties={"node_id": self.node_id, "flight_port": str(self.port),
                        "key_id": self.key_id, "tls": "1" if self.tls else "0"},
            server=f"{_SAFE.sub('-', self.node_id)[:50]}.local.",
            host_ttl=max(int(self.expiry), 5), other_ttl=max(int(self.expiry), 5))
        self._zc.register_service(self._info, allow_name_change=True)
        self._browser = ServiceBrowser(self._zc, SERVICE_TYPE, handlers=[self._on_change])
        self._refresher = threading.Thread(target=self._refresh_loop, name="aios-discovery", daemon=True)
        self._refresher.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._zc is not None:
            try:
                if self._browser is not None:
                    self._browser.cancel()
                if self._info is not None:
                    self._zc.unregister_service(self._info)  # goodbye: peers forget us now
            finally:
                self._zc.close()
                self._zc = None
        if self._refresher is not None:
            self._refresher.join(timeout=5)

    def peers(self) -> list[DiscoveredPeer]:
        """Peers seen within ``expiry`` seconds (never this node)."""
        now = time.time()
        with self._lock:
            for nid in [n for n, p in self._peers.items() if now - p.last_seen > self.expiry]:
                del self._peers[nid]
            return sorted(self._peers.values(), key=lambda p: p.node_id)

    # ------------------------------------------------------------------ zeroconf callbacks
    def _on_change(self, zeroconf, service_type, name, state_change) -> None:
        from zeroconf import ServiceStateChange

        if state_change is ServiceStateChange.Removed:
            with self._lock:
                nid = self._names.pop(name, None)
                if nid is not None:
                    self._peers.pop(nid, None)
            return
        try:
            self._resolve(name)
        except Exception:  # noqa: BLE001 - a hostile or vanished announcement; zeroconf's thread must live
            pass

    def _resolve(self, name: str) -> bool:
        zc = self._zc
        if zc is None:
            return False
        info = zc.get_service_info(SERVICE_TYPE, name, timeout=2000)
        if info is None:
            return False
        peer = _parse(info)
        if peer is None or peer.node_id == self.node_id:
            return peer is not None  # malformed announcements and ourselves are ignored
        with self._lock:
            self._names[name] = peer.node_id
            self._peers[peer.node_id] = peer
        return True

    def _refresh_loop(self) -> None:
        while not self._stop.wait(max(self.expiry / 3, 0.5)):
            with self._lock:
                names = list(self._names)
            for name in names:
                if self._stop.is_set():
                    return
                try:
                    self._resolve(name)
                except Exception:  # a dying zeroconf during shutdown; the peer just ages out
                    pass


def _parse(info) -> DiscoveredPeer | None:
    """A peer from an untrusted announcement, or None when it is malformed."""
    props = {k.decode("utf-8", "replace") if isinstance(k, bytes) else k:
             (v.decode("utf-8", "replace") if isinstance(v, bytes) else v)
             for k, v in (info.properties or {}).items()}
    nid, key, port = props.get("node_id"), props.get("key_id") or "", props.get("flight_port")
    addrs = info.parsed_addresses() if hasattr(info, "parsed_addresses") else []
    try:
        port_i = int(port) if port is not None else int(info.port)
    except (TypeError, ValueError):
        return None
    if not nid or len(nid) > 128 or not addrs or not 0 < port_i < 65536 or len(key) > 64:
        return None
    host = next((a for a in addrs if a not in ("0.0.0.0",) and ":" not in a), None)
    if host is None:
        return None
    return DiscoveredPeer(nid, host, port_i, key, props.get("tls") == "1", time.time())
