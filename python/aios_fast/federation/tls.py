"""TLS settings for the Flight server and client, and a small test PKI.

With ``cert``/``key`` the server speaks TLS (``grpc+tls``); with ``client_ca`` as well it
requires every client to present a certificate signed by that CA (mutual TLS). The client
trusts ``ca`` and, for mutual TLS, presents ``cert``/``key``.
"""

from __future__ import annotations

import datetime as _dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path

from .._atomic import atomic_write_bytes
from ..errors import InputError

__all__ = ["TLSConfig", "make_test_pki"]


@dataclass(frozen=True)
class TLSConfig:
    """PEM file paths. Server: ``cert``+``key`` (required), ``client_ca`` (mutual TLS).
    Client: ``ca`` (required: the CA that signed the server), ``cert``+``key`` (mutual TLS),
    ``override_hostname`` (name to check in the server certificate)."""

    cert: str | None = None
    key: str | None = None
    ca: str | None = None
    client_ca: str | None = None
    override_hostname: str | None = None

    def read(self, which: str) -> bytes | None:
        p = getattr(self, which)
        if p is None:
            return None
        try:
            return Path(p).read_bytes()
        except OSError as exc:
            raise InputError(f"TLS {which} file {p}: {exc.strerror or exc}") from None


def make_test_pki(directory: str | Path, hosts: tuple[str, ...] = ("127.0.0.1", "localhost"),
                  days: int = 2) -> dict[str, Path]:
    """Create a CA, a server certificate for ``hosts`` and a client certificate (EC P-256,
    signed by the CA) under ``directory``. For tests and local trials only. Returns the paths
    ``ca``, ``server_cert``, ``server_key``, ``client_cert``, ``client_key``, plus
    ``other_ca``/``other_cert``/``other_key``: a client certificate from an unrelated CA."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    now = _dt.datetime.now(_dt.timezone.utc)

    def name(cn: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])

    def pem_key(k) -> bytes:
        return k.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.NoEncryption())

    def make_ca(cn: str):
        k = ec.generate_private_key(ec.SECP256R1())
        c = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(name(cn))
             .public_key(k.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - _dt.timedelta(minutes=5)).not_valid_after(now + _dt.timedelta(days=days))
             .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
             .sign(k, hashes.SHA256()))
        return k, c

    def leaf(ca_key, ca_cert, cn: str, server: bool):
        k = ec.generate_private_key(ec.SECP256R1())
        b = (x509.CertificateBuilder().subject_name(name(cn)).issuer_name(ca_cert.subject)
             .public_key(k.public_key()).serial_number(x509.random_serial_number())
             .not_valid_before(now - _dt.timedelta(minutes=5)).not_valid_after(now + _dt.timedelta(days=days))
             .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
             .add_extension(x509.ExtendedKeyUsage(
                 [ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
                 critical=False))
        if server:
            sans = []
            for h in hosts:
                try:
                    sans.append(x509.IPAddress(ipaddress.ip_address(h)))
                except ValueError:
                    sans.append(x509.DNSName(h))
            b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
        return k, b.sign(ca_key, hashes.SHA256())

    ca_key, ca = make_ca("aios-fast test CA")
    s_key, s_cert = leaf(ca_key, ca, "aios-fast server", True)
    c_key, c_cert = leaf(ca_key, ca, "aios-fast client", False)
    o_ca_key, o_ca = make_ca("unrelated CA")
    o_key, o_cert = leaf(o_ca_key, o_ca, "stranger", False)
    out = {}
    for label, data in (("ca", ca.public_bytes(serialization.Encoding.PEM)),
                        ("server_cert", s_cert.public_bytes(serialization.Encoding.PEM)),
                        ("server_key", pem_key(s_key)),
                        ("client_cert", c_cert.public_bytes(serialization.Encoding.PEM)),
                        ("client_key", pem_key(c_key)),
                        ("other_ca", o_ca.public_bytes(serialization.Encoding.PEM)),
                        ("other_cert", o_cert.public_bytes(serialization.Encoding.PEM)),
                        ("other_key", pem_key(o_key))):
        out[label] = atomic_write_bytes(d / f"{label}.pem", data)
    return out
