"""What flows between the trigger, the node's background worker and the learners.

``LearningRequest`` is what the trigger emits once a topic of unsure queries has enough
support; a ``Learner`` (``SkillDistiller``, or anything with the same ``learn`` method) turns it
into a skill. ``SkillSource`` is the Tier 1 plug: the local library now, federation peers
through the same interface.
"""

from __future__ import annotations

import time
import uuid
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..errors import InputError

if TYPE_CHECKING:  # pragma: no cover
    from ..cards import LoRACard
    from ..route.library import SkillEntry, SkillLibrary

__all__ = ["LearningRequest", "LearnOutcome", "Learner", "SkillSource", "SourceCandidate"]


@dataclass(frozen=True)
class LearningRequest:
    """A topic the node could not serve: its id (stable across restarts) and representative
    queries (de-duplicated, most central first)."""

    topic_id: str
    queries: tuple[str, ...]
    created: float = field(default_factory=time.time)
    request_id: str = field(default_factory=lambda: uuid.uuid4().hex[:12])

    def __post_init__(self) -> None:
        if not isinstance(self.topic_id, str) or not self.topic_id:
            raise InputError(f"LearningRequest.topic_id must be a non-empty string, got {self.topic_id!r}")
        qs = tuple(self.queries)
        if not qs or not all(isinstance(q, str) and q.strip() for q in qs):
            raise InputError("LearningRequest.queries must be one or more non-empty strings")
        object.__setattr__(self, "queries", qs)

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["queries"] = list(self.queries)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "LearningRequest":
        return cls(topic_id=d["topic_id"], queries=tuple(d["queries"]),
                   created=float(d.get("created", time.time())),
                   request_id=str(d.get("request_id") or uuid.uuid4().hex[:12]))


@dataclass
class LearnOutcome:
    """What a learner did with a request: the library entry it added (or ``None``), which tier
    produced it (1 sources/peers, 2 teacher distillation, 3 extraction) and a report
    (JSON-able) saying why no tier produced a skill when none did."""

    entry: "SkillEntry | None"
    tier: int | None = None
    report: dict[str, Any] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.entry is not None


@runtime_checkable
class Learner(Protocol):
    """Anything that can learn a skill for a request. Returns a :class:`LearnOutcome`, a
    ``SkillEntry`` already added to the node's library, a ``LoRACard`` (the node adds it with
    the request's queries as examples) or ``None`` (nothing learnt; the job counts as failed)."""

    def learn(self, request: LearningRequest) -> "LearnOutcome | SkillEntry | LoRACard | None": ...


@dataclass
class SourceCandidate:
    """A skill some source could provide for a request: who offers it, an opaque handle the
    source understands (a card id, a library key), how well its examples route the request's
    queries (``confidence`` in [0, 1]) and a JSON-able description."""

    source: str
    handle: str
    name: str
    confidence: float
    info: dict[str, Any] = field(default_factory=dict)


@runtime_checkable
class SkillSource(Protocol):
    """Tier 1: a place that may already have the skill (the local library, federation peers)."""

    name: str

    def candidates(self, request: LearningRequest) -> list[SourceCandidate]:
        """Skills that may serve the request, best first."""
        ...

    def acquire(self, candidate: SourceCandidate, library: "SkillLibrary") -> "SkillEntry | None":
        """Fetch, verify and add the candidate to ``library``; ``None`` (with a logged reason)
        when it fails any check."""
        ...
