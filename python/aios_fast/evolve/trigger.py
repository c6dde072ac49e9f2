"""``CognitiveTrigger``: notices what the node cannot serve and asks, sparingly, to learn it.

A query is *unsure* when the router's calibrated confidence is below ``threshold`` or the
margin to the runner-up skill is below ``ambiguity_margin``. Unsure queries are grouped into
topics by online cosine clustering (leader clustering: a query joins the topic whose centroid
is most similar if that similarity reaches ``topic_similarity``, else it starts a new topic;
Hartigan 1975, "Clustering Algorithms", ch. 3). Near-identical queries (cosine at or above
``duplicate_similarity`` to a member) add no support. A topic with ``min_support`` distinct
queries yields one :class:`LearningRequest` with its most central queries.

Guards against a runaway loop:

* one job per topic: a topic whose request is pending or running does not fire again;
* exponential backoff with jitter after a failed job (``backoff · 2^(failures-1)``, capped at
  ``backoff_cap``, times a random factor in ``[1 - jitter, 1 + jitter]``), reset on success;
* a budget of ``max_requests_per_hour`` over a sliding hour.

Topics (ids, centroids, members, failures, backoff deadlines) and the request times are
persisted atomically in ``state_dir/trigger_state.json``, so a restart keeps them; every
decision is appended to ``state_dir/decisions.jsonl`` (what ``aios-fast skills log`` shows).
"""

from __future__ import annotations

import hashlib
import json
import math
import random
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

from .._atomic import atomic_write_bytes
from ..errors import InputError
from .jobs import LearningRequest

__all__ = ["CognitiveTrigger", "Decision", "read_decision_log"]

_MAX_MEMBERS = 64            # per topic: enough for representatives, bounded state
_MAX_TOPICS = 512            # oldest idle topics are forgotten beyond this
_LOG_KEEP = 200              # decisions kept in memory for status()


@dataclass(frozen=True)
class Decision:
    """What the trigger did with one query.

    ``reason`` is one of: ``confident`` (served, nothing to learn), ``duplicate`` (a near copy
    of a query the topic already has), ``collecting`` (support below ``min_support``),
    ``job_pending`` (the topic's request is queued or running), ``backoff`` (the topic's last
    job failed recently), ``budget`` (hourly request budget spent), ``fired`` (``request`` is
    set)."""

    fired: bool
    reason: str
    topic_id: str | None
    request: LearningRequest | None
    query: str
    confidence: float
    margin: float
    skill: str | None
    support: int = 0
    time: float = field(default_factory=time.time)
    retry_at: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"time": self.time, "query": self.query, "confidence": self.confidence,
                "margin": self.margin, "skill": self.skill, "topic_id": self.topic_id,
                "fired": self.fired, "reason": self.reason, "support": self.support,
                "retry_at": self.retry_at,
                "request_id": self.request.request_id if self.request else None}


@dataclass
class _Topic:
    id: str
    centroid: np.ndarray                       # unit vector
    members: list[tuple[str, np.ndarray]]      # distinct queries and their unit embeddings
    created: float
    updated: float
    state: str = "collecting"                  # collecting | pending | failed
    failures: int = 0
    retry_at: float = 0.0
    requests: int = 0

    def to_dict(self) -> dict[str, Any]:
        return {"id": self.id, "centroid": self.centroid.astype(float).round(6).tolist(),
                "members": [[q, e.astype(float).round(6).tolist()] for q, e in self.members],
                "created": self.created, "updated": self.updated, "state": self.state,
                "failures": self.failures, "retry_at": self.retry_at, "requests": self.requests}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "_Topic":
        members = [(str(q), np.asarray(e, np.float32)) for q, e in d["members"]]
        return cls(id=str(d["id"]), centroid=np.asarray(d["centroid"], np.float32), members=members,
                   created=float(d["created"]), updated=float(d["updated"]),
                   state=str(d.get("state", "collecting")), failures=int(d.get("failures", 0)),
                   retry_at=float(d.get("retry_at", 0.0)), requests=int(d.get("requests", 0)))


class CognitiveTrigger:
    """Decides when unsure queries add up to a topic worth learning (see the module docstring).

    Args:
        threshold: confidence below which a query is unsure (match the router's threshold).
        ambiguity_margin: score margin to the runner-up below which a query is unsure.
        min_support: distinct unsure queries a topic needs before it fires.
        backoff: seconds to wait after a topic's first failed job (doubles per failure).
        backoff_cap: the longest wait, seconds.
        jitter: relative random spread of each wait, in [0, 1).
        max_requests_per_hour: requests allowed in any sliding hour.
        topic_similarity: cosine to a topic's centroid needed to join it.
        duplicate_similarity: cosine to a member at which a query is a near duplicate.
        max_queries: representative queries per request (most central first).
        state_dir: where state and the decision log are kept (None: memory only). State is
            written at once when a request fires or a job ends, otherwise at most every
            ``save_interval`` (5) seconds; :meth:`flush` writes it now.
        encoder: used to embed queries when ``observe`` gets no embedding.
        clock: time source (seconds), for tests that need to move time.
        seed: seed of the jitter's random generator.
    """

    def __init__(self, threshold: float = 0.5, ambiguity_margin: float = 0.02, min_support: int = 5,
                 backoff: float = 300.0, *, backoff_cap: float = 6 * 3600.0, jitter: float = 0.2,
                 max_requests_per_hour: int = 10, topic_similarity: float = 0.4,
                 duplicate_similarity: float = 0.95, max_queries: int = 12,
                 state_dir: str | Path | None = None, encoder: Any = None,
                 clock: Callable[[], float] = time.time, seed: int | None = None) -> None:
        def unit(name, v, lo=0.0, hi=1.0):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not lo <= v <= hi:
                raise InputError(f"CognitiveTrigger {name} must be a number in [{lo}, {hi}], got {v!r}")
            return float(v)

        def count(name, v):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise InputError(f"CognitiveTrigger {name} must be an int >= 1, got {v!r}")
            return v

        self.threshold = unit("threshold", threshold)
        self.ambiguity_margin = unit("ambiguity_margin", ambiguity_margin)
        self.min_support = count("min_support", min_support)
        self.backoff = unit("backoff", backoff, 0.0, math.inf)
        self.backoff_cap = unit("backoff_cap", backoff_cap, self.backoff, math.inf)
        self.jitter = unit("jitter", jitter, 0.0, 0.999)
        self.max_requests_per_hour = count("max_requests_per_hour", max_requests_per_hour)
        self.topic_similarity = unit("topic_similarity", topic_similarity, -1.0, 1.0)
        self.duplicate_similarity = unit("duplicate_similarity", duplicate_similarity, -1.0, 1.0)
        self.max_queries = count("max_queries", max_queries)
        self.encoder = encoder
        self.clock = clock
        self._rng = random.Random(seed)
        self._lock = threading.RLock()
        self._topics: dict[str, _Topic] = {}
        self._fires: deque[float] = deque()
        self._recent: deque[Decision] = deque(maxlen=_LOG_KEEP)
        self.state_dir = Path(state_dir) if state_dir is not None else None
        self.save_interval = 5.0
        self._saved_at = -float("inf")
        self._dirty = False
        self.problems: list[str] = []
        if self.state_dir is not None:
            self.state_dir.mkdir(parents=True, exist_ok=True)
            self._load()

    # ------------------------------------------------------------------ public
    @property
    def state_path(self) -> Path | None:
        return None if self.state_dir is None else self.state_dir / "trigger_state.json"

    @property
    def log_path(self) -> Path | None:
        return None if self.state_dir is None else self.state_dir / "decisions.jsonl"

    def is_unsure(self, route_result: Any) -> bool:
        """True when the route's confidence or margin is too low to trust it, or the router
        itself chose no skill (its own threshold)."""
        return bool(route_result.confidence < self.threshold or route_result.skill is None
                    or route_result.margin < self.ambiguity_margin)

    def observe(self, query: str, route_result: Any, embedding: Any = None) -> Decision:
        """Record one routed query and decide whether to ask for a new skill.

        Args:
            query: the query text.
            route_result: its :class:`RouteResult` (confidence, margin, skill).
            embedding: its L2-normalised embedding (``(d,)`` or ``(1, d)``); computed with the
                trigger's encoder when omitted (only for unsure queries).
        Returns:
            A :class:`Decision`; ``decision.request`` is the :class:`LearningRequest` to run
            when ``decision.fired``.
        """
        if not isinstance(query, str) or not query.strip():
            raise InputError("observe: query must be a non-empty string")
        conf, margin = float(route_result.confidence), float(route_result.margin)
        skill = getattr(route_result, "skill", None)
        now = self.clock()
        if not self.is_unsure(route_result):
            return self._log(Decision(False, "confident", None, None, query, conf, margin, skill, time=now))
        e = self._embedding(query, embedding)
        with self._lock:
            topic, sim = self._nearest(e)
            if topic is None or sim < self.topic_similarity:
                topic = self._new_topic(query, e, now)
                duplicate = False
            else:
                duplicate = any(float(m @ e) >= self.duplicate_similarity for _, m in topic.members)
                if not duplicate:
                    topic.members.append((query, e))
                    self._recentre(topic)
                    topic = self._merge_neighbours(topic)
                topic.updated = now
            d = self._decide(topic, query, conf, margin, skill, now, duplicate)
            # a fired request is a state change worth a durable write now; collecting support
            # is saved at most every save_interval seconds (an fsync per query would slow serving)
            self._save(force=d.fired)
        return self._log(d)

    def job_succeeded(self, topic_id: str) -> None:
        """The topic's job produced a skill: reset its failures and start it afresh (its queries
        should now route confidently; if they do not, the topic can collect support again)."""
        with self._lock:
            t = self._topic(topic_id)
            t.state, t.failures, t.retry_at = "collecting", 0, 0.0
            t.members = t.members[:1]
            self._save()

    def job_failed(self, topic_id: str, reason: str = "") -> float:
        """The topic's job produced nothing: back off. Returns the time (clock seconds) before
        which the topic will not fire again."""
        with self._lock:
            t = self._topic(topic_id)
            t.failures += 1
            wait = min(self.backoff_cap, self.backoff * 2.0 ** (t.failures - 1))
            wait *= 1.0 + self.jitter * (2.0 * self._rng.random() - 1.0)
            t.state, t.retry_at = "failed", self.clock() + wait
            self._save()
            return t.retry_at

    def release(self, topic_id: str) -> None:
        """Forget that a request is pending for the topic without counting a failure (a job
        that was cancelled or never started)."""
        with self._lock:
            t = self._topics.get(topic_id)
            if t is not None and t.state == "pending":
                t.state = "collecting"
                self._save()

    def topics(self) -> list[dict[str, Any]]:
        """Topics with their support, state, failures and backoff deadline (JSON-able)."""
        with self._lock:
            return [{"topic_id": t.id, "support": len(t.members), "state": t.state,
                     "failures": t.failures, "retry_at": t.retry_at or None, "requests": t.requests,
                     "queries": [q for q, _ in t.members[:5]]} for t in self._topics.values()]

    def recent(self, n: int = 20) -> list[dict[str, Any]]:
        """The last ``n`` decisions of this process, oldest first."""
        return [d.to_dict() for d in list(self._recent)[-n:]]

    def requests_last_hour(self) -> int:
        with self._lock:
            self._prune_fires(self.clock())
            return len(self._fires)

    # ------------------------------------------------------------------ internals
    def _embedding(self, query: str, embedding: Any) -> np.ndarray:
        if embedding is None:
            if self.encoder is None:
                raise InputError("observe: pass the query's embedding, or give the trigger an encoder")
            embedding = self.encoder.encode([query])
        e = np.asarray(embedding.detach().cpu() if hasattr(embedding, "detach") else embedding,
                       dtype=np.float32).reshape(-1)
        n = float(np.linalg.norm(e))
        if not np.isfinite(n) or n == 0.0:
            raise InputError("observe: the embedding must be a finite, non-zero vector")
        return e / n

    def _nearest(self, e: np.ndarray) -> tuple[_Topic | None, float]:
        if not self._topics:
            return None, -1.0
        ts = list(self._topics.values())
        C = np.stack([t.centroid for t in ts])
        if C.shape[1] != e.shape[0]:
            raise InputError(f"observe: embedding width {e.shape[0]} differs from the stored topics' "
                             f"{C.shape[1]} (another encoder); clear {self.state_path}")
        sims = C @ e
        i = int(np.argmax(sims))
        return ts[i], float(sims[i])

    def _new_topic(self, query: str, e: np.ndarray, now: float) -> _Topic:
        # the id is a hash of the founding query: stable for the topic's life and across restarts
        base = "t-" + hashlib.sha256(" ".join(query.lower().split()).encode()).hexdigest()[:10]
        tid, i = base, 1
        while tid in self._topics:
            i += 1
            tid = f"{base}-{i}"
        t = _Topic(tid, e.copy(), [(query, e)], now, now)
        self._topics[tid] = t
        if len(self._topics) > _MAX_TOPICS:
            idle = sorted((x for x in self._topics.values() if x.state == "collecting" and x is not t),
                          key=lambda x: x.updated)
            for x in idle[:len(self._topics) - _MAX_TOPICS]:
                del self._topics[x.id]
        return t

    @staticmethod
    def _recentre(t: _Topic) -> None:
        del t.members[:-_MAX_MEMBERS]
        c = np.sum([m for _, m in t.members], axis=0)
        t.centroid = (c / max(float(np.linalg.norm(c)), 1e-12)).astype(np.float32)

    def _merge_neighbours(self, t: _Topic) -> _Topic:
        """Leader clustering splits a topic when its first queries happen to be far apart;
        once a centroid moves close enough to another topic's, the two are one topic. A topic
        with a job (pending or backing off) absorbs a collecting one and keeps its state;
        otherwise the one with more support (then the older) keeps its id."""
        for other in [x for x in self._topics.values() if x is not t]:
            if t.state != "collecting" and other.state != "collecting":
                continue
            if float(other.centroid @ t.centroid) < self.topic_similarity:
                continue
            keep, gone = sorted((t, other), key=lambda x: (x.state == "collecting", -len(x.members),
                                                           x.created))
            keep.members += gone.members
            keep.created = min(keep.created, gone.created)
            self._recentre(keep)
            del self._topics[gone.id]
            t = keep
        return t

    def _prune_fires(self, now: float) -> None:
        while self._fires and self._fires[0] <= now - 3600.0:
            self._fires.popleft()

    def _decide(self, t: _Topic, query, conf, margin, skill, now, duplicate) -> Decision:
        support = len(t.members)

        def d(reason, fired=False, request=None, retry_at=None):
            return Decision(fired, reason, t.id, request, query, conf, margin, skill, support, now, retry_at)

        if t.state == "pending":
            return d("job_pending")
        if t.state == "failed":
            if now < t.retry_at:
                return d("backoff", retry_at=t.retry_at)
            t.state = "collecting"
        if support < self.min_support:
            # a near copy adds no support; with enough support it may still fire (below)
            return d("duplicate" if duplicate else "collecting")
        self._prune_fires(now)
        if len(self._fires) >= self.max_requests_per_hour:
            return d("budget", retry_at=self._fires[0] + 3600.0)
        # most central members first: they describe the topic best
        ranked = sorted(t.members, key=lambda m: -float(m[1] @ t.centroid))
        req = LearningRequest(topic_id=t.id, queries=tuple(q for q, _ in ranked[:self.max_queries]),
                              created=now)
        t.state = "pending"
        t.requests += 1
        self._fires.append(now)
        return d("fired", True, req)

    def _topic(self, topic_id: str) -> _Topic:
        try:
            return self._topics[topic_id]
        except KeyError:
            raise InputError(f"unknown topic {topic_id!r}; known: {sorted(self._topics)[:10]}") from None

    def _log(self, d: Decision) -> Decision:
        self._recent.append(d)
        if self.log_path is not None:
            line = json.dumps(d.to_dict(), ensure_ascii=False) + "\n"
            with self._lock, open(self.log_path, "a", encoding="utf-8") as f:
                f.write(line)   # one write per line: concurrent appenders do not interleave lines
        return d

    def flush(self) -> None:
        """Write the state now (``observe`` batches its writes; state changes of jobs and fired
        requests are written at once)."""
        with self._lock:
            self._save(force=True)

    def _save(self, force: bool = True) -> None:
        if self.state_path is None:
            return
        now = time.monotonic()
        if not force and now - self._saved_at < self.save_interval:
            self._dirty = True
            return
        self._saved_at, self._dirty = now, False
        state = {"version": 1, "topics": [t.to_dict() for t in self._topics.values()],
                 "fires": list(self._fires)}
        atomic_write_bytes(self.state_path, json.dumps(state).encode())

    def _load(self) -> None:
        p = self.state_path
        if p is None or not p.exists():
            return
        try:
            state = json.loads(p.read_text(encoding="utf-8"))
            topics = [_Topic.from_dict(t) for t in state.get("topics", [])]
            fires = [float(x) for x in state.get("fires", [])]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            self.problems.append(f"trigger state {p} is unreadable ({exc}); starting afresh")
            return
        for t in topics:
            if t.state == "pending":
                # the job queue lives in memory: a request pending at shutdown is gone now
                t.state = "collecting"
            self._topics[t.id] = t
        self._fires = deque(sorted(fires))


def read_decision_log(path: str | Path, last: int | None = None) -> list[dict[str, Any]]:
    """Decisions from a ``decisions.jsonl`` file, oldest first (the last ``last`` of them);
    malformed lines (a crash mid-write) are skipped."""
    p = Path(path)
    if not p.exists():
        return []
    out = []
    with open(p, encoding="utf-8") as f:
        for line in f:
            try:
                d = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(d, dict):
                out.append(d)
    return out[-last:] if last else out

