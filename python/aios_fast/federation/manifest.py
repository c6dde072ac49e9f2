"""Signed manifests: what a node says about one content-addressed card it shares.

A card's **id** is the SHA-256 (hex) of its file bytes, so the id names the content and nothing
else (no name, no path). The manifest describes the card (name, version, description, example
texts used to route it, base-model fingerprint, key naming, ranks, dtypes, size, validation
report) and is signed with the publisher's Ed25519 key (RFC 8032) over its canonical JSON,
which contains the id: a valid signature binds the description to exactly those bytes.

Everything a peer sends is untrusted: :meth:`Manifest.from_json` accepts exactly the known
fields, with exact types and hard limits (:data:`LIMITS`), and raises :class:`ManifestError`
naming the field and the value otherwise. Validation says the manifest is well formed and
self-signed; whether its publisher is *trusted* is the keyring's decision (``trust.py``).
"""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .._hashing import file_sha256
from .errors import ManifestError, TrustError

if TYPE_CHECKING:  # pragma: no cover
    from .trust import SigningKey

__all__ = ["Manifest", "LIMITS", "FORMAT", "card_id", "is_card_id", "check_card_id"]

FORMAT = "aios-manifest/1"

#: hard limits on every field of a manifest received from a peer
LIMITS = {
    "max_json_bytes": 256 << 10,
    "max_name_chars": 128,
    "max_description_chars": 4000,
    "max_examples": 64,
    "max_example_chars": 1000,
    "max_validation_bytes": 32 << 10,
    "max_validation_depth": 6,
    "max_version": 1_000_000,
    "max_ranks": 4096,
    "max_rank": 1 << 16,
    "max_card_bytes": 1 << 32,   # 4 GiB: a server's own limit (e.g. 256 MiB) is stricter
}

_HEX64 = re.compile(r"[0-9a-f]{64}")
_KEY_ID = re.compile(r"[0-9a-f]{32}")
_SIG = re.compile(r"[0-9a-f]{128}")
_FINGERPRINT = re.compile(r"[a-z0-9]{1,8}:[0-9a-f]{16,128}")
# control characters other than tab and newline have no business in names or examples
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


def card_id(path: str | Path, chunk: int = 1 << 20) -> str:
    """The id of the card file at ``path``: hex SHA-256 (FIPS 180-4) of its bytes."""
    return file_sha256(path, chunk)


def is_card_id(value: object) -> bool:
    """True when ``value`` is exactly 64 lowercase hex characters (a str or bytes)."""
    if isinstance(value, bytes):
        if len(value) != 64:
            return False
        try:
            value = value.decode("ascii")
        except UnicodeDecodeError:
            return False
    return isinstance(value, str) and len(value) == 64 and _HEX64.fullmatch(value) is not None


def check_card_id(value: object, what: str = "card id") -> str:
    """Return ``value`` as a str if it is a card id; else raise :class:`ManifestError` saying
    what was expected (the value is shown shortened: it is untrusted input)."""
    if not is_card_id(value):
        shown = repr(value)
        shown = shown if len(shown) <= 80 else shown[:77] + "..."
        raise ManifestError(f"{what} must be 64 lowercase hex characters (a SHA-256), got {shown}")
    return value.decode("ascii") if isinstance(value, bytes) else value  # type: ignore[union-attr]


@dataclass(frozen=True)
class Manifest:
    """One shared card, as its publisher describes and signs it.

    Fields: ``id`` (hex SHA-256 of the card file), ``name``, ``version`` (>= 1),
    ``description``, ``examples`` (texts the card serves; peers route by them), ``base_fingerprint``
    (``fingerprint_model`` of the base model, or ``None``), ``naming`` (key scheme), ``ranks``
    and ``dtypes`` (sorted, distinct), ``size`` (file bytes), ``validation`` (the gate's report
    as a dict, or ``None``), ``publisher`` (key id), ``publisher_key`` (raw Ed25519 public key,
    hex), ``created`` (UNIX time) and ``signature`` (hex, over :meth:`signed_bytes`).
    """

    id: str
    name: str
    version: int
    description: str
    examples: tuple[str, ...]
    base_fingerprint: str | None
    naming: str
    ranks: tuple[int, ...]
    dtypes: tuple[str, ...]
    size: int
    validation: dict[str, Any] | None
    publisher: str
    publisher_key: str
    created: float
    signature: str = ""
    format: str = field(default=FORMAT)

    def __post_init__(self) -> None:
        _validate(self)

    # ------------------------------------------------------------------ building and signing
    @classmethod
    def for_card(cls, path: str | Path, key: "SigningKey", *, examples=(), description: str | None = None,
                 version: int = 1, validation: dict[str, Any] | None = None,
                 created: float | None = None) -> "Manifest":
        """Describe and sign the card file at ``path`` with ``key``.

        ``description`` defaults to the card's ``description`` metadata, ``validation`` to its
        ``validation`` metadata (the gate's JSON report), ``examples`` to its ``examples``
        metadata (a JSON list) when present. The card is read with the hostile-input checks
        (``LoRAFormat.inspect``); a card that does not load cannot be described.
        """
        from ..cards import LoRAFormat
        from ..errors import CardFormatError

        try:
            info = LoRAFormat.inspect(path)
        except CardFormatError as exc:
            raise ManifestError(f"cannot describe {path}: {exc}") from None
        if info["checksum"] == "mismatch":
            raise ManifestError(f"cannot describe {path}: its checksum does not match its content "
                                f"(corrupted); a corrupt card is never signed")
        meta = info["metadata"]
        if description is None:
            description = meta.get("description", "")
        if validation is None and meta.get("validation"):
            try:
                validation = json.loads(meta["validation"])
            except ValueError:
                validation = None
        examples = tuple(examples)
        if not examples and meta.get("examples"):
            try:
                parsed = json.loads(meta["examples"])
                examples = tuple(x for x in parsed if isinstance(x, str))[:LIMITS["max_examples"]]
            except (ValueError, TypeError):
                examples = ()
        unsigned = cls(
            id=card_id(path), name=info["name"], version=int(version), description=description,
            examples=examples, base_fingerprint=info["base_fingerprint"], naming=info["naming"],
            ranks=tuple(info["ranks"]), dtypes=tuple(info["dtypes"]), size=int(info["file_bytes"]),
            validation=validation, publisher=key.key_id, publisher_key=key.public_hex,
            created=float(time.time() if created is None else created))
        return unsigned.signed(key)

    def signed_bytes(self) -> bytes:
        """The canonical bytes a signature covers: the format tag and the sorted, compact,
        ASCII JSON of every field but ``signature``."""
        d = self.to_dict()
        d.pop("signature")
        return (FORMAT + "\n").encode() + _canonical(d)

    def signed(self, key: "SigningKey") -> "Manifest":
        """A copy signed with ``key`` (which must be the manifest's publisher key)."""
        if key.key_id != self.publisher:
            raise TrustError(f"manifest of {self.name!r} names publisher {self.publisher}, "
                             f"cannot be signed with key {key.key_id}")
        return replace(self, signature=key.sign(self.signed_bytes()).hex())

    def verify_signature(self) -> None:
        """Check that ``signature`` is a valid Ed25519 signature by ``publisher_key`` over
        :meth:`signed_bytes`. Says nothing about trust. Raises :class:`TrustError`."""
        from cryptography.exceptions import InvalidSignature
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

        if not self.signature:
            raise TrustError(f"manifest {self.id[:12]} ({self.name!r}) is not signed")
        pub = Ed25519PublicKey.from_public_bytes(bytes.fromhex(self.publisher_key))
        try:
            pub.verify(bytes.fromhex(self.signature), self.signed_bytes())
        except InvalidSignature:
            raise TrustError(f"manifest {self.id[:12]} ({self.name!r}): the signature does not verify "
                             f"against publisher key {self.publisher} (forged or altered)") from None

    # ------------------------------------------------------------------ (de)serialising
    def to_dict(self) -> dict[str, Any]:
        d = {f.name: getattr(self, f.name) for f in fields(self)}
        d["examples"] = list(self.examples)
        d["ranks"] = list(self.ranks)
        d["dtypes"] = list(self.dtypes)
        return d

    def to_json(self) -> bytes:
        return _canonical(self.to_dict())

    @classmethod
    def from_json(cls, data: bytes | str) -> "Manifest":
        """Parse an untrusted manifest strictly (see the module docstring)."""
        if isinstance(data, str):
            data = data.encode("utf-8", "surrogatepass")
        if not isinstance(data, (bytes, bytearray, memoryview)):
            raise ManifestError(f"a manifest must be JSON bytes, got {type(data).__name__}")
        if len(data) > LIMITS["max_json_bytes"]:
            raise ManifestError(f"manifest is {len(data)} bytes, over the limit of "
                                f"{LIMITS['max_json_bytes']}")
        try:
            d = json.loads(bytes(data), parse_constant=_refuse_constant)
        except (ValueError, RecursionError) as exc:
            raise ManifestError(f"manifest is not valid JSON: {str(exc)[:200]}") from None
        return cls.from_dict(d)

    @classmethod
    def from_dict(cls, d: Any) -> "Manifest":
        if not isinstance(d, dict):
            raise ManifestError(f"a manifest must be a JSON object, got {type(d).__name__}")
        names = {f.name for f in fields(cls)}
        unknown, missing = sorted(set(d) - names), sorted(names - set(d))
        if unknown or missing:
            raise ManifestError(f"manifest fields: unknown {[str(u)[:40] for u in unknown[:5]]}, "
                                f"missing {missing}")
        kw = dict(d)
        for k in ("examples", "ranks", "dtypes"):
            if not isinstance(kw[k], list):
                raise ManifestError(f"manifest field {k!r} must be a list, got {type(kw[k]).__name__}")
            kw[k] = tuple(kw[k])
        return cls(**kw)

    def check_card(self, info: dict[str, Any]) -> None:
        """Raise :class:`ManifestError` unless ``info`` (``LoRAFormat.inspect`` of the card)
        says what the manifest says: name, naming, ranks, dtypes, fingerprint and size."""
        pairs = {"name": info["name"], "naming": info["naming"], "ranks": tuple(info["ranks"]),
                 "dtypes": tuple(info["dtypes"]), "base_fingerprint": info["base_fingerprint"],
                 "size": info["file_bytes"]}
        wrong = {k: (getattr(self, k), v) for k, v in pairs.items() if getattr(self, k) != v}
        if wrong:
            detail = ", ".join(f"{k}: manifest {a!r}, card {b!r}" for k, (a, b) in wrong.items())
            raise ManifestError(f"manifest {self.id[:12]} does not describe its card ({detail})")

    @property
    def key(self) -> str:
        return f"{self.name}@v{self.version}"


# ---------------------------------------------------------------------- validation
def _canonical(d: dict[str, Any]) -> bytes:
    return json.dumps(d, sort_keys=True, separators=(",", ":"), ensure_ascii=True,
                      allow_nan=False).encode("ascii")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not allowed")


def _text(name: str, value: Any, limit: int, *, empty: bool = False, multiline: bool = False) -> None:
    if not isinstance(value, str):
        raise ManifestError(f"manifest field {name!r} must be a string, got {type(value).__name__}")
    if len(value) > limit or (not empty and not value.strip()):
        raise ManifestError(f"manifest field {name!r} must be {'' if empty else 'a non-empty '}"
                            f"string of at most {limit} characters, got {len(value)} characters")
    bad = _CONTROL.search(value) or (not multiline and ("\n" in value or "\t" in value))
    if bad:
        raise ManifestError(f"manifest field {name!r} contains control characters: {value[:60]!r}")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ManifestError(f"manifest field {name!r} is not valid Unicode (lone surrogates)") from None


def _int(name: str, value: Any, lo: int, hi: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
        raise ManifestError(f"manifest field {name!r} must be an integer in [{lo}, {hi}], got {value!r}"[:200])


def _depth(x: Any, level: int = 0) -> int:
    if isinstance(x, dict):
        return max([_depth(v, level + 1) for v in x.values()], default=level + 1)
    if isinstance(x, list):
        return max([_depth(v, level + 1) for v in x], default=level + 1)
    return level


def _validate(m: Manifest) -> None:
    from ..cards.card import ALLOWED_DTYPES
    from ..cards.naming import SCHEMES

    L = LIMITS
    if m.format != FORMAT:
        raise ManifestError(f"manifest format must be {FORMAT!r}, got {str(m.format)[:40]!r}")
    check_card_id(m.id, "manifest field 'id'")
    _text("name", m.name, L["max_name_chars"])
    if "/" in m.name or "\\" in m.name or m.name in (".", ".."):
        raise ManifestError(f"manifest field 'name' may not contain path separators, got {m.name!r}")
    _int("version", m.version, 1, L["max_version"])
    _text("description", m.description, L["max_description_chars"], empty=True, multiline=True)
    if not isinstance(m.examples, tuple) or len(m.examples) > L["max_examples"]:
        raise ManifestError(f"manifest field 'examples' must be a list of at most "
                            f"{L['max_examples']} strings")
    for i, ex in enumerate(m.examples):
        _text(f"examples[{i}]", ex, L["max_example_chars"], multiline=True)
    if m.base_fingerprint is not None and (not isinstance(m.base_fingerprint, str)
                                           or not _FINGERPRINT.fullmatch(m.base_fingerprint)):
        raise ManifestError(f"manifest field 'base_fingerprint' must be null or like 'fp1:<hex>', "
                            f"got {str(m.base_fingerprint)[:80]!r}")
    if m.naming not in SCHEMES:
        raise ManifestError(f"manifest field 'naming' must be one of {SCHEMES}, got {str(m.naming)[:40]!r}")
    if not isinstance(m.ranks, tuple) or not 1 <= len(m.ranks) <= L["max_ranks"]:
        raise ManifestError(f"manifest field 'ranks' must list 1 to {L['max_ranks']} ranks")
    for r in m.ranks:
        _int("ranks[]", r, 1, L["max_rank"])
    if list(m.ranks) != sorted(set(m.ranks)):
        raise ManifestError(f"manifest field 'ranks' must be sorted and distinct, got {list(m.ranks)[:8]}")
    if (not isinstance(m.dtypes, tuple) or not m.dtypes
            or any(not isinstance(t, str) or t not in ALLOWED_DTYPES for t in m.dtypes)
            or list(m.dtypes) != sorted(set(m.dtypes))):
        raise ManifestError(f"manifest field 'dtypes' must be sorted distinct names from "
                            f"{sorted(ALLOWED_DTYPES)}, got {str(list(m.dtypes))[:80]}")
    _int("size", m.size, 1, L["max_card_bytes"])
    if m.validation is not None:
        if not isinstance(m.validation, dict):
            raise ManifestError("manifest field 'validation' must be an object or null")
        try:
            blob = _canonical(m.validation)
        except (TypeError, ValueError) as exc:
            raise ManifestError(f"manifest field 'validation' is not plain JSON: {exc}") from None
        if len(blob) > L["max_validation_bytes"] or _depth(m.validation) > L["max_validation_depth"]:
            raise ManifestError(f"manifest field 'validation' is over {L['max_validation_bytes']} "
                                f"bytes or nested deeper than {L['max_validation_depth']}")
    if not isinstance(m.publisher, str) or not _KEY_ID.fullmatch(m.publisher):
        raise ManifestError(f"manifest field 'publisher' must be a key id (32 hex), got "
                            f"{str(m.publisher)[:80]!r}")
    if not isinstance(m.publisher_key, str) or not _HEX64.fullmatch(m.publisher_key):
        raise ManifestError("manifest field 'publisher_key' must be a raw Ed25519 public key (64 hex)")
    from .trust import key_id_of

    if key_id_of(bytes.fromhex(m.publisher_key)) != m.publisher:
        raise ManifestError(f"manifest field 'publisher' {m.publisher} is not the id of "
                            f"'publisher_key' (key id = SHA-256 of the key, first 32 hex)")
    if (isinstance(m.created, bool) or not isinstance(m.created, (int, float))
            or not math.isfinite(m.created) or not 0 <= m.created < 1e11):
        raise ManifestError(f"manifest field 'created' must be a UNIX time, got {m.created!r}"[:120])
    if not isinstance(m.signature, str) or (m.signature and not _SIG.fullmatch(m.signature)):
        raise ManifestError("manifest field 'signature' must be 128 hex characters (Ed25519)")
