"""The node's side of the federation: what ``SkillNode.start_federation`` and
``SkillNode.sync_remote_skills`` delegate to.

``start_federation`` gives the node a :class:`FederationManager` bound to its library and its
model's fingerprint, publishes every skill the node learns afterwards (``publish_hooks``) and
registers a :class:`FederationSource` with the node's learner when it takes Tier 1 sources.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .manager import FederationManager

__all__ = ["start_federation", "sync_remote_skills"]


def start_federation(node: Any, port: int = 0, node_name: str | None = None, *,
                     storage_dir: str | Path | None = None, publish_learnt: bool = True,
                     min_confidence: float = 0.5, **kw: Any) -> FederationManager:
    """Start federating ``node`` (a ``SkillNode``) and return its manager.

    Args:
        node: needs ``.encoder``, ``.library``; optional ``.publish_hooks``, ``.learner``.
        port: Flight port (0: a free one). node_name: default ``"node"``.
        storage_dir: default ``<library dir>/federation``.
        publish_learnt: publish each skill the node learns from now on.
        min_confidence: Tier 1 candidates' routing confidence.
        kw: further :class:`FederationManager` arguments (token, peers, discovery, keyring,
            evaluator, tls, host, ...).
    """
    from ..cards import fingerprint_model

    existing = getattr(node, "federation", None)
    if existing is not None:
        return existing
    library = node.library
    storage = Path(storage_dir) if storage_dir is not None else Path(library.directory) / "federation"
    fp = getattr(node, "base_fingerprint", None)
    kw.setdefault("base_fingerprint", fp if isinstance(fp, str) else fingerprint_model(_base_state(node)))
    manager = FederationManager(node_name or "node", port, storage, library=library, **kw).start()
    node.federation = manager
    if publish_learnt and hasattr(node, "publish_hooks"):
        node.publish_hooks.append(lambda entry: manager.publish(entry))
    source = manager.source(node.encoder, min_confidence=min_confidence)
    node.federation_source = source
    learner = getattr(node, "learner", None)
    sources = getattr(learner, "sources", None)
    if isinstance(sources, list) and not any(getattr(s, "name", "") == source.name for s in sources):
        sources.append(source)
    return manager


def sync_remote_skills(node: Any) -> list[Any]:
    """Fetch every trusted peer skill for the node's model that its library lacks; each goes
    through quarantine. Returns the library entries added (refusals are in
    ``node.federation.reports``). The router is refreshed when anything was added."""
    manager: FederationManager | None = getattr(node, "federation", None)
    if manager is None:
        raise RuntimeError("call node.start_federation(...) before sync_remote_skills()")
    added = []
    for remote in manager.scan_remote_skills():
        if node.library.find_by_hash(remote.manifest.id) is not None:
            continue
        try:
            added.append(manager.fetch_skill(remote, library=node.library))
        except Exception as exc:  # noqa: BLE001 - one bad peer card must not stop the sync
            manager._problem(f"sync: {remote.manifest.key} from {remote.peer.location}: {exc}")
    router = getattr(node, "router", None)
    if added and router is not None and hasattr(router, "refresh"):
        router.refresh()
    return added


def _base_state(node: Any) -> dict:
    """The node model's base weights (adapter factors left out, wrapper names mapped back)."""
    mgr = getattr(node, "manager", None)
    if mgr is not None and hasattr(mgr, "base_state_dict"):
        return mgr.base_state_dict()
    return node.encoder.model.state_dict()
