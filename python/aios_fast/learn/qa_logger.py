"""QALogger: an append-only, crash-safe log of question/answer records in Parquet fragments.

Layout: ``DIR/part-<ns>-<pid>-<seq>.parquet`` fragments, together one ``pyarrow.dataset``.
Each flush writes a *new* fragment: temp file ``DIR/.tmp-<pid>-<uuid>.parquet`` (hidden, so
``pyarrow.dataset`` ignores it), ``fsync``, atomic ``os.replace`` to its final name, ``fsync`` of
the directory. A kill at any moment therefore loses at most the records not yet flushed; earlier
fragments are never rewritten in place. Temp files left by dead processes are removed on open.

Duplicates (same normalised query and answer, see :func:`records.normalise_text`) are dropped on
``log`` against an index of keys rebuilt on open from the ``key`` column. Two *processes* writing
the same directory could still both log one pair; ``collect`` drops such duplicates too (first
occurrence wins), so readers always see a duplicate-free log.
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Iterable, Mapping

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from .._atomic import atomic_write, fsync_dir
from ..errors import InputError
from .records import QARecord, parse_timestamp

__all__ = ["QALogger", "SCHEMA"]

SCHEMA = pa.schema([
    ("query", pa.string()),
    ("answer", pa.string()),
    ("source", pa.string()),
    ("domain", pa.string()),
    ("timestamp", pa.timestamp("us", tz="UTC")),
    ("router_confidence", pa.float64()),
    ("skill_used", pa.string()),
    ("key", pa.string()),  # dedup key: lets `open` rebuild the index reading one column
])


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class QALogger:
    """Append-only QA log in ``directory``.

    Args:
        directory: where the fragments live (created if missing).
        flush_every: pending records that trigger an automatic flush (1 = every record).
        retention_days: if set, :meth:`compact` drops records older than this.
        max_bytes: if set, :meth:`compact` drops the oldest records until the log fits.
        max_query_chars / max_answer_chars: record validation limits.

    Use as a context manager (or call :meth:`close`) so pending records are flushed.
    """

    def __init__(self, directory: str | os.PathLike, flush_every: int = 64, *,
                 retention_days: float | None = None, max_bytes: int | None = None,
                 max_query_chars: int = 8192, max_answer_chars: int = 32768) -> None:
        if not isinstance(flush_every, int) or flush_every < 1:
            raise InputError(f"flush_every: expected an int >= 1, got {flush_every!r}")
        if retention_days is not None and not retention_days > 0:
            raise InputError(f"retention_days: expected > 0 or None, got {retention_days!r}")
        if max_bytes is not None and not (isinstance(max_bytes, int) and max_bytes > 0):
            raise InputError(f"max_bytes: expected a positive int or None, got {max_bytes!r}")
        self.directory = Path(directory)
        if self.directory.exists() and not self.directory.is_dir():
            raise InputError(f"{self.directory} exists and is not a directory")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.flush_every = flush_every
        self.retention_days = retention_days
        self.max_bytes = max_bytes
        self._limits = {"max_query_chars": max_query_chars, "max_answer_chars": max_answer_chars}
        self._lock = threading.RLock()
        self._pending: list[QARecord] = []
        self._seq = 0
        self._closed = False
        self._clean_temp_files()
        self._keys: set[str] = set(self._read_column("key"))

    # ------------------------------------------------------------------ files
    def fragments(self) -> list[Path]:
        """Committed fragment files, oldest first."""
        return sorted(self.directory.glob("part-*.parquet"))

    def _clean_temp_files(self) -> None:
        for p in self.directory.glob(".tmp-*.parquet"):
            try:
                pid = int(p.name.split("-")[1])
            except (IndexError, ValueError):
                pid = -1
            # a live writer's temp file (this process's other loggers included) is left alone;
            # readers ignore it anyway (hidden name)
            if pid < 0 or (pid != os.getpid() and not _pid_alive(pid)):
                p.unlink(missing_ok=True)

    def _new_fragment_name(self) -> Path:
        self._seq += 1
        return self.directory / f"part-{time.time_ns():020d}-{os.getpid()}-{self._seq:06d}.parquet"

    def _write_fragment(self, table: pa.Table) -> Path:
        """Write ``table`` as a new fragment: temp file, fsync, atomic rename, fsync dir."""
        tmp = self.directory / f".tmp-{os.getpid()}-{uuid.uuid4().hex}.parquet"
        final = self._new_fragment_name()
        try:
            with open(tmp, "wb") as f:
                pq.write_table(table, f, compression="zstd")
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, final)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        fsync_dir(self.directory)
        return final

    def _read_column(self, column: str) -> list[Any]:
        files = self.fragments()
        if not files:
            return []
        return ds.dataset([str(f) for f in files], schema=SCHEMA, format="parquet") \
            .to_table(columns=[column]).column(column).to_pylist()

    # ------------------------------------------------------------------ writing
    def log(self, query: str, answer: str, source: str = "", domain: str = "general",
            timestamp: Any = None, router_confidence: float | None = None,
            skill_used: str | None = None) -> bool:
        """Validate and append one record. Returns False if it duplicates a logged pair."""
        rec = QARecord.make(query, answer, source, domain, timestamp, router_confidence,
                            skill_used, **self._limits)
        return self._append(rec)

    def log_many(self, records: Iterable[Mapping[str, Any] | QARecord]) -> int:
        """Append many records (mappings with the record fields); returns how many were new.
        Every record is validated before any is appended."""
        recs = []
        for i, r in enumerate(records):
            try:
                recs.append(r if isinstance(r, QARecord) else QARecord.from_mapping(r, **self._limits))
            except InputError as exc:
                raise InputError(f"record {i}: {exc}") from None
        return sum(self._append(r) for r in recs)

    def _append(self, rec: QARecord) -> bool:
        with self._lock:
            if self._closed:
                raise InputError(f"QALogger({self.directory}) is closed")
            key = rec.key
            if key in self._keys:
                return False
            self._keys.add(key)
            self._pending.append(rec)
            if len(self._pending) >= self.flush_every:
                self._flush_locked()
            return True

    def flush(self) -> Path | None:
        """Commit pending records as one new fragment; returns its path (None if nothing pending)."""
        with self._lock:
            return self._flush_locked()

    def _flush_locked(self) -> Path | None:
        if not self._pending:
            return None
        recs = self._pending
        table = pa.table({
            "query": [r.query for r in recs], "answer": [r.answer for r in recs],
            "source": [r.source for r in recs], "domain": [r.domain for r in recs],
            "timestamp": [r.timestamp for r in recs],
            "router_confidence": [r.router_confidence for r in recs],
            "skill_used": [r.skill_used for r in recs], "key": [r.key for r in recs],
        }, schema=SCHEMA)
        path = self._write_fragment(table)
        self._pending = []  # only after the fragment is durable
        return path

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._flush_locked()
                self._closed = True

    def __enter__(self) -> "QALogger":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __len__(self) -> int:
        with self._lock:
            return len(self._keys)

    @property
    def pending(self) -> int:
        with self._lock:
            return len(self._pending)

    # ------------------------------------------------------------------ reading
    def dataset(self) -> ds.Dataset:
        """The committed log as one ``pyarrow.dataset`` (pending records not included)."""
        return ds.dataset([str(f) for f in self.fragments()], schema=SCHEMA, format="parquet")

    def collect(self, since: Any = None, until: Any = None, domain: str | Iterable[str] | None = None,
                *, include_pending: bool = True) -> pa.Table:
        """Records with ``since <= timestamp < until`` in ``domain`` (a name or several), sorted by
        timestamp, duplicates dropped. Times: datetimes (naive = UTC), POSIX seconds or ISO strings."""
        with self._lock:
            if include_pending:
                self.flush()
            dset = self.dataset()
        expr = None

        def both(e):
            return e if expr is None else expr & e
        if since is not None:
            expr = both(ds.field("timestamp") >= pa.scalar(parse_timestamp(since, "since"),
                                                          SCHEMA.field("timestamp").type))
        if until is not None:
            expr = both(ds.field("timestamp") < pa.scalar(parse_timestamp(until, "until"),
                                                         SCHEMA.field("timestamp").type))
        if domain is not None:
            doms = [domain] if isinstance(domain, str) else list(domain)
            expr = both(ds.field("domain").isin(doms))
        table = dset.to_table(filter=expr)
        return self._dedup(table).sort_by([("timestamp", "ascending")])

    @staticmethod
    def _dedup(table: pa.Table) -> pa.Table:
        if table.num_rows == 0:
            return table
        idx = table.append_column("_i", pa.array(range(table.num_rows), pa.int64())) \
            .group_by("key", use_threads=False).aggregate([("_i", "min")]).column("_i_min")
        return table.take(pc.take(idx, pc.sort_indices(idx)))

    def pairs(self, **filters: Any) -> list[tuple[str, str]]:
        """``(query, answer)`` tuples of :meth:`collect` - what ``LoRATrainer.train`` takes."""
        t = self.collect(**filters)
        return list(zip(t.column("query").to_pylist(), t.column("answer").to_pylist()))

    # ------------------------------------------------------------------ maintenance
    def nbytes(self) -> int:
        """Bytes on disk of the committed fragments."""
        return sum(f.stat().st_size for f in self.fragments())

    def compact(self, now: datetime | None = None) -> Path | None:
        """Rewrite all fragments as one (duplicates dropped, retention applied) and delete the old
        ones. Crash-safe: the new fragment is committed before any old one is deleted, and a crash
        between leaves duplicates that ``collect`` drops and the next ``compact`` removes."""
        with self._lock:
            self.flush()
            old = self.fragments()
            if not old:
                return None
            table = self._dedup(self.dataset().to_table()).sort_by([("timestamp", "ascending")])
            if self.retention_days is not None:
                now = now or datetime.now(timezone.utc)
                cutoff = parse_timestamp(now) - timedelta(days=self.retention_days)
                table = table.filter(pc.field("timestamp") >= pa.scalar(cutoff, SCHEMA.field("timestamp").type))
            if self.max_bytes is not None and table.num_rows:
                # drop oldest rows until the estimated on-disk size fits (size is ~linear in rows)
                per_row = max(1.0, self.nbytes() / max(1, sum(pq.read_metadata(f).num_rows for f in old)))
                keep = int(self.max_bytes / per_row)
                if keep < table.num_rows:
                    table = table.slice(table.num_rows - keep)
            new = self._write_fragment(table) if table.num_rows else None
            for f in old:
                f.unlink(missing_ok=True)
            fsync_dir(self.directory)
            self._keys = set(table.column("key").to_pylist())
            return new

    def rotate(self) -> Path | None:
        """Alias of :meth:`compact`: seal the current fragments into one and apply retention."""
        return self.compact()

    # ------------------------------------------------------------------ JSONL
    def import_jsonl(self, path: str | os.PathLike) -> tuple[int, int]:
        """Append records from a JSONL file (one object per line). Returns (new, duplicates).
        The whole file is validated before anything is appended; errors name the line."""
        import json

        recs: list[QARecord] = []
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    recs.append(QARecord.from_mapping(json.loads(line), **self._limits))
                except (json.JSONDecodeError, InputError) as exc:
                    raise InputError(f"{path}:{n}: {exc}") from None
        added = self.log_many(recs)
        self.flush()
        return added, len(recs) - added

    def export_jsonl(self, path: str | os.PathLike, **filters: Any) -> int:
        """Write :meth:`collect` (with ``filters``) to a JSONL file atomically; returns row count."""
        import json

        t = self.collect(**filters).drop_columns(["key"])
        def write(f) -> None:
            for row in t.to_pylist():
                row["timestamp"] = row["timestamp"].isoformat()
                f.write((json.dumps(row, ensure_ascii=False) + "\n").encode("utf-8"))

        atomic_write(path, write)
        return t.num_rows
