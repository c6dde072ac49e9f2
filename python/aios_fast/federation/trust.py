"""Keys and trust: Ed25519 signing keys (RFC 8032, through ``cryptography``) and a keyring file
saying which publishers this node trusts.

A key's id is the first 32 hex digits of the SHA-256 of its raw 32-byte public key, so an id
can always be recomputed from the key a manifest carries: nobody can claim someone else's id.

Layout of a keyring directory::

    keyring.json            {"format": "aios-keyring/1", "keys": {key_id: {name, public_key,
                              added, trusted, revoked, own}}}   (written atomically)
    private/<key_id>.pem    this node's own private keys (PKCS#8 PEM, mode 0600)

A key can be trusted (its signatures are accepted), untrusted, or revoked (refused for good,
even if trusted again by mistake: :meth:`Keyring.trust` refuses a revoked key unless forced).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from .._atomic import atomic_write, atomic_write_bytes
from ..errors import InputError
from .errors import TrustError

if TYPE_CHECKING:  # pragma: no cover
    from .manifest import Manifest

__all__ = ["SigningKey", "Keyring", "KeyInfo", "key_id_of", "default_keyring_dir"]

_FORMAT = "aios-keyring/1"
_NAME = re.compile(r"[A-Za-z0-9_.@-]{1,64}")


def key_id_of(public_key: bytes) -> str:
    """Key id of a raw 32-byte Ed25519 public key."""
    if not isinstance(public_key, (bytes, bytearray)) or len(public_key) != 32:
        raise TrustError(f"an Ed25519 public key is 32 bytes, got {len(public_key)}")
    return hashlib.sha256(bytes(public_key)).hexdigest()[:32]


def default_keyring_dir() -> Path:
    """``$AIOS_KEYRING`` or ``~/.aios/keys``."""
    return Path(os.environ.get("AIOS_KEYRING") or Path.home() / ".aios" / "keys")


class SigningKey:
    """An Ed25519 private key with its id (``key_id``) and raw public key (``public_hex``)."""

    def __init__(self, private_key) -> None:
        from cryptography.hazmat.primitives import serialization

        self._key = private_key
        raw = private_key.public_key().public_bytes(serialization.Encoding.Raw,
                                                     serialization.PublicFormat.Raw)
        self.public_bytes: bytes = raw
        self.public_hex: str = raw.hex()
        self.key_id: str = key_id_of(raw)

    @classmethod
    def generate(cls) -> "SigningKey":
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        return cls(Ed25519PrivateKey.generate())

    @classmethod
    def load(cls, path: str | Path) -> "SigningKey":
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

        try:
            key = serialization.load_pem_private_key(Path(path).read_bytes(), password=None)
        except (OSError, ValueError, TypeError) as exc:
            raise TrustError(f"{path}: not a readable PEM private key ({exc})") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise TrustError(f"{path}: expected an Ed25519 private key, got {type(key).__name__}")
        return cls(key)

    def save(self, path: str | Path) -> Path:
        """Write the private key as PKCS#8 PEM, readable by the owner only (0600)."""
        from cryptography.hazmat.primitives import serialization

        pem = self._key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                      serialization.NoEncryption())
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)

        def write(fh) -> None:
            os.fchmod(fh.fileno(), 0o600)
            fh.write(pem)

        return atomic_write(path, write)

    def sign(self, data: bytes) -> bytes:
        return self._key.sign(data)

    def __repr__(self) -> str:
        return f"SigningKey(key_id={self.key_id!r})"


@dataclass
class KeyInfo:
    """One keyring entry."""

    key_id: str
    name: str
    public_key: str      # raw public key, hex
    added: float
    trusted: bool
    revoked: bool
    own: bool            # this node holds the private key

    @property
    def status(self) -> str:
        return "revoked" if self.revoked else ("trusted" if self.trusted else "untrusted")


class Keyring:
    """A node's keys and the publishers it trusts (see the module docstring).

    Args:
        directory: the keyring directory (created with mode 0700 when missing).
    """

    def __init__(self, directory: str | Path | None = None) -> None:
        self.directory = Path(directory) if directory is not None else default_keyring_dir()
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._file = self.directory / "keyring.json"
        self._keys: dict[str, KeyInfo] = self._read()

    # ------------------------------------------------------------------ file
    def _read(self) -> dict[str, KeyInfo]:
        if not self._file.exists():
            return {}
        try:
            d = json.loads(self._file.read_text())
            if d.get("format") != _FORMAT or not isinstance(d.get("keys"), dict):
                raise ValueError(f"format is not {_FORMAT!r}")
            out = {}
            for kid, e in d["keys"].items():
                info = KeyInfo(**e)
                if key_id_of(bytes.fromhex(info.public_key)) != kid or info.key_id != kid:
                    raise ValueError(f"entry {kid}: the id is not the id of its public key")
                out[kid] = info
            return out
        except (ValueError, TypeError, KeyError) as exc:
            raise TrustError(f"{self._file}: corrupt keyring ({exc}); fix or move it away") from None

    def _write(self) -> None:
        d = {"format": _FORMAT, "keys": {k: asdict(v) for k, v in sorted(self._keys.items())}}
        atomic_write_bytes(self._file, json.dumps(d, indent=2, sort_keys=True).encode())

    # ------------------------------------------------------------------ keys
    def create_key(self, name: str = "node") -> SigningKey:
        """Generate a key pair, keep the private key under ``private/`` (0600) and trust its
        public key. Returns the new key."""
        _check_name(name)
        key = SigningKey.generate()
        key.save(self.directory / "private" / f"{key.key_id}.pem")
        self._keys[key.key_id] = KeyInfo(key.key_id, name, key.public_hex, time.time(),
                                         trusted=True, revoked=False, own=True)
        self._write()
        return key

    def signing_key(self, key_id: str | None = None) -> SigningKey:
        """This node's private key ``key_id`` (default: its only, or newest, usable own key)."""
        own = [k for k in self._keys.values() if k.own and not k.revoked]
        if key_id is None:
            if not own:
                raise TrustError(f"keyring {self.directory} holds no signing key; create one with "
                                 f"`aios-fast keys create --keyring {self.directory}`")
            key_id = max(own, key=lambda k: k.added).key_id
        info = self._keys.get(key_id)
        if info is None or not info.own:
            raise TrustError(f"keyring {self.directory} holds no private key {key_id}")
        if info.revoked:
            raise TrustError(f"key {key_id} is revoked and may not sign")
        key = SigningKey.load(self.directory / "private" / f"{key_id}.pem")
        if key.key_id != key_id:
            raise TrustError(f"private/{key_id}.pem holds key {key.key_id}, not {key_id}")
        return key

    def ensure_key(self, name: str = "node") -> SigningKey:
        """The node's signing key, created on first use."""
        try:
            return self.signing_key()
        except TrustError:
            return self.create_key(name)

    def trust(self, public_key: str | bytes, name: str = "peer", *, force: bool = False) -> str:
        """Trust a publisher's public key (raw bytes, 64 hex, or a PEM text). Returns its id."""
        _check_name(name)
        raw = _parse_public(public_key)
        kid = key_id_of(raw)
        info = self._keys.get(kid)
        if info is not None and info.revoked and not force:
            raise TrustError(f"key {kid} ({info.name}) was revoked; trust it again only with force=True")
        if info is None:
            info = KeyInfo(kid, name, raw.hex(), time.time(), trusted=True, revoked=False, own=False)
        info.trusted, info.revoked = True, False
        self._keys[kid] = info
        self._write()
        return kid

    def revoke(self, key_id: str) -> None:
        """Stop trusting ``key_id`` for good (its signatures are refused from now on)."""
        info = self._keys.get(key_id)
        if info is None:
            raise InputError(f"keyring {self.directory} has no key {key_id!r}; see `aios-fast keys list`")
        info.trusted, info.revoked = False, True
        self._write()

    def list(self) -> list[KeyInfo]:
        return sorted(self._keys.values(), key=lambda k: (k.added, k.key_id))

    def get(self, key_id: str) -> KeyInfo | None:
        return self._keys.get(key_id)

    def is_trusted(self, key_id: str) -> bool:
        info = self._keys.get(key_id)
        return bool(info and info.trusted and not info.revoked)

    def public_hex(self, key_id: str) -> str:
        info = self._keys.get(key_id)
        if info is None:
            raise InputError(f"keyring {self.directory} has no key {key_id!r}")
        return info.public_key

    # ------------------------------------------------------------------ verification
    def verify(self, key_id: str, data: bytes, signature: bytes) -> None:
        """Raise :class:`TrustError` unless ``signature`` over ``data`` is by a trusted key."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        info = self._check_trusted(key_id)
        try:
            Ed25519PublicKey.from_public_bytes(bytes.fromhex(info.public_key)).verify(signature, data)
        except InvalidSignature:
            raise TrustError(f"signature by key {key_id} ({info.name}) does not verify") from None

    def verify_manifest(self, manifest: "Manifest") -> None:
        """Raise :class:`TrustError` unless ``manifest`` is signed by a key this node trusts,
        and the key it carries is the trusted key itself."""
        info = self._check_trusted(manifest.publisher)
        if info.public_key != manifest.publisher_key:  # unreachable: id = hash(key); belt and braces
            raise TrustError(f"manifest carries another key than trusted key {info.key_id}")
        manifest.verify_signature()

    def _check_trusted(self, key_id: str) -> KeyInfo:
        info = self._keys.get(key_id)
        if info is None:
            raise TrustError(f"publisher key {key_id} is not in keyring {self.directory} (untrusted); "
                             f"trust it with `aios-fast keys trust`")
        if info.revoked:
            raise TrustError(f"publisher key {key_id} ({info.name}) is revoked")
        if not info.trusted:
            raise TrustError(f"publisher key {key_id} ({info.name}) is not trusted")
        return info


def _check_name(name: str) -> None:
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise InputError(f"key name must be 1-64 characters of A-Z a-z 0-9 _ . @ -, got {name!r}")


def _parse_public(public_key: str | bytes) -> bytes:
    if isinstance(public_key, (bytes, bytearray)) and len(public_key) == 32:
        return bytes(public_key)
    text = public_key.decode() if isinstance(public_key, (bytes, bytearray)) else str(public_key)
    text = text.strip()
    if re.fullmatch(r"[0-9a-fA-F]{64}", text):
        return bytes.fromhex(text)
    if "BEGIN PUBLIC KEY" in text:
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        try:
            key = serialization.load_pem_public_key(text.encode())
        except ValueError as exc:
            raise TrustError(f"not a PEM public key: {exc}") from None
        if not isinstance(key, Ed25519PublicKey):
            raise TrustError(f"expected an Ed25519 public key, got {type(key).__name__}")
        return key.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    raise TrustError("a public key must be 32 raw bytes, 64 hex characters or an Ed25519 PEM")
