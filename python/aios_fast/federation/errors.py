"""Exceptions of the federation (each also a matching built-in, under the package root)."""

from __future__ import annotations

from ..errors import AiosError

__all__ = ["FederationError", "ManifestError", "TrustError", "QuarantineError"]


class FederationError(AiosError, RuntimeError):
    """A peer is unreachable, refused a call, or answered something that is not a valid reply."""


class ManifestError(AiosError, ValueError):
    """A manifest is malformed, over a limit, or does not describe the card it comes with."""


class TrustError(AiosError, PermissionError):
    """A signature does not verify, or its key is unknown, revoked or not trusted."""


class QuarantineError(AiosError, RuntimeError):
    """A fetched card failed a check in quarantine (``.check`` names which) and was deleted."""

    def __init__(self, message: str, check: str = "") -> None:
        super().__init__(message)
        self.check = check
