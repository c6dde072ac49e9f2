"""The server's content-addressed card store: ``<dir>/cards/<id>.lora.arrow`` with its signed
manifest ``<dir>/cards/<id>.manifest.json``, uploads staged in ``<dir>/incoming/``, revoked
ids in ``<dir>/revoked.json``.

Every path is built from a validated id (64 hex), never from anything a peer chose, so no
request can name a file: that is what closes the path-traversal hole of a by-name store.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

from .._atomic import atomic_write_bytes, fsync_dir
from .errors import ManifestError
from .manifest import Manifest, check_card_id

__all__ = ["CardStore"]


class CardStore:
    """Cards and manifests by id. Thread-safe; every write is atomic.

    Args:
        directory: the store's root (created). Manifests that fail to parse on start-up are
            listed in :attr:`problems` and skipped.
    """

    def __init__(self, directory: str | Path) -> None:
        self.directory = Path(directory).resolve()
        self.cards_dir = self.directory / "cards"
        self.incoming_dir = self.directory / "incoming"
        for d in (self.cards_dir, self.incoming_dir):
            d.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self.problems: list[str] = []
        self._manifests: dict[str, Manifest] = {}
        self._revoked: set[str] = self._read_revoked()
        for p in sorted(self.cards_dir.glob("*.manifest.json")):
            try:
                m = Manifest.from_json(p.read_bytes())
                if p.name != f"{m.id}.manifest.json" or not self.card_path(m.id).exists():
                    raise ManifestError("file name or card file does not match the manifest id")
                self._manifests[m.id] = m
            except (OSError, ManifestError) as exc:
                self.problems.append(f"{p.name}: skipped: {exc}")
        for p in self.incoming_dir.iterdir():  # uploads interrupted by a crash
            p.unlink(missing_ok=True)

    # ------------------------------------------------------------------ paths
    def card_path(self, cid: str) -> Path:
        return self.cards_dir / f"{check_card_id(cid)}.lora.arrow"

    def manifest_path(self, cid: str) -> Path:
        return self.cards_dir / f"{check_card_id(cid)}.manifest.json"

    def new_incoming(self) -> Path:
        """A fresh staging file for an upload (name chosen here, never by the peer)."""
        fd, tmp = tempfile.mkstemp(prefix="upload-", suffix=".part", dir=self.incoming_dir)
        os.close(fd)
        return Path(tmp)

    # ------------------------------------------------------------------ queries
    def __len__(self) -> int:
        return len(self._manifests)

    def __contains__(self, cid: object) -> bool:
        return cid in self._manifests

    def get(self, cid: str) -> Manifest | None:
        return self._manifests.get(check_card_id(cid))

    def manifests(self) -> list[Manifest]:
        with self._lock:
            return sorted(self._manifests.values(), key=lambda m: (m.name, m.version, m.id))

    def is_revoked(self, cid: str) -> bool:
        return cid in self._revoked

    def nbytes(self) -> int:
        return sum(m.size for m in self._manifests.values())

    # ------------------------------------------------------------------ updates
    def commit(self, staged: Path, manifest: Manifest) -> bool:
        """Move a verified staged file into place under its id (the caller checked that its
        SHA-256 is ``manifest.id``) and write the manifest. Returns False when the card was
        already stored (the staged file is then removed)."""
        with self._lock:
            final = self.card_path(manifest.id)
            if manifest.id in self._manifests:
                staged.unlink(missing_ok=True)
                return False
            with open(staged, "rb") as fh:
                os.fsync(fh.fileno())
            os.replace(staged, final)
            fsync_dir(self.cards_dir)
            atomic_write_bytes(self.manifest_path(manifest.id), manifest.to_json())
            self._manifests[manifest.id] = manifest
            return True

    def add_file(self, path: str | Path, manifest: Manifest) -> bool:
        """Copy a local card file (bytes verbatim) into the store under ``manifest.id``."""
        staged = self.new_incoming()
        try:
            shutil.copyfile(path, staged)
            return self.commit(staged, manifest)
        finally:
            staged.unlink(missing_ok=True)

    def remove(self, cid: str, *, revoke: bool = False) -> bool:
        with self._lock:
            present = self._manifests.pop(check_card_id(cid), None) is not None
            self.card_path(cid).unlink(missing_ok=True)
            self.manifest_path(cid).unlink(missing_ok=True)
            if revoke and cid not in self._revoked:
                self._revoked.add(cid)
                atomic_write_bytes(self.directory / "revoked.json",
                                   json.dumps(sorted(self._revoked)).encode())
            return present

    def _read_revoked(self) -> set[str]:
        p = self.directory / "revoked.json"
        if not p.exists():
            return set()
        try:
            ids = json.loads(p.read_text())
            return {check_card_id(i) for i in ids}
        except (ValueError, TypeError, ManifestError) as exc:
            self.problems.append(f"revoked.json: unreadable ({exc}); no card is treated as revoked")
            return set()
