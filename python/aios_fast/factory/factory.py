"""SkillFactory (Tier 3.5): nightly domain skills from the QA log, and model rotation.

``nightly_distill`` (one run, under the workspace's :class:`RunLock`):

1. **plan** - read the whole QA log, embed each record's answer (embeddings cached per
   record key), cluster into domains (:class:`DomainClusterer`: density clustering,
   outliers left out, ids matched to last night's centroids), count each domain's *new*
   records (keys no committed run consumed; or, with ``since``, records from that time on) and,
   for every domain with at least ``min_records`` new ones, write a :class:`TrainJob` for
   version ``<domain>_v<N>`` (N = last published version + 1): all the domain's records, split
   by a hash of each record's key into training (80 %) and held-out (20 %) - a record is
   held out on every night or on none, so a gate never sees its own training data - warm
   started from the domain's last published card. The plan is saved atomically and journaled.
2. **train** - the jobs run on the executor (inline, local pool, Ray); each finished job is
   journaled with its card's SHA-256 as soon as it returns.
3. **publish** - a card that passed its gate is added to the library (idempotent: identical
   bytes return the existing entry) and handed to ``publish``; both steps are journaled.
4. **commit** - the consumed record keys and the new domain state are written atomically,
   then ``committed`` is journaled.

A run killed anywhere resumes from its journal: finished jobs are not retrained (their cards
are verified by hash), published versions are not republished, and since records are only
marked consumed at commit and the QA log is never modified, no record is lost. One step has
no atomic boundary: a kill *inside* the ``publish`` call (after the peer stored the card,
before ``published`` was journaled) repeats that call on resume - harmless for the
federation, whose cards are content-addressed, so a repeated publish stores nothing new.
"""

from __future__ import annotations

import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .._atomic import atomic_write_bytes
from ..errors import InputError
from .domains import Domain, DomainClusterer
from .journal import Journal, RunLock
from .jobs import TrainJob, file_sha256, register_engine

__all__ = ["SkillFactory", "FactoryConfig", "FactoryReport", "DomainRow"]

_GUARD = Path(__file__).resolve().parent.parent / "learn" / "data" / "guard.txt"


@dataclass
class FactoryConfig:
    """Knobs of a nightly run (validated on construction)."""

    min_records: int = 20          # new records a domain needs tonight to get a new version
    min_cluster_size: int | None = None
    match_threshold: float = 0.75  # cosine to keep a domain id from one night to the next
    heldout_fraction: float = 0.2
    max_train: int = 2000          # most recent records of a domain used for training
    rank: int = 8
    alpha: float = 16.0
    epochs: int = 2
    lr: float = 3e-3
    batch_size: int = 16
    seed: int = 0
    threads: int = 1               # torch threads per job (determinism across executors)
    margin: float | None = None
    max_drift: float | None = None
    dims: int = 16

    def __post_init__(self) -> None:
        def check(name: str, ok: bool, want: str) -> None:
            if not ok:
                raise InputError(f"FactoryConfig.{name}: expected {want}, got {getattr(self, name)!r}")
        check("min_records", isinstance(self.min_records, int) and self.min_records >= 4, "an int >= 4")
        check("heldout_fraction", 0.05 <= self.heldout_fraction <= 0.5, "a fraction in [0.05, 0.5]")
        check("max_train", isinstance(self.max_train, int) and self.max_train >= 4, "an int >= 4")
        check("rank", isinstance(self.rank, int) and self.rank >= 1, "an int >= 1")
        check("epochs", isinstance(self.epochs, int) and self.epochs >= 1, "an int >= 1")
        check("threads", isinstance(self.threads, int) and self.threads >= 1, "an int >= 1")


@dataclass
class DomainRow:
    """One line of the per-domain table of a run."""

    domain_id: int
    name: str
    records: int
    new: int
    cluster: str                 # "matched (cos 0.97)" | "new"
    skill: str | None = None     # "<name>_v<N>" when a version was trained
    before: float | None = None  # gate metric before / after
    after: float | None = None
    passed: bool | None = None
    published: bool = False
    reason: str = ""


@dataclass
class FactoryReport:
    """What one ``nightly_distill`` did."""

    run_id: str
    resumed: bool
    records: int
    new_records: int
    outliers: int
    clusters: int
    domains: list[DomainRow] = field(default_factory=list)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @property
    def published(self) -> list[str]:
        return [d.skill for d in self.domains if d.published and d.skill]


def _heldout(key: str, fraction: float) -> bool:
    # a record is held out on every night or on none: its key decides, not the night's split
    return int(key[:8], 16) / 0xFFFFFFFF < fraction


class SkillFactory:
    """Nightly domain skills and model rotation on one workspace directory.

    Args:
        engine: the model skills are trained for (a ``SentenceEncoder`` or ``CausalLM``).
        workspace: directory for the journal, lock, plans, run cards, state, caches.
        library: a ``SkillLibrary`` (default: ``SkillLibrary(workspace / "library")``).
        logger: the ``QALogger`` (or its directory) whose records are distilled (default:
            ``workspace / "qa"``).
        executor: ``"inline"``, ``"local"``, ``"ray"`` or an executor object (default
            ``"inline"`` when the engine is an object already in memory - one machine, no
            reload - see :mod:`aios_fast.factory.executors`).
        publish: called with each new ``SkillEntry`` (e.g. ``FederationManager.publish``).
        encoder: the sentence encoder that embeds records for clustering (default: ``engine``
            when it is a ``SentenceEncoder``, else the bundled MiniLM).
        config: a :class:`FactoryConfig` (or keyword overrides in ``**options``).
        guard_texts: general texts for the gate's drift check (default: the package's set).
    """

    def __init__(self, engine: Any, workspace: str | os.PathLike, library: Any = None, logger: Any = None,
                 executor: Any = None, *, publish: Callable[[Any], Any] | None = None, encoder: Any = None,
                 config: FactoryConfig | None = None, guard_texts: Sequence[str] | None = None,
                 progress: bool = False, **options: Any) -> None:
        from ..learn import QALogger
        from .executors import make_executor

        self.engine = engine
        self.workspace = Path(workspace)
        self.workspace.mkdir(parents=True, exist_ok=True)
        if library is None:
            from ..route.library import SkillLibrary

            library = SkillLibrary(self.workspace / "library")
        self.library = library
        if logger is None or isinstance(logger, (str, os.PathLike)):
            logger = QALogger(self.workspace / "qa" if logger is None else logger)
        self.logger = logger
        if config is None:
            from dataclasses import fields

            unknown = sorted(set(options) - {f.name for f in fields(FactoryConfig)})
            if unknown:
                raise InputError(f"SkillFactory: unknown option(s) {unknown}; FactoryConfig fields are "
                                 f"{[f.name for f in fields(FactoryConfig)]}")
            config = FactoryConfig(**options)
        elif options:
            raise InputError(f"SkillFactory: pass either config= or keyword options, not both ({sorted(options)})")
        self.config = config
        self.executor = make_executor(executor or "inline")
        self.publish = publish
        if encoder is None:
            from ..engines import SentenceEncoder

            encoder = engine if isinstance(engine, SentenceEncoder) else SentenceEncoder()
        self.encoder = encoder
        self.engine_spec = register_engine(engine)
        self.guard = list(guard_texts) if guard_texts is not None else \
            [t for t in _GUARD.read_text(encoding="utf-8").splitlines() if t.strip()]
        self.progress = progress
        self.clusterer = DomainClusterer(self.config.min_cluster_size, dims=self.config.dims,
                                         match_threshold=self.config.match_threshold, seed=self.config.seed)

    # ------------------------------------------------------------------ paths and state
    @property
    def journal(self) -> Journal:
        return Journal(self.workspace / "journal.jsonl")

    def _state_path(self) -> Path:
        return self.workspace / "state.json"

    def state(self) -> dict[str, Any]:
        """The committed state: domains, published versions, committed runs."""
        p = self._state_path()
        if not p.exists():
            return {"domains": [], "versions": {}, "cards": {}, "committed_runs": [], "last_run": None}
        try:
            return json.loads(p.read_text())
        except ValueError as exc:
            raise InputError(f"{p}: unreadable factory state ({exc})") from None

    def domains(self) -> list[Domain]:
        return [Domain.from_dict(d) for d in self.state()["domains"]]

    def _consumed(self, state: dict[str, Any]) -> set[str]:
        import pyarrow.parquet as pq

        keys: set[str] = set()
        for run in state["committed_runs"]:
            f = self.workspace / "consumed" / f"{run}.parquet"
            if f.exists():
                keys.update(pq.read_table(f, columns=["key"]).column("key").to_pylist())
        return keys

    # ------------------------------------------------------------------ embeddings
    def _embed(self, keys: list[str], texts: list[str]) -> np.ndarray:
        """Embeddings of the records, reusing the cache of earlier nights (same encoder)."""
        from ..route.library import encoder_fingerprint

        fp = encoder_fingerprint(self.encoder)
        cache = self.workspace / "embeddings.npz"
        have: dict[str, int] = {}
        M = np.zeros((0, 0), np.float32)
        if cache.exists():
            try:
                with np.load(cache, allow_pickle=False) as z:
                    if str(z["fingerprint"]) == fp:
                        M = z["vectors"]
                        have = {k: i for i, k in enumerate(z["keys"].tolist())}
            except (OSError, ValueError, KeyError):
                have = {}  # a damaged cache is only a cache: recompute
        missing = [i for i, k in enumerate(keys) if k not in have]
        if missing:
            new = self.encoder.encode([texts[i] for i in missing]).numpy().astype(np.float32)
            dim = new.shape[1]
        else:
            new, dim = np.zeros((0, M.shape[1] if M.size else 384), np.float32), (M.shape[1] if M.size else 384)
        X = np.zeros((len(keys), dim), np.float32)
        for j, i in enumerate(missing):
            X[i] = new[j]
        for i, k in enumerate(keys):
            if k in have:
                X[i] = M[have[k]]
        if missing:
            import io

            buf = io.BytesIO()
            np.savez(buf, fingerprint=np.array(fp), keys=np.array(keys), vectors=X)
            atomic_write_bytes(cache, buf.getvalue())
        return X

    # ------------------------------------------------------------------ the plan
    def _plan(self, state: dict[str, Any], since: Any, run_id: str) -> dict[str, Any]:
        from ..learn.records import parse_timestamp

        t = self.logger.collect()
        n = t.num_rows
        rows = {c: t.column(c).to_pylist() for c in ("query", "answer", "domain", "key", "timestamp")}
        plan: dict[str, Any] = {"run_id": run_id, "created": time.time(), "records": n, "jobs": [], "domains": [],
                                "consume": [], "state_domains": state["domains"], "outliers": 0, "clusters": 0}
        if n == 0:
            plan["new_records"] = 0
            return plan
        if since is None:
            consumed = self._consumed(state)
            new = np.array([k not in consumed for k in rows["key"]])
        else:
            cut = parse_timestamp(since, "since")
            new = np.array([ts >= cut for ts in rows["timestamp"]])
        plan["new_records"] = int(new.sum())
        texts = [f"{q}  {a}" for q, a in zip(rows["query"], rows["answer"])]
        # clustered by the answers: they carry a domain's vocabulary, while questions are short
        # and full of the very jargon (product names, codes) the skill has to learn
        X = self._embed(rows["key"], rows["answer"])
        cl = self.clusterer.assign(X, texts, rows["domain"], self.domains())
        plan["outliers"], plan["clusters"] = cl.n_outliers, cl.n_clusters
        plan["state_domains"] = [d.to_dict() for d in cl.domains]
        matched_ids = {did: cos for did, cos in cl.matched.values()}
        cfg = self.config
        for d in cl.domains:
            idx = np.flatnonzero(cl.domain_of == d.id)
            if len(idx) == 0:
                continue
            n_new = int(new[idx].sum())
            row = {"domain_id": d.id, "name": d.name, "records": int(len(idx)), "new": n_new,
                   "cluster": f"matched (cos {matched_ids[d.id]:.2f})" if d.id in matched_ids else "new"}
            if n_new < cfg.min_records:
                row["reason"] = f"{n_new} new record(s) < min_records {cfg.min_records}"
                plan["domains"].append(row)
                continue
            pairs = [(rows["query"][i], rows["answer"][i], rows["key"][i]) for i in idx]
            held = [[q, a] for q, a, k in pairs if _heldout(k, cfg.heldout_fraction)]
            train = [[q, a] for q, a, k in pairs if not _heldout(k, cfg.heldout_fraction)][-cfg.max_train:]
            if len(held) < 2 or len(train) < 2:
                row["reason"] = f"too few records to split: {len(train)} training, {len(held)} held out"
                plan["domains"].append(row)
                continue
            # at least ~4 optimizer steps per epoch on a small domain; in-batch negatives still >= 8
            batch = min(cfg.batch_size, max(8, len(train) // 4))
            version = int(state["versions"].get(str(d.id), 0)) + 1
            skill = f"{d.name}_v{version}"
            start = state["cards"].get(str(d.id))
            job = TrainJob(job_id=skill, engine=self.engine_spec, name=d.name, train=train, heldout=held,
                           guard=self.guard, out=str(self.workspace / "runs" / run_id / f"{skill}.lora.arrow"),
                           start_card=start if start and Path(start).exists() else None,
                           rank=cfg.rank, alpha=cfg.alpha, epochs=cfg.epochs, lr=cfg.lr, batch_size=batch,
                           seed=cfg.seed, margin=cfg.margin, max_drift=cfg.max_drift, threads=cfg.threads,
                           metadata={"description": f"{d.name}: domain skill distilled by the skill factory from "
                                                    f"{len(idx)} QA records (terms: {', '.join(d.terms) or '-'})",
                                     "source": "aios_fast.factory.SkillFactory.nightly_distill",
                                     "factory_domain_id": str(d.id), "factory_version": skill,
                                     "factory_run": run_id})
            row.update(skill=skill, version=version, job=job.job_id)
            plan["jobs"].append(job.to_dict())
            plan["domains"].append(row)
            plan["consume"].extend(rows["key"][i] for i in idx if new[i])
            plan.setdefault("examples", {})[skill] = [rows["query"][i] for i in idx[:32]]
        return plan

    # ------------------------------------------------------------------ the run
    def nightly_distill(self, since: Any = None) -> FactoryReport:
        """One nightly run (see the module docstring); resumes an unfinished run first.

        Args:
            since: ``None`` - new records are those no committed run consumed; a time
                (datetime, POSIX seconds, ISO string) - records from then on count as new.
        Returns: a :class:`FactoryReport` with one row per domain seen tonight.
        Raises: ``LockHeldError`` when another run holds the workspace lock.
        """
        t0 = time.perf_counter()
        with RunLock(self.workspace / "lock") as lock:
            journal = self.journal
            if lock.stale:
                journal.append("stale_lock", holder=lock.stale)
            state = self.state()
            run_id = self._unfinished(journal)
            resumed = run_id is not None
            if resumed:
                plan = json.loads((self.workspace / "runs" / run_id / "plan.json").read_text())
                journal.append("resumed", run=run_id)
            else:
                run_id = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime()) + "-" + uuid.uuid4().hex[:6]
                plan = self._plan(state, since, run_id)
                d = self.workspace / "runs" / run_id
                d.mkdir(parents=True, exist_ok=True)
                atomic_write_bytes(d / "plan.json", json.dumps(plan).encode())
                journal.append("planned", run=run_id, jobs=[j["job_id"] for j in plan["jobs"]],
                               records=plan["records"], new=plan["new_records"])
            results = self._train(journal, run_id, plan)
            rows = self._publish(journal, run_id, plan, results, state)
            self._commit(journal, run_id, plan, results, state)
        return FactoryReport(run_id=run_id, resumed=resumed, records=plan["records"],
                             new_records=plan["new_records"], outliers=plan["outliers"], clusters=plan["clusters"],
                             domains=rows, seconds=round(time.perf_counter() - t0, 3))

    @staticmethod
    def _unfinished(journal: Journal) -> str | None:
        planned = [e["run"] for e in journal.find(event="planned")]
        done = {e["run"] for e in journal.events if e["event"] in ("committed", "abandoned")}
        open_runs = [r for r in planned if r not in done]
        return open_runs[-1] if open_runs else None

    def _train(self, journal: Journal, run_id: str, plan: dict[str, Any]) -> dict[str, dict[str, Any]]:
        results: dict[str, dict[str, Any]] = {}
        todo = []
        for job in plan["jobs"]:
            done = journal.last(event="trained", run=run_id, job=job["job_id"])
            if done and Path(done["result"]["card"]).exists() and file_sha256(done["result"]["card"]) == done["result"]["sha256"]:
                results[job["job_id"]] = done["result"]
            else:
                todo.append(job)
        if not todo:
            return results
        for job in todo:
            journal.append("training", run=run_id, job=job["job_id"], executor=getattr(self.executor, "name", "?"))

        def on_done(i: int, result: dict[str, Any]) -> None:
            # journaled the moment a job returns: a kill after this point never retrains it
            journal.append("trained", run=run_id, job=todo[i]["job_id"], result=result)
            results[todo[i]["job_id"]] = result

        from rich.progress import Progress

        with Progress(transient=True, disable=not self.progress) as bar:
            task = bar.add_task(f"training {len(todo)} domain skill(s)", total=len(todo))

            def advance(i: int, r: dict[str, Any]) -> None:
                on_done(i, r)
                bar.advance(task)

            self.executor.map(todo, advance)
        return results

    def _publish(self, journal, run_id, plan, results, state) -> list[DomainRow]:
        rows = []
        for d in plan["domains"]:
            row = DomainRow(domain_id=d["domain_id"], name=d["name"], records=d["records"], new=d["new"],
                            cluster=d["cluster"], skill=d.get("skill"), reason=d.get("reason", ""))
            rows.append(row)
            if not row.skill:
                continue
            r = results[row.skill]
            v = r["validation"]
            row.before, row.after, row.passed = v["before"], v["after"], r["passed"]
            if not r["passed"]:
                row.reason = "gate failed: " + "; ".join(v.get("reasons", []))
                continue
            if journal.has(event="published", run=run_id, job=row.skill):
                row.published = True
                continue
            entry = self.library.find_by_hash(r["sha256"])
            if entry is None:
                entry = self.library.add(r["card"], examples=plan.get("examples", {}).get(row.skill, ()),
                                         origin="trained", version=d["version"], validation=v,
                                         metadata={"factory_version": row.skill, "factory_run": run_id,
                                                   "factory_domain_id": str(row.domain_id)})
            journal.append("added", run=run_id, job=row.skill, entry=entry.key, sha256=r["sha256"])
            if self.publish is not None:
                journal.append("publishing", run=run_id, job=row.skill)
                self.publish(entry)
            journal.append("published", run=run_id, job=row.skill, entry=entry.key, sha256=r["sha256"])
            row.published = True
        return rows

    def _commit(self, journal, run_id, plan, results, state) -> None:
        import pyarrow as pa
        import pyarrow.parquet as pq

        if run_id in state["committed_runs"]:  # killed between the state write and the journal line
            journal.append("committed", run=run_id)
            return
        cdir = self.workspace / "consumed"
        cdir.mkdir(exist_ok=True)
        import io

        buf = io.BytesIO()
        pq.write_table(pa.table({"key": pa.array(plan["consume"], pa.string())}), buf)
        atomic_write_bytes(cdir / f"{run_id}.parquet", buf.getvalue())
        new_state = dict(state)
        new_state["domains"] = plan["state_domains"]
        versions = dict(state["versions"])
        cards = dict(state["cards"])
        for d in plan["domains"]:
            skill = d.get("skill")
            if skill and results[skill]["passed"]:
                versions[str(d["domain_id"])] = d["version"]
                entry = self.library.find_by_hash(results[skill]["sha256"])
                cards[str(d["domain_id"])] = str(entry.path) if entry is not None else results[skill]["card"]
        new_state.update(versions=versions, cards=cards, last_run=run_id,
                         committed_runs=list(state["committed_runs"]) + [run_id])
        atomic_write_bytes(self._state_path(), json.dumps(new_state, indent=1).encode())
        journal.append("committed", run=run_id, consumed=len(plan["consume"]))

    # ------------------------------------------------------------------ scheduling
    def schedule(self, cron: str = "0 2 * * *", *, misfire_grace: float = 3600.0,
                 should_stop: Callable[[], bool] = lambda: False, max_runs: int | None = None,
                 on_event: Callable[[str, float, Any], None] | None = None, **clock: Any) -> int:
        """Run :meth:`nightly_distill` at the fire times of ``cron`` (UTC) until ``should_stop()``,
        running a missed fire time late if within ``misfire_grace`` seconds (>= 1 h by
        default); see :mod:`aios_fast.factory.schedule`. Returns the number of runs."""
        from .schedule import CronSchedule, run_schedule

        return run_schedule(self.nightly_distill, CronSchedule(cron, misfire_grace),
                            self.workspace / "schedule.json", should_stop=should_stop, max_runs=max_runs,
                            on_event=on_event, **clock)

    # ------------------------------------------------------------------ model rotation
    def model_rotation(self, new_model: Any, previous_model: Any,
                       benchmark_queries: Sequence[str] | Mapping[str, Sequence[str]], **options: Any):
        """Turn what changed between two releases into incremental cards; see
        :func:`aios_fast.factory.rotation.model_rotation` for the steps and options."""
        from .rotation import model_rotation

        return model_rotation(self, new_model, previous_model, benchmark_queries, **options)

    def close(self) -> None:
        self.executor.close()
        close = getattr(self.logger, "close", None)
        if close:
            close()
