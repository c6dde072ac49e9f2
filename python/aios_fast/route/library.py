"""``SkillLibrary``: a node's store of skills — a directory of cards plus one atomic index.

Layout of a library directory::

    index.parquet                 one row per skill version (replaced atomically: readers in
                                  other processes see the old index or the new one, never half)
    cards/<name>@v<N>.lora.arrow  the card bytes (for a card added from a file: copied verbatim,
                                  so the entry's ``content_hash`` is the file's SHA-256, the
                                  federation's card id)
    cards/<name>@v<N>.json        the entry as JSON (a sidecar: the index can be rebuilt from
                                  these when it is missing or corrupt)
    embeddings/<encoder id>/*.arrow   example-text embeddings, one append-only shard per write,
                                  keyed by the encoder's fingerprint (another encoder, another
                                  folder: embeddings are recomputed, never mixed)
    calibration.json              the router's fitted confidence map (``route.calibrate``)

Writers take an exclusive ``flock`` on ``.lock`` and re-read the index before changing it, so
two processes adding skills do not lose each other's rows. A corrupt index, sidecar or card is
reported in :attr:`SkillLibrary.problems` and skipped; it never stops the node.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import threading
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Mapping, Sequence

import numpy as np

from .._atomic import _UMASK, atomic_write, atomic_write_bytes
from .._hashing import file_sha256
from ..errors import CardFormatError, InputError

if TYPE_CHECKING:  # pragma: no cover
    from ..cards import LoRACard

__all__ = ["SkillEntry", "SkillLibrary", "encoder_fingerprint", "ORIGINS", "valid_skill_name"]

#: where a skill came from
ORIGINS = ("trained", "extracted", "peer")

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,127}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_MAX_EXAMPLES = 10_000          # per skill; a peer manifest with more is hostile or broken
_MAX_EXAMPLE_CHARS = 4_000      # MiniLM reads 256 tokens; longer texts only cost memory
_MAX_CARD_BYTES = 1 << 32       # 4 GiB: far above any LoRA of a local model
_INDEX = "index.parquet"
_SHARDS_BEFORE_COMPACT = 32


def valid_skill_name(name: Any) -> str:
    """Return ``name`` if it can name a skill (and a file): 1-128 characters of letters, digits,
    ``_ . -``, starting with a letter or digit. Else raise :class:`InputError`."""
    if not isinstance(name, str) or not _NAME_RE.match(name) or name in (".", ".."):
        raise InputError(
            f"skill name {name!r} is not allowed: use 1-128 characters of letters, digits, '_', "
            f"'.', '-', starting with a letter or digit")
    return name


@dataclass(frozen=True)
class SkillEntry:
    """One version of one skill in a :class:`SkillLibrary`.

    ``passed`` is the gate's verdict: ``validation["passed"]`` when a validation report exists;
    without one, ``True`` for the node's own cards (origin ``trained``/``extracted``: the caller
    vouches for them) and ``False`` for ``peer`` cards (a peer's card is never trusted on its
    word). Only passed versions are resolved by :meth:`SkillLibrary.get` and routed.
    """

    name: str
    version: int
    description: str
    examples: tuple[str, ...]
    origin: str
    content_hash: str
    base_fingerprint: str | None
    validation: dict | None
    passed: bool
    path: Path
    created: float
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def key(self) -> str:
        """``"<name>@v<version>"``: unique in a library."""
        return f"{self.name}@v{self.version}"

    def to_dict(self) -> dict[str, Any]:
        """JSON-able form (path as a string, examples as a list)."""
        d = asdict(self)
        d["path"] = str(self.path)
        d["examples"] = list(self.examples)
        d["key"] = self.key
        return d


def encoder_fingerprint(encoder: Any) -> str:
    """A short identity of a sentence encoder's embedding function: the base weights'
    ``fingerprint_model`` (LoRA wrappers mapped back to the plain names, adapters left out) plus
    the pooling, normalisation and token limit. Embeddings cached under one fingerprint are
    only reused with an encoder of the same fingerprint. Returns ``"enc1:<24 hex>"``."""
    from ..cards import fingerprint_model

    model = getattr(encoder, "model", None)
    if model is None:
        raise InputError(f"encoder_fingerprint needs an encoder with a .model (a SentenceEncoder), "
                         f"got {type(encoder).__name__}")
    sd = {}
    for k, v in model.state_dict().items():
        if ".lora_" in k or k.startswith("lora_"):
            continue  # adapter factors are not part of the base model
        sd[k.replace(".base_layer.", ".")] = v
    pooling = getattr(encoder, "pooling", None)
    desc = json.dumps({
        "model": fingerprint_model(sd),
        "pooling": list(getattr(pooling, "modes", ()) or ()),
        "normalize": bool(getattr(pooling, "normalize", False)),
        "max_length": getattr(encoder, "max_length", None),
        "lower": bool(getattr(encoder, "do_lower_case", False)),
    }, sort_keys=True)
    return "enc1:" + hashlib.sha256(desc.encode()).hexdigest()[:24]


# ---------------------------------------------------------------------- validation helpers
def _clean_examples(examples: Any, where: str) -> tuple[str, ...]:
    if examples is None:
        return ()
    if isinstance(examples, str):
        raise InputError(f"{where}: examples must be a list of strings, not one string")
    try:
        items = list(examples)
    except TypeError:
        raise InputError(f"{where}: examples must be a list of strings, got "
                         f"{type(examples).__name__}") from None
    out: dict[str, None] = {}
    for i, t in enumerate(items):
        if not isinstance(t, str):
            raise InputError(f"{where}: examples[{i}] is a {type(t).__name__}, expected a string")
        t = " ".join(t.split())
        if not t:
            raise InputError(f"{where}: examples[{i}] is empty or blank")
        if len(t) > _MAX_EXAMPLE_CHARS:
            raise InputError(f"{where}: examples[{i}] has {len(t)} characters; at most "
                             f"{_MAX_EXAMPLE_CHARS} are kept per example")
        out.setdefault(t)
    if len(out) > _MAX_EXAMPLES:
        raise InputError(f"{where}: {len(out)} examples; at most {_MAX_EXAMPLES} per skill")
    return tuple(out)


def _clean_metadata(metadata: Any, where: str) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, Mapping):
        raise InputError(f"{where}: metadata must be a dict of str -> str, got {type(metadata).__name__}")
    bad = [(k, v) for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise InputError(f"{where}: metadata must map str -> str; {bad[0]!r} is not")
    return dict(metadata)


def _clean_validation(validation: Any, where: str) -> dict | None:
    if validation is None:
        return None
    if hasattr(validation, "to_dict"):
        validation = validation.to_dict()
    if isinstance(validation, (str, bytes)):
        try:
            validation = json.loads(validation)
        except json.JSONDecodeError as exc:
            raise InputError(f"{where}: validation is not valid JSON: {exc}") from None
    if not isinstance(validation, dict):
        raise InputError(f"{where}: validation must be a ValidationReport, a dict or JSON, "
                         f"got {type(validation).__name__}")
    if "passed" in validation and not isinstance(validation["passed"], bool):
        raise InputError(f"{where}: validation['passed'] must be true or false, "
                         f"got {validation['passed']!r}")
    return validation


def _move_durably(src: Path, dst: Path) -> bool:
    """Rename ``src`` to ``dst`` and fsync it; False (nothing moved) across file systems."""
    try:
        os.replace(src, dst)
    except OSError as exc:
        if exc.errno == errno.EXDEV:
            return False
        raise
    os.chmod(dst, 0o666 & ~_UMASK)  # as a copy written here would be
    fd = os.open(dst, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    return True


# ---------------------------------------------------------------------- the library
class SkillLibrary:
    """A directory of skill cards with one index; see the module docstring for the layout.

    Args:
        directory: created if missing.
        encoder: the :class:`SentenceEncoder` whose embeddings of example texts are cached
            (optional: :meth:`embed_texts` also takes one per call).

    Reading methods never raise for damaged files: what was skipped and why is in
    :attr:`problems`. Writing methods validate their arguments and raise :class:`InputError`
    (or :class:`CardFormatError` for a bad card) before touching anything.
    """

    def __init__(self, directory: str | os.PathLike, encoder: Any = None) -> None:
        self._dir = Path(directory).expanduser().resolve()
        if self._dir.exists() and not self._dir.is_dir():
            raise InputError(f"skill library {self._dir} exists and is not a directory")
        (self._dir / "cards").mkdir(parents=True, exist_ok=True)
        self.encoder = encoder
        self._lock = threading.RLock()
        self._entries: dict[str, SkillEntry] = {}
        self._problems: list[str] = []
        self._index_stat: tuple | None = None
        self._emb_cache: dict[str, dict[str, np.ndarray]] = {}   # encoder fp -> text -> vector
        self._emb_shards: dict[str, set[str]] = {}                # encoder fp -> shard names read
        self._generation = 0
        self._load()

    # ------------------------------------------------------------------ properties
    @property
    def directory(self) -> Path:
        """The library's directory (absolute)."""
        return self._dir

    @property
    def problems(self) -> list[str]:
        """What the last (re)load skipped and why (corrupt index, sidecar or card file)."""
        return list(self._problems)

    @property
    def generation(self) -> int:
        """Incremented on every (re)load and change: readers (the router) compare it to know
        whether to rebuild."""
        return self._generation

    @property
    def index_path(self) -> Path:
        return self._dir / _INDEX

    @property
    def calibration_path(self) -> Path:
        """Where :mod:`aios_fast.route.calibrate` keeps the fitted confidence map."""
        return self._dir / "calibration.json"

    def __len__(self) -> int:
        return len(self.list())

    def __contains__(self, name: object) -> bool:
        return isinstance(name, str) and any(e.name == name for e in self._entries.values())

    def __repr__(self) -> str:
        names = {e.name for e in self._entries.values()}
        return (f"SkillLibrary({str(self._dir)!r}, skills={len(names)}, "
                f"versions={len(self._entries)}, problems={len(self._problems)})")

    # ------------------------------------------------------------------ reading
    def list(self, all_versions: bool = False) -> list[SkillEntry]:
        """Entries sorted by name then version. Default: per name, the resolved version (the
        newest that passed the gate; names with no passed version are left out).
        ``all_versions=True``: every version, passed or not."""
        entries = sorted(self._entries.values(), key=lambda e: (e.name, e.version))
        if all_versions:
            return entries
        best: dict[str, SkillEntry] = {}
        for e in entries:
            if e.passed:
                best[e.name] = e  # ascending versions: the last passed one wins
        return [best[n] for n in sorted(best)]

    def versions(self, name: str) -> list[SkillEntry]:
        """Every version of ``name``, oldest first (empty if unknown)."""
        return sorted((e for e in self._entries.values() if e.name == name), key=lambda e: e.version)

    def names(self) -> list[str]:
        """Names with at least one version (passed or not), sorted."""
        return sorted({e.name for e in self._entries.values()})

    def get(self, name: str, version: int | None = None) -> SkillEntry:
        """The entry for ``name``: ``version`` exactly, or the newest version that passed.

        Raises :class:`InputError` naming the known skills when ``name`` is unknown, and the
        versions when the requested one does not exist or none passed."""
        if isinstance(name, SkillEntry):
            return name
        vs = self.versions(name)
        if not vs:
            known = self.names()
            raise InputError(f"no skill named {name!r} in {self._dir}; known: "
                             f"{known[:10]}{' ...' if len(known) > 10 else ''}")
        if version is not None:
            for e in vs:
                if e.version == version:
                    return e
            raise InputError(f"skill {name!r} has no version {version!r}; versions: "
                             f"{[e.version for e in vs]}")
        passed = [e for e in vs if e.passed]
        if not passed:
            raise InputError(f"skill {name!r} has no version that passed the gate (versions "
                             f"{[e.version for e in vs]}); ask for a version explicitly")
        return passed[-1]

    def find_by_hash(self, content_hash: str) -> SkillEntry | None:
        """The entry whose card file hashes to ``content_hash`` (hex SHA-256), or ``None``."""
        h = str(content_hash).lower().removeprefix("sha256:")
        for e in self._entries.values():
            if e.content_hash == h:
                return e
        return None

    def load_card(self, name_or_entry: str | SkillEntry, version: int | None = None,
                  verify: bool = True) -> "LoRACard":
        """Load the card of an entry (or of ``get(name, version)``).

        With ``verify`` the file's SHA-256 must still equal the entry's ``content_hash`` and the
        card passes every format check; a damaged file raises :class:`CardFormatError` and is
        recorded in :attr:`problems`."""
        from ..cards import LoRAFormat

        entry = name_or_entry if isinstance(name_or_entry, SkillEntry) else self.get(name_or_entry, version)
        if not entry.path.is_file():
            msg = f"card file of {entry.key} is missing: {entry.path}"
            self._note(msg)
            raise CardFormatError(msg)
        if verify:
            actual = file_sha256(entry.path)
            if actual != entry.content_hash:
                msg = (f"card file of {entry.key} was changed or damaged: {entry.path} hashes to "
                       f"{actual}, the library recorded {entry.content_hash}")
                self._note(msg)
                raise CardFormatError(msg)
        try:
            return LoRAFormat.load(entry.path, verify=verify)
        except CardFormatError as exc:
            self._note(f"card of {entry.key} does not load: {exc}")
            raise

    def refresh(self) -> bool:
        """Re-read the index if another process (or writer) replaced it. Returns True when it
        was re-read."""
        st = self._stat_index()
        if st == self._index_stat:
            return False
        with self._lock:
            self._load()
        return True

    # ------------------------------------------------------------------ writing
    def add(self, card_or_path: "LoRACard | str | os.PathLike", examples: Iterable[str] = (),
            description: str | None = None, *, origin: str = "trained", version: int | None = None,
            validation: Any = None, metadata: Mapping[str, str] | None = None,
            _owned_sha256: str | None = None) -> SkillEntry:
        """Add a skill version and return its entry.

        Args:
            card_or_path: a :class:`LoRACard` (written with ``LoRAFormat.save``), or a path to a
                ``.lora.arrow`` file whose bytes are copied verbatim (so ``content_hash`` is that
                file's SHA-256). The bytes are checked with ``LoRAFormat.load(verify=True)``
                before they enter the library.
            examples: texts the skill serves (routing); de-duplicated, whitespace-normalised.
            description: defaults to the card's ``description`` metadata.
            origin: ``"trained"``, ``"extracted"`` or ``"peer"``.
            version: ``None`` = the next version of that name; an explicit version must be new.
            validation: a ``ValidationReport``, its dict or JSON; defaults to the card's
                ``metadata["validation"]``.
            metadata: free str -> str information (sources, publisher key id, signature...).
            _owned_sha256: package-internal (the federation quarantine): the file at
                ``card_or_path`` belongs to the caller, which wrote it and hashed exactly its
                bytes to this value; it is moved in instead of copied and not hashed again. It
                is still checked with ``LoRAFormat.load(verify=True)``.

        Adding bytes identical to an existing version of the same name returns that entry.
        """
        from ..cards import LoRACard, LoRAFormat

        if origin not in ORIGINS:
            raise InputError(f"origin must be one of {ORIGINS}, got {origin!r}")
        if version is not None and (isinstance(version, bool) or not isinstance(version, int) or version < 1):
            raise InputError(f"version must be an int >= 1 or None, got {version!r}")
        meta = _clean_metadata(metadata, "SkillLibrary.add")
        if description is not None and not isinstance(description, str):
            raise InputError(f"description must be a string, got {type(description).__name__}")
        staged = self._dir / "cards" / f".incoming-{uuid.uuid4().hex}.lora.arrow"
        try:
            if isinstance(card_or_path, LoRACard):
                card_or_path.validate()
                LoRAFormat.save(card_or_path, staged)
                card = card_or_path
                where = f"card {card.name!r}"
            elif isinstance(card_or_path, (str, os.PathLike)):
                src = Path(card_or_path)
                where = str(src)
                if not src.is_file():
                    raise InputError(f"{src}: no such card file")
                size = src.stat().st_size
                if size > _MAX_CARD_BYTES:
                    raise CardFormatError(f"{src}: {size} bytes, over the library's limit of {_MAX_CARD_BYTES}")
                # copy (or move, see _owned_sha256) first, then check what was staged: the bytes
                # checked are the bytes kept
                if _owned_sha256 is None or not _move_durably(src, staged):
                    _owned_sha256 = None
                    atomic_write_bytes(staged, src.read_bytes())
                try:
                    card = LoRAFormat.load(staged, verify=True)
                except CardFormatError as exc:  # name the caller's file, not the staging copy
                    raise CardFormatError(str(exc).replace(str(staged), str(src))) from None
            else:
                raise InputError(f"add takes a LoRACard or a path to a .lora.arrow file, got "
                                 f"{type(card_or_path).__name__}")
            name = valid_skill_name(card.name)
            exs = _clean_examples(examples, where)
            val = _clean_validation(validation if validation is not None
                                    else card.metadata.get("validation"), where)
            desc = description if description is not None else card.metadata.get("description", "")
            passed = bool(val.get("passed", False)) if val is not None else origin != "peer"
            content_hash = _owned_sha256 or file_sha256(staged)
            with self._write_lock():
                self._load()
                for e in self.versions(name):
                    if e.content_hash == content_hash:
                        return e
                taken = [e.version for e in self.versions(name)] + self._versions_on_disk(name)
                if version is None:
                    version = max(taken, default=0) + 1
                elif version in taken:
                    raise InputError(f"skill {name!r} already has version {version}; "
                                     f"pass version=None for the next one ({max(taken) + 1})")
                final = self._dir / "cards" / f"{name}@v{version}.lora.arrow"
                os.replace(staged, final)
                st = final.stat()
                entry = SkillEntry(
                    name=name, version=version, description=desc, examples=exs, origin=origin,
                    content_hash=content_hash, base_fingerprint=card.base_fingerprint,
                    validation=val, passed=passed, path=final, created=time.time(), metadata=meta)
                self._write_sidecar(entry, st)
                entries = dict(self._entries)
                entries[entry.key] = entry
                self._stats[entry.key] = (st.st_size, st.st_mtime_ns)
                self._write_index(entries)
                self._entries = entries
        finally:
            staged.unlink(missing_ok=True)
        if self.encoder is not None and exs:
            # cache the new skill's example embeddings now (the others are untouched)
            self.embed_texts(exs)
        return entry

    def remove(self, name: str, version: int | None = None) -> None:
        """Remove every version of ``name``, or one ``version``. Raises :class:`InputError` if
        there is nothing to remove."""
        with self._write_lock():
            self._load()
            vs = self.versions(name)
            if version is not None:
                vs = [e for e in vs if e.version == version]
            if not vs:
                self.get(name, version)  # raises the descriptive error
                raise InputError(f"skill {name!r} has nothing to remove")
            entries = dict(self._entries)
            for e in vs:
                entries.pop(e.key, None)
            self._write_index(entries)
            self._entries = entries
            for e in vs:  # index first: a crash here leaves stray files, not dangling rows
                e.path.unlink(missing_ok=True)
                e.path.with_name(f"{e.key}.json").unlink(missing_ok=True)
                self._stats.pop(e.key, None)

    def set_examples(self, name: str, examples: Iterable[str], version: int | None = None) -> SkillEntry:
        """Replace the example texts of an entry (the card is unchanged)."""
        with self._write_lock():
            self._load()
            e = self.get(name, version)
            new = replace(e, examples=_clean_examples(examples, e.key))
            self._write_sidecar(new, e.path.stat())
            entries = dict(self._entries)
            entries[new.key] = new
            self._write_index(entries)
            self._entries = entries
        if self.encoder is not None and new.examples:
            self.embed_texts(new.examples)
        return new

    # ------------------------------------------------------------------ embeddings
    def embed_texts(self, texts: Sequence[str], encoder: Any = None) -> np.ndarray:
        """``(len(texts), dim)`` float32 embeddings, from the on-disk cache of ``encoder``
        (default: the library's) where present; only missing texts are encoded, then cached."""
        enc = encoder if encoder is not None else self.encoder
        if enc is None:
            raise InputError("embed_texts needs an encoder: pass one here or to SkillLibrary(encoder=...)")
        texts = list(texts)
        if not texts:
            return np.zeros((0, int(getattr(enc, "dim", 0))), dtype=np.float32)
        fp = encoder_fingerprint(enc)
        with self._lock:
            cache = self._read_embedding_cache(fp)
            missing = list(dict.fromkeys(t for t in texts if t not in cache))
            if missing:
                vecs = enc.encode(missing).numpy().astype(np.float32, copy=False)
                self._append_shard(fp, missing, vecs)
                for t, v in zip(missing, vecs):
                    cache[t] = v
            return np.stack([cache[t] for t in texts]).astype(np.float32, copy=False)

    # ------------------------------------------------------------------ internals
    def _note(self, msg: str) -> None:
        with self._lock:
            if msg not in self._problems:
                self._problems.append(msg)

    def _stat_index(self) -> tuple | None:
        try:
            st = self.index_path.stat()
        except FileNotFoundError:
            return None
        return (st.st_ino, st.st_size, st.st_mtime_ns)

    @contextlib.contextmanager
    def _write_lock(self) -> Iterator[None]:
        """This process's lock, then an exclusive flock on ``.lock`` (other processes)."""
        with self._lock:
            fh = open(self._dir / ".lock", "a+b")
            try:
                try:
                    import fcntl

                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
                except ImportError:  # pragma: no cover - Windows: in-process lock only
                    pass
                yield
            finally:
                fh.close()  # closing releases the flock

    def _versions_on_disk(self, name: str) -> list[int]:
        # a damaged (skipped) version still owns its file name: never reuse it
        out = []
        for p in (self._dir / "cards").glob(f"{name}@v*.lora.arrow"):
            tail = p.name[len(name) + 2:-len(".lora.arrow")]
            if tail.isdigit():
                out.append(int(tail))
        return out

    def _write_sidecar(self, entry: SkillEntry, st: os.stat_result) -> None:
        d = entry.to_dict()
        d["path"] = entry.path.name
        d["size"], d["mtime_ns"] = st.st_size, st.st_mtime_ns
        atomic_write_bytes(entry.path.with_name(f"{entry.key}.json"),
                           json.dumps(d, sort_keys=True, indent=1).encode())

    def _write_index(self, entries: Mapping[str, SkillEntry]) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        rows = sorted(entries.values(), key=lambda e: (e.name, e.version))
        stats = [self._stats.get(e.key, (0, 0)) for e in rows]
        table = pa.table({
            "name": pa.array([e.name for e in rows], pa.string()),
            "version": pa.array([e.version for e in rows], pa.int32()),
            "description": pa.array([e.description for e in rows], pa.string()),
            "examples": pa.array([list(e.examples) for e in rows], pa.list_(pa.string())),
            "origin": pa.array([e.origin for e in rows], pa.string()),
            "content_hash": pa.array([e.content_hash for e in rows], pa.string()),
            "base_fingerprint": pa.array([e.base_fingerprint for e in rows], pa.string()),
            "validation": pa.array([None if e.validation is None else json.dumps(e.validation, sort_keys=True)
                                    for e in rows], pa.string()),
            "passed": pa.array([e.passed for e in rows], pa.bool_()),
            "file": pa.array([e.path.name for e in rows], pa.string()),
            "created": pa.array([e.created for e in rows], pa.float64()),
            "metadata": pa.array([json.dumps(e.metadata, sort_keys=True) for e in rows], pa.string()),
            "size": pa.array([s[0] for s in stats], pa.int64()),
            "mtime_ns": pa.array([s[1] for s in stats], pa.int64()),
        }, metadata={"aios_library_version": "1"})
        atomic_write(self.index_path, lambda f: pq.write_table(table, f))
        self._index_stat = self._stat_index()
        self._generation += 1

    def _row_to_entry(self, d: Mapping[str, Any], source: str) -> tuple[SkillEntry, int, int]:
        """Entry (plus the recorded file size and mtime) from an index row or sidecar dict;
        raises ValueError/KeyError/TypeError on a malformed record."""
        name = valid_skill_name(d["name"])
        version = int(d["version"])
        if version < 1:
            raise ValueError(f"version {version} < 1")
        fname = str(d.get("file") or d.get("path") or "")
        if fname != f"{name}@v{version}.lora.arrow":
            raise ValueError(f"card file name {fname!r} does not match {name}@v{version}")
        origin = d["origin"]
        if origin not in ORIGINS:
            raise ValueError(f"origin {origin!r} is not one of {ORIGINS}")
        h = str(d["content_hash"])
        if not _HEX64.match(h):
            raise ValueError(f"content_hash {h!r} is not 64 hex digits")
        val = d.get("validation")
        val = json.loads(val) if isinstance(val, str) else val
        meta = d.get("metadata") or {}
        meta = json.loads(meta) if isinstance(meta, str) else meta
        entry = SkillEntry(
            name=name, version=version, description=str(d.get("description") or ""),
            examples=tuple(str(x) for x in (d.get("examples") or ())), origin=origin,
            content_hash=h, base_fingerprint=d.get("base_fingerprint") or None,
            validation=val if isinstance(val, dict) else None, passed=bool(d["passed"]),
            path=self._dir / "cards" / fname, created=float(d.get("created") or 0.0),
            metadata={str(k): str(v) for k, v in dict(meta).items()})
        return entry, int(d.get("size") or 0), int(d.get("mtime_ns") or 0)

    def _read_index(self) -> list[dict] | None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        # One open handle: pyarrow reading by path stats the file and opens it separately, so a
        # writer's os.replace between the two reads a size that belongs to the other file. The
        # handle is Arrow's own, never a Python file: Arrow's I/O threads drop the buffers a Python
        # file returns, and one dropped while the interpreter exits aborts the process (SIGABRT,
        # "terminate called without an active exception"; apache/arrow#34314).
        try:
            fh = pa.OSFile(str(self.index_path), "rb")
        except FileNotFoundError:
            return None
        try:
            with fh:
                return pq.read_table(fh).to_pylist()
        except Exception as exc:  # any damage: pyarrow raises several types
            self._problems.append(f"index {self.index_path} is unreadable ({type(exc).__name__}: "
                                  f"{exc}); rebuilt from the cards' sidecar files")
            return None

    def _read_sidecars(self) -> list[dict]:
        rows = []
        for p in sorted((self._dir / "cards").glob("*.json")):
            try:
                d = json.loads(p.read_text(encoding="utf-8"))
                if not isinstance(d, dict):
                    raise ValueError("not a JSON object")
                rows.append(d)
            except (OSError, ValueError) as exc:
                self._problems.append(f"sidecar {p} is unreadable ({exc}); skipped")
        return rows

    def _load(self) -> None:
        """(Re)read the index (or rebuild it from sidecars) and check each card file."""
        self._problems = []
        self._stats: dict[str, tuple[int, int]] = {}
        stat_before = self._stat_index()
        rows = self._read_index()
        rebuilt = rows is None
        if rows is None:
            rows = self._read_sidecars()
        entries: dict[str, SkillEntry] = {}
        for d in rows:
            try:
                entry, size, mtime = self._row_to_entry(d, "index")
            except (KeyError, ValueError, TypeError, InputError, json.JSONDecodeError) as exc:
                self._problems.append(f"index row {d.get('name')!r} v{d.get('version')!r} is malformed "
                                      f"({type(exc).__name__}: {exc}); skipped")
                continue
            problem = self._check_file(entry, size, mtime)
            if problem:
                self._problems.append(problem)
                continue
            entries[entry.key] = entry
        known = {e.path.name for e in entries.values()}
        for p in sorted((self._dir / "cards").glob("*.lora.arrow")):
            if p.name not in known and not p.name.startswith(".") and not any(
                    p.name in s for s in self._problems):
                self._problems.append(f"card file {p} is not in the index; ignored "
                                      f"(add it with SkillLibrary.add)")
        self._entries = entries
        self._generation += 1
        if rebuilt and (entries or self.index_path.exists()):
            with contextlib.suppress(OSError):
                self._write_index(entries)
        else:
            self._index_stat = stat_before

    def _check_file(self, entry: SkillEntry, size: int, mtime_ns: int) -> str | None:
        try:
            st = entry.path.stat()
        except FileNotFoundError:
            return f"card file of {entry.key} is missing ({entry.path}); skipped"
        if size and st.st_size != size:
            return (f"card file of {entry.key} has {st.st_size} bytes, the library recorded {size} "
                    f"(truncated or replaced): {entry.path}; skipped")
        if st.st_mtime_ns != mtime_ns:
            # touched since it was added: only the bytes' hash can tell whether it changed
            if file_sha256(entry.path) != entry.content_hash:
                return (f"card file of {entry.key} no longer matches its content hash "
                        f"(damaged or tampered): {entry.path}; skipped")
        self._stats[entry.key] = (st.st_size, st.st_mtime_ns)
        return None

    # embeddings cache ---------------------------------------------------
    def _emb_dir(self, fp: str) -> Path:
        return self._dir / "embeddings" / fp.replace(":", "-")

    def _read_embedding_cache(self, fp: str) -> dict[str, np.ndarray]:
        import pyarrow.ipc as ipc

        cache = self._emb_cache.setdefault(fp, {})
        seen = self._emb_shards.setdefault(fp, set())
        d = self._emb_dir(fp)
        if not d.is_dir():
            return cache
        for p in sorted(d.glob("*.arrow")):
            if p.name in seen:
                continue
            seen.add(p.name)
            try:
                with ipc.open_file(p) as r:
                    t = r.read_all()
                texts = t.column("text").to_pylist()
                flat = t.column("vector").combine_chunks()
                dim = flat.type.list_size
                vecs = np.asarray(flat.flatten().to_numpy(zero_copy_only=False),
                                  dtype=np.float32).reshape(-1, dim)
                if len(texts) != len(vecs) or not np.isfinite(vecs).all():
                    raise ValueError("rows and vectors disagree or vectors are not finite")
            except Exception as exc:  # a damaged shard: drop it, those texts are re-embedded
                self._note(f"embedding cache shard {p} is unreadable ({exc}); ignored")
                continue
            for text, v in zip(texts, vecs):
                cache[text] = v
        return cache

    def _append_shard(self, fp: str, texts: list[str], vecs: np.ndarray) -> None:
        import pyarrow as pa
        import pyarrow.ipc as ipc

        d = self._emb_dir(fp)
        d.mkdir(parents=True, exist_ok=True)
        dim = int(vecs.shape[1])
        table = pa.table({"text": pa.array(texts, pa.string()),
                          "vector": pa.FixedSizeListArray.from_arrays(
                              pa.array(np.ascontiguousarray(vecs, np.float32).reshape(-1)), dim)})
        name = f"{time.time_ns():020d}-{uuid.uuid4().hex[:8]}.arrow"

        def write(f) -> None:
            with ipc.new_file(f, table.schema) as w:
                w.write_table(table)

        atomic_write(d / name, write)
        self._emb_shards.setdefault(fp, set()).add(name)
        shards = sorted(d.glob("*.arrow"))
        if len(shards) > _SHARDS_BEFORE_COMPACT:
            self._compact(fp, shards)

    def _compact(self, fp: str, shards: list[Path]) -> None:
        """Merge the shards into one, keeping only texts some entry still uses."""
        import pyarrow as pa
        import pyarrow.ipc as ipc

        cache = self._emb_cache.get(fp, {})
        used = {t for e in self._entries.values() for t in e.examples}
        keep = [t for t in cache if t in used]
        if not keep:
            return
        vecs = np.stack([cache[t] for t in keep]).astype(np.float32)
        table = pa.table({"text": pa.array(keep, pa.string()),
                          "vector": pa.FixedSizeListArray.from_arrays(pa.array(vecs.reshape(-1)),
                                                                      vecs.shape[1])})
        d = self._emb_dir(fp)
        name = f"{time.time_ns():020d}-compact.arrow"

        def write(f) -> None:
            with ipc.new_file(f, table.schema) as w:
                w.write_table(table)

        atomic_write(d / name, write)  # the merged shard exists before any old one goes
        for p in shards:
            p.unlink(missing_ok=True)
        self._emb_shards[fp] = {name}
