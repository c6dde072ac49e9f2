"""Federation (Tier 1): content-addressed skill cards shared between nodes over Arrow Flight,
signed manifests, explicit trust, quarantine before a peer's card enters the library."""

from __future__ import annotations

from .._lazy import lazy_exports

_LAZY = {
    "FederationManager": ".manager",
    "FederationServer": ".server",
    "FederationClient": ".client",
    "FederationSource": ".source",
    "Manifest": ".manifest",
    "Keyring": ".trust",
    "SigningKey": ".trust",
    "Quarantine": ".quarantine",
    "TLSConfig": ".tls",
    "ServerLimits": ".server",
    "FederationError": ".errors",
    "ManifestError": ".errors",
    "TrustError": ".errors",
    "QuarantineError": ".errors",
    "start_federation": ".node",
    "sync_remote_skills": ".node",
}

__all__ = list(_LAZY)

__getattr__, __dir__ = lazy_exports(__name__, _LAZY)
