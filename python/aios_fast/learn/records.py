"""QA record validation and normalisation shared by the QALogger and the CLI.

A record is one question/answer exchange seen by a node: what was asked, what was answered,
where the answer came from, which domain the router filed it under, when, how confident the
router was, and which skill (card name) served it, if any.
"""

from __future__ import annotations

import hashlib
import math
import re
import unicodedata
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Mapping

from ..errors import InputError

__all__ = ["QARecord", "normalise_text", "dedup_key", "FIELDS", "parse_timestamp"]

FIELDS = ("query", "answer", "source", "domain", "timestamp", "router_confidence", "skill_used")
_WS = re.compile(r"\s+")


def normalise_text(text: str) -> str:
    """Unicode NFKC, casefold, collapse runs of whitespace, strip: the form duplicates are judged on."""
    return _WS.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def dedup_key(query: str, answer: str) -> str:
    """Hex digest (128-bit BLAKE2b) of the normalised (query, answer) pair."""
    h = hashlib.blake2b(digest_size=16)
    h.update(normalise_text(query).encode())
    h.update(b"\x1f")  # unit separator: ("ab","c") and ("a","bc") must differ
    h.update(normalise_text(answer).encode())
    return h.hexdigest()


def parse_timestamp(value: Any, field: str = "timestamp") -> datetime:
    """Accepts an aware or naive (taken as UTC) datetime, POSIX seconds, or an ISO-8601 string."""
    if value is None:
        return datetime.now(timezone.utc)
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if not math.isfinite(value):
            raise InputError(f"{field}: expected finite POSIX seconds, got {value!r}")
        return datetime.fromtimestamp(float(value), tz=timezone.utc)
    if isinstance(value, str):
        try:
            return parse_timestamp(datetime.fromisoformat(value.replace("Z", "+00:00")), field)
        except ValueError:
            pass
    raise InputError(f"{field}: expected a datetime, POSIX seconds or an ISO-8601 string, got {value!r}")


@dataclass(frozen=True)
class QARecord:
    """One validated QA record. Build with :meth:`make` (which validates and fills defaults)."""

    query: str
    answer: str
    source: str
    domain: str
    timestamp: datetime
    router_confidence: float | None
    skill_used: str | None

    @property
    def key(self) -> str:
        return dedup_key(self.query, self.answer)

    def to_dict(self) -> dict[str, Any]:
        d = {f: getattr(self, f) for f in FIELDS}
        d["timestamp"] = self.timestamp.isoformat()
        return d

    @classmethod
    def make(cls, query: Any, answer: Any, source: Any = "", domain: Any = "general",
             timestamp: Any = None, router_confidence: Any = None, skill_used: Any = None, *,
             max_query_chars: int = 8192, max_answer_chars: int = 32768) -> "QARecord":
        def text(name: str, v: Any, limit: int, empty_ok: bool = False) -> str:
            if not isinstance(v, str):
                raise InputError(f"{name}: expected a string, got {type(v).__name__} {v!r:.60}")
            if not empty_ok and not v.strip():
                raise InputError(f"{name}: must not be empty or only whitespace")
            if len(v) > limit:
                raise InputError(f"{name}: {len(v)} characters, the limit is {limit}")
            if "\x00" in v:
                raise InputError(f"{name}: contains a NUL character")
            return v

        conf = router_confidence
        if conf is not None:
            if isinstance(conf, bool) or not isinstance(conf, (int, float)):
                raise InputError(f"router_confidence: expected a number in [0, 1] or None, got {conf!r}")
            conf = float(conf)
            if not (0.0 <= conf <= 1.0):  # also rejects NaN
                raise InputError(f"router_confidence: expected a number in [0, 1], got {conf!r}")
        return cls(
            query=text("query", query, max_query_chars),
            answer=text("answer", answer, max_answer_chars),
            source=text("source", "" if source is None else source, 256, empty_ok=True),
            domain=text("domain", "general" if domain is None else domain, 128),
            timestamp=parse_timestamp(timestamp),
            router_confidence=conf,
            skill_used=None if skill_used is None else text("skill_used", skill_used, 256),
        )

    @classmethod
    def from_mapping(cls, m: Mapping[str, Any], **limits: int) -> "QARecord":
        if not isinstance(m, Mapping):
            raise InputError(f"expected a JSON object with fields {FIELDS}, got {type(m).__name__}")
        unknown = set(m) - set(FIELDS)
        if unknown:
            raise InputError(f"unknown field(s) {sorted(unknown)}; allowed: {list(FIELDS)}")
        for f in ("query", "answer"):
            if f not in m:
                raise InputError(f"missing required field {f!r}")
        return cls.make(**{k: m[k] for k in m}, **limits)
