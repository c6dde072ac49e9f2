"""``FederationSource``: Tier 1 from peers, through the ``SkillSource`` protocol of
``evolve/jobs.py``.

For a learning request, the peers' manifests are routed exactly like local skills — by their
example texts (a temporary :class:`LoRARouter` over the manifests, never by file names) — and
a manifest is a candidate when the request's queries route to it with high confidence.
Acquiring a candidate fetches it, runs quarantine (hash, trusted signature, format, base model,
local gate) and adds the verified bytes, verbatim, to the library with origin ``"peer"``.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from ..errors import AiosError
from ..evolve.jobs import LearningRequest, SourceCandidate

if TYPE_CHECKING:  # pragma: no cover
    from ..route.library import SkillEntry, SkillLibrary
    from .manager import FederationManager, RemoteSkill

__all__ = ["FederationSource"]

log = logging.getLogger(__name__)


class FederationSource:
    """Peers' skills as a Tier 1 source.

    Args:
        manager: a started :class:`FederationManager`.
        encoder: the node's sentence encoder (routes the manifests' examples).
        min_confidence: a manifest is a candidate when the mean, over the request's queries,
            of the router's confidence for it (0 for queries routed elsewhere) reaches this.
        max_candidates: at most this many candidates, best first.

    :attr:`failures` records why acquired candidates were refused (quarantine check, reason).
    """

    name = "federation"

    def __init__(self, manager: "FederationManager", encoder: Any, *, min_confidence: float = 0.5,
                 max_candidates: int = 3) -> None:
        self.manager = manager
        self.encoder = encoder
        self.min_confidence = float(min_confidence)
        self.max_candidates = int(max_candidates)
        self.failures: list[dict[str, Any]] = []
        self._seen: dict[str, "RemoteSkill"] = {}

    def candidates(self, request: LearningRequest) -> list[SourceCandidate]:
        """Peer manifests whose examples route the request's queries with high confidence."""
        from ..route.router import LoRARouter

        remotes = self.manager.scan_remote_skills()
        if not remotes:
            return []
        router = LoRARouter(self.encoder, threshold=self.min_confidence)
        by_id: dict[str, "RemoteSkill"] = {}
        for r in remotes:
            m = r.manifest
            if not m.examples and not m.description.strip():
                continue  # nothing to route by; a name is never enough
            try:
                router.add_skill(m.id, description=m.description or None, examples=m.examples)
            except AiosError as exc:
                self.manager._problem(f"{r.peer.location}: {m.key} not routable: {exc}")
                continue
            by_id[m.id] = r
        if not by_id:
            return []
        routes = router.route_many(list(request.queries))
        totals = {cid: 0.0 for cid in by_id}
        for res in routes:
            if res.top in totals:
                totals[res.top] += float(res.confidence)
        out = []
        for cid, total in totals.items():
            conf = total / len(routes)
            if conf < self.min_confidence:
                continue
            r = by_id[cid]
            self._seen[cid] = r
            out.append(SourceCandidate(
                source=self.name, handle=cid, name=r.manifest.name, confidence=conf,
                info={"peer": r.peer.location, "publisher": r.manifest.publisher,
                      "version": r.manifest.version, "size": r.manifest.size,
                      "validation": r.manifest.validation}))
        out.sort(key=lambda c: -c.confidence)
        return out[: self.max_candidates]

    def acquire(self, candidate: SourceCandidate, library: "SkillLibrary") -> "SkillEntry | None":
        """Fetch, check and add the candidate; ``None`` (reason in :attr:`failures` and the log)
        when any check fails or the card ends up not passed (not routable)."""
        remote = self._seen.get(candidate.handle)
        try:
            entry = self.manager.fetch_skill(remote if remote is not None else candidate.handle,
                                             library=library)
        except AiosError as exc:
            check = getattr(exc, "check", "") or type(exc).__name__
            self.failures.append({"id": candidate.handle, "name": candidate.name, "check": check,
                                  "reason": str(exc)})
            log.warning("federation: %s (%s) refused: %s", candidate.name, candidate.handle[:12], exc)
            return None
        if not getattr(entry, "passed", False):
            reason = "admitted but has no passing validation report (neither local nor the publisher's)"
            self.failures.append({"id": candidate.handle, "name": candidate.name, "check": "gate",
                                  "reason": reason})
            log.warning("federation: %s: %s", candidate.name, reason)
            return None
        return entry
