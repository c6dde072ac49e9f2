"""Batch extraction: many (base, tuned) checkpoint pairs into skill cards, on any executor.

A jobs file is JSON (always) or YAML (when PyYAML is installed)::

    {"defaults": {"rank": 16, "alpha": 32},
     "jobs": [{"name": "law", "base": "ckpt/base", "tuned": "ckpt/law", "out": "cards/law.lora.arrow"},
              {"name": "med", "base": "ckpt/base", "tuned": "ckpt/med", "energy": 0.9, "max_rank": 64,
               "out": "cards/med.lora.arrow"}]}

(a bare list of jobs works too). Relative paths are resolved against the jobs file's folder.
Each job's fields are those of :class:`~aios_fast.factory.jobs.ExtractJob`; ``name`` doubles
as the job id.

Resumable: beside each finished card a receipt ``<out>.job.json`` records the job spec and
the card's SHA-256, written after the card. On a rerun a job is skipped only if its receipt
matches the current spec and the card still hashes to the recorded value and loads with full
verification; anything else (no receipt, a changed spec, a damaged or missing card) runs again.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from .._atomic import atomic_write_bytes
from ..errors import CardFormatError, InputError
from .jobs import ExtractJob, file_sha256

__all__ = ["load_jobs", "run_batch", "BatchReport", "receipt_path"]


def receipt_path(out: str | os.PathLike) -> Path:
    return Path(str(out) + ".job.json")


def _spec_hash(job: ExtractJob) -> str:
    d = job.to_dict()
    d.pop("threads", None)  # how many threads ran it does not change the card
    return hashlib.sha256(json.dumps(d, sort_keys=True).encode()).hexdigest()


def load_jobs(path: str | os.PathLike) -> list[ExtractJob]:
    """Parse and validate a jobs file (see the module docstring); errors name the file and job."""
    p = Path(path)
    if not p.is_file():
        raise InputError(f"{p}: no such jobs file")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise InputError(f"{p}: YAML jobs files need PyYAML (pip install pyyaml); or write the jobs as JSON") from None
        try:
            doc = yaml.safe_load(text)
        except yaml.YAMLError as exc:
            raise InputError(f"{p}: not valid YAML: {exc}") from None
    elif p.suffix.lower() == ".json":
        try:
            doc = json.loads(text)
        except ValueError as exc:
            raise InputError(f"{p}: not valid JSON: {exc}") from None
    else:
        raise InputError(f"{p}: expected a .json, .yaml or .yml jobs file")
    defaults: dict[str, Any] = {}
    if isinstance(doc, dict):
        unknown = sorted(set(doc) - {"defaults", "jobs"})
        if unknown:
            raise InputError(f"{p}: unknown top-level key(s) {unknown}; expected 'jobs' and optionally 'defaults'")
        defaults = doc.get("defaults") or {}
        doc = doc.get("jobs")
        if not isinstance(defaults, dict):
            raise InputError(f"{p}: 'defaults' must be a mapping, got {type(defaults).__name__}")
    if not isinstance(doc, list) or not doc:
        raise InputError(f"{p}: expected a non-empty list of jobs (or {{'jobs': [...]}})")
    jobs, seen = [], set()
    for i, raw in enumerate(doc):
        if not isinstance(raw, dict):
            raise InputError(f"{p}: job {i}: expected a mapping, got {type(raw).__name__}")
        d = {**defaults, **raw}
        for f in ("base", "tuned", "out"):
            if f not in d:
                raise InputError(f"{p}: job {i} ({d.get('name', '?')}): missing required field {f!r}")
            if not isinstance(d[f], str):
                raise InputError(f"{p}: job {i}: field {f!r} must be a path string, got {d[f]!r}")
            if not os.path.isabs(d[f]):
                d[f] = str((p.parent / d[f]).resolve())
        name = d.pop("name", None) or Path(d["out"]).name.split(".")[0]
        d.setdefault("job_id", name)
        d.setdefault("name", name)
        try:
            job = ExtractJob.from_dict(d)
        except InputError as exc:
            raise InputError(f"{p}: job {i}: {exc}") from None
        except TypeError as exc:
            raise InputError(f"{p}: job {i}: {exc}") from None
        if job.job_id in seen:
            raise InputError(f"{p}: job {i}: duplicate job id {job.job_id!r}; give each job a unique name")
        seen.add(job.job_id)
        jobs.append(job)
    outs = [j.out for j in jobs]
    dup = {o for o in outs if outs.count(o) > 1}
    if dup:
        raise InputError(f"{p}: several jobs write {sorted(dup)[0]}; give each job its own 'out'")
    return jobs


def _finished(job: ExtractJob) -> dict[str, Any] | None:
    """The receipt of a verified finished job, or None."""
    from ..cards import LoRAFormat

    rp, out = receipt_path(job.out), Path(job.out)
    if not (rp.is_file() and out.is_file()):
        return None
    try:
        rec = json.loads(rp.read_text())
        if rec.get("spec") != _spec_hash(job) or file_sha256(out) != rec["result"]["sha256"]:
            return None
        LoRAFormat.load(out, verify=True)
    except (ValueError, KeyError, TypeError, OSError, CardFormatError):
        return None
    return rec["result"]


@dataclass
class BatchReport:
    """Per-job results (``status``: done | skipped | failed) and totals."""

    jobs: list[dict[str, Any]] = field(default_factory=list)
    executor: str = ""
    seconds: float = 0.0

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [j for j in self.jobs if j["status"] == "failed"]

    def to_dict(self) -> dict[str, Any]:
        return {"executor": self.executor, "seconds": round(self.seconds, 3), "jobs": self.jobs,
                "done": sum(j["status"] == "done" for j in self.jobs),
                "skipped": sum(j["status"] == "skipped" for j in self.jobs), "failed": len(self.failed)}


def run_batch(jobs: Sequence[ExtractJob], executor: Any, *, force: bool = False, progress: bool = False,
              console: Any = None) -> BatchReport:
    """Run ``jobs`` on ``executor`` (see :mod:`aios_fast.factory.executors`), skipping verified
    finished outputs unless ``force``. A failing job is reported, the others still run."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    t0 = time.perf_counter()
    report = BatchReport(executor=getattr(executor, "name", type(executor).__name__))
    rows: dict[str, dict[str, Any]] = {}
    todo: list[ExtractJob] = []
    for job in jobs:
        done = None if force else _finished(job)
        if done is not None:
            rows[job.job_id] = {"job_id": job.job_id, "status": "skipped", "reason": "verified output exists", **done}
        else:
            todo.append(job)
    with Progress(TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=console, disable=not progress) as bar:
        overall = bar.add_task("extract-batch", total=len(jobs), completed=len(jobs) - len(todo))
        per_job = {j.job_id: bar.add_task(f"  {j.job_id}", total=1) for j in todo}

        def on_done(i: int, result: dict[str, Any]) -> None:
            job = todo[i]
            atomic_write_bytes(receipt_path(job.out), json.dumps(
                {"spec": _spec_hash(job), "job": job.to_dict(), "result": result}, indent=1).encode())
            rows[job.job_id] = {"status": "done", **result}
            bar.update(per_job[job.job_id], completed=1)
            bar.advance(overall)

        # one job per executor call would serialise the pool: submit all, survive failures by
        # retrying the failed job alone to report its error while the rest finish
        from .executors import JobFailedError

        pending = list(range(len(todo)))
        while pending:
            batch = [todo[i].to_dict() for i in pending]
            index = list(pending)
            try:
                executor.map(batch, lambda k, r: on_done(index[k], r))
                pending = []
            except JobFailedError as exc:
                failed_id = exc.job["job_id"]
                rows[failed_id] = {"job_id": failed_id, "status": "failed", "error": str(exc)}
                bar.advance(overall)
                pending = [i for i in index if todo[i].job_id not in rows]
    report.jobs = [rows[j.job_id] for j in jobs]
    report.seconds = time.perf_counter() - t0
    return report
