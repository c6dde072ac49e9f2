"""The receiving side's quarantine: a fetched card is checked before it may enter the library.

Checks, in order (the first failure deletes the card and is reported with its reason):

1. ``size``: the bytes received are as many as the manifest says;
2. ``hash``: their SHA-256 equals the manifest's id (content addressing);
3. ``signature``: the manifest is signed by a publisher key this node's keyring trusts;
4. ``format``: the file loads under the card reader's hostile-input checks (every declared
   size, offset, shape, dtype and limit checked before anything is viewed), holds no NaN/inf,
   and says what the manifest says. The card's own v2 checksum is not recomputed: step 2 has
   just proved every byte of the file equal to the bytes its publisher signed, which covers
   everything that checksum covers (``Manifest.for_card`` refuses to sign a card whose
   checksum does not match);
5. ``base_model``: the card was made for the node's base model (fingerprints equal);
6. ``gate``: where the node has evaluation data (an ``evaluator``), the card passes it.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import CardFormatError
from .errors import ManifestError, QuarantineError, TrustError
from .manifest import Manifest

if TYPE_CHECKING:  # pragma: no cover
    from ..cards import LoRACard
    from .client import Fetched
    from .trust import Keyring

__all__ = ["Quarantine", "Admitted", "Evaluator"]

#: ``evaluator(card, manifest)`` -> a ValidationReport (or its dict) when the node has data to
#: judge the card, ``None`` when it has none for this topic
Evaluator = Callable[["LoRACard", Manifest], Any]


@dataclass
class Admitted:
    """A card that passed quarantine: its file (still in quarantine), the loaded card, and
    the local gate's report (``None`` when the node had no data to judge it)."""

    path: Path
    card: "LoRACard"
    manifest: Manifest
    local_validation: dict[str, Any] | None = None
    checks: list[str] = field(default_factory=list)


class Quarantine:
    """Holds fetched cards in ``directory`` until :meth:`check` admits or rejects them.

    Args:
        directory: the quarantine directory (created).
        keyring: the node's :class:`Keyring` (who is trusted).
        base_fingerprint: the node's model fingerprint; ``None`` skips that check (a node
            without a model, e.g. a relay).
        evaluator: optional local gate (see :data:`Evaluator`).

    :attr:`reports` lists every decision: ``{"id", "name", "ok", "check", "reason", "time"}``.
    """

    def __init__(self, directory: str | Path, keyring: "Keyring", base_fingerprint: str | None = None,
                 evaluator: Evaluator | None = None) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        self.keyring = keyring
        self.base_fingerprint = base_fingerprint
        self.evaluator = evaluator
        self.reports: list[dict[str, Any]] = []

    def check(self, fetched: "Fetched") -> Admitted:
        """Run every check on a fetched card. Returns :class:`Admitted`, or deletes the file and
        raises :class:`QuarantineError` whose ``check`` names the failed step."""
        from ..cards import LoRAFormat

        m, path = fetched.manifest, Path(fetched.path)
        done: list[str] = []
        try:
            if fetched.size != m.size:
                raise QuarantineError(f"received {fetched.size} bytes, the manifest says {m.size}", "size")
            done.append("size")
            if fetched.sha256 != m.id:
                raise QuarantineError(f"content hashes to {fetched.sha256}, not its id {m.id} "
                                      f"(altered in transit or on the peer)", "hash")
            done.append("hash")
            try:
                self.keyring.verify_manifest(m)
            except TrustError as exc:
                raise QuarantineError(str(exc), "signature") from None
            done.append("signature")
            try:
                card = LoRAFormat.load(path, verify=False)  # structure and bounds: always checked
                _check_values(card)
                m.check_card(_describe(card, path))
            except (CardFormatError, ManifestError) as exc:
                raise QuarantineError(str(exc).replace(str(path), f"card {m.id[:12]}"), "format") from None
            done.append("format")
            if self.base_fingerprint is not None and card.base_fingerprint != self.base_fingerprint:
                raise QuarantineError(f"card is for base model {card.base_fingerprint}, this node runs "
                                      f"{self.base_fingerprint}", "base_model")
            done.append("base_model")
            local = None
            if self.evaluator is not None:
                try:
                    report = self.evaluator(card, m)
                except Exception as exc:  # a card that breaks the evaluation is refused
                    raise QuarantineError(f"local gate could not evaluate the card: "
                                          f"{type(exc).__name__}: {exc}", "gate") from None
                if report is not None:
                    local = report.to_dict() if hasattr(report, "to_dict") else dict(report)
                    if not local.get("passed", False):
                        raise QuarantineError(f"failed the local gate: {local.get('reasons') or local}", "gate")
                    done.append("gate")
        except QuarantineError as exc:
            path.unlink(missing_ok=True)
            self._report(m, False, exc.check, str(exc))
            raise QuarantineError(f"card {m.name!r} ({m.id[:12]}) rejected at check "
                                  f"'{exc.check}': {exc}", exc.check) from None
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        self._report(m, True, "", "passed " + ", ".join(done))
        return Admitted(path, card, m, local, done)

    def discard(self, admitted: Admitted) -> None:
        """Delete a card's quarantine file (after it was copied into the library)."""
        Path(admitted.path).unlink(missing_ok=True)

    def _report(self, m: Manifest, ok: bool, check: str, reason: str) -> None:
        self.reports.append({"id": m.id, "name": m.name, "ok": ok, "check": check,
                             "reason": reason, "time": time.time()})
        del self.reports[:-1000]  # bounded


def _describe(card: "LoRACard", path: Path) -> dict[str, Any]:
    """What ``LoRAFormat.inspect`` reports about a card, from the already-loaded card (a second
    parse would hash the file again)."""
    return {"name": card.name, "naming": card.naming,
            "ranks": sorted({card.module_rank(k) for k in card.modules}),
            "dtypes": sorted(card.dtypes()), "base_fingerprint": card.base_fingerprint,
            "file_bytes": path.stat().st_size}


def _check_values(card: "LoRACard") -> None:
    """The value scan ``LoRAFormat.load(verify=True)`` runs: no NaN or infinity anywhere."""
    from ..cards.card import _all_finite

    for which, tensors in (("A", card.weights_A), ("B", card.weights_B)):
        for key, t in tensors.items():
            if not _all_finite(t):
                raise CardFormatError(f"module {key!r}, {which}: contains NaN or infinite values")
