"""Job specs the factory hands to an executor, and the functions that run them.

A job is a plain JSON-able dataclass, so the same spec runs in this process, in a local
process pool or as a Ray task and lands in the journal verbatim. A job loads its engine from
the spec (cached per worker process) and pins torch to ``threads`` intra-op threads: float
reductions depend on the thread count, so pinning it is what makes cards bit-identical for
the same seeds on CPU whichever executor ran them.

- :class:`TrainJob`: train a skill on a domain's records (warm-started from the domain's
  previous card when given), gate it on held-out records, save it atomically.
- :class:`ExtractJob`: extract a card from ``tuned − base`` (one ``extract-batch`` entry).
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from .._hashing import file_sha256
from ..errors import InputError

__all__ = ["TrainJob", "ExtractJob", "run_job", "run_train_job", "run_extract_job", "register_engine",
           "engine_spec", "file_sha256"]

_ENGINES: dict[str, Any] = {}  # engine spec key -> loaded engine, per process


def engine_spec(engine: Any) -> dict[str, str]:
    """How a worker process reloads ``engine``: ``{"kind": "encoder", "path": ...}`` for a
    SentenceEncoder, ``{"kind": "causal", "gguf": ...}`` for a CausalLM."""
    from ..engines import CausalLM, SentenceEncoder

    if isinstance(engine, SentenceEncoder):
        return {"kind": "encoder", "path": str(Path(engine.path).resolve())}
    if isinstance(engine, CausalLM):
        return {"kind": "causal", "gguf": str(Path(engine.gguf_path).resolve())}
    raise InputError(f"engine: the factory needs a SentenceEncoder or a CausalLM (reloadable by "
                     f"executor workers), got {type(engine).__name__}")


def _spec_key(spec: dict[str, str]) -> str:
    return json.dumps(spec, sort_keys=True)


def register_engine(engine: Any) -> dict[str, str]:
    """Make ``engine`` the one jobs with its spec use in this process (no reload); returns the spec."""
    spec = engine_spec(engine)
    _ENGINES[_spec_key(spec)] = engine
    return spec


def _engine(spec: dict[str, str]) -> Any:
    key = _spec_key(spec)
    if key not in _ENGINES:
        if spec.get("kind") == "encoder":
            from ..engines import SentenceEncoder

            _ENGINES[key] = SentenceEncoder(spec["path"])
        elif spec.get("kind") == "causal":
            from ..engines import CausalLM

            _ENGINES[key] = CausalLM(spec["gguf"])
        else:
            raise InputError(f"engine spec {spec!r}: kind must be 'encoder' or 'causal'")
    return _ENGINES[key]


class _threads:
    """Pin torch's intra-op threads for the job's duration (determinism, see module docstring)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def __enter__(self):
        import torch

        self.was = torch.get_num_threads()
        torch.set_num_threads(self.n)

    def __exit__(self, *exc):
        import torch

        torch.set_num_threads(self.was)


def _pairs(value: Any, what: str) -> list[list[str]]:
    if not isinstance(value, (list, tuple)):
        raise InputError(f"{what}: expected a list of [question, answer] pairs, got {type(value).__name__}")
    out = []
    for i, p in enumerate(value):
        if not (isinstance(p, (list, tuple)) and len(p) == 2 and all(isinstance(x, str) and x.strip() for x in p)):
            raise InputError(f"{what}[{i}]: expected [question, answer] non-empty strings, got {p!r:.80}")
        out.append([p[0], p[1]])
    return out


@dataclass
class TrainJob:
    """Train one domain skill. ``out`` is the card path; ``start_card`` the domain's previous
    card (warm start) or None. Training hyper-parameters as in :class:`LoRATrainer`."""

    job_id: str
    engine: dict[str, str]
    name: str
    train: list[list[str]]
    heldout: list[list[str]]
    guard: list[str]
    out: str
    start_card: str | None = None
    rank: int = 8
    alpha: float = 16.0
    epochs: int = 2
    lr: float = 3e-3
    batch_size: int = 16
    seed: int = 0
    target_modules: list[str] | None = None
    margin: float | None = None
    max_drift: float | None = None
    threads: int = 1
    metadata: dict[str, str] = field(default_factory=dict)
    kind: str = "train"

    def __post_init__(self) -> None:
        self.train = _pairs(self.train, f"{self.job_id}: train")
        self.heldout = _pairs(self.heldout, f"{self.job_id}: heldout")
        if len(self.train) < 2 or len(self.heldout) < 2:
            raise InputError(f"{self.job_id}: need >= 2 training and >= 2 held-out pairs, got "
                             f"{len(self.train)} and {len(self.heldout)}")
        if not isinstance(self.threads, int) or self.threads < 1:
            raise InputError(f"{self.job_id}: threads must be an int >= 1, got {self.threads!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "TrainJob":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass
class ExtractJob:
    """Extract ``tuned − base`` into a card at ``out`` (``rank`` or ``energy``, see
    :meth:`LoRAExtractor.extract_delta`)."""

    job_id: str
    base: str
    tuned: str
    out: str
    rank: int | None = None
    energy: float | None = None
    max_rank: int | None = None
    alpha: float | None = None
    include: str | None = None
    exclude: str | None = None
    name: str | None = None
    description: str | None = None
    seed: int = 0
    threads: int = 1
    kind: str = "extract"

    def __post_init__(self) -> None:
        if not isinstance(self.job_id, str) or not self.job_id:
            raise InputError(f"job id: expected a non-empty string, got {self.job_id!r}")
        for f in ("base", "tuned", "out"):
            v = getattr(self, f)
            if not isinstance(v, str) or not v:
                raise InputError(f"job {self.job_id!r}: field {f!r} must be a non-empty path string, got {v!r}")
        if self.rank is not None and self.energy is not None:
            raise InputError(f"job {self.job_id!r}: give rank or energy, not both")
        if self.rank is not None and (isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1):
            raise InputError(f"job {self.job_id!r}: rank must be an int >= 1, got {self.rank!r}")
        if self.energy is not None and not (isinstance(self.energy, (int, float)) and 0 < self.energy <= 1):
            raise InputError(f"job {self.job_id!r}: energy must be in (0, 1], got {self.energy!r}")
        if not isinstance(self.threads, int) or self.threads < 1:
            raise InputError(f"job {self.job_id!r}: threads must be an int >= 1, got {self.threads!r}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "ExtractJob":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise InputError(f"job {d.get('job_id', '?')!r}: unknown field(s) {unknown}; allowed: {sorted(known)}")
        return cls(**d)


def run_job(job: dict[str, Any]) -> dict[str, Any]:
    """Run one job given as its dict (what executors ship); returns its result dict."""
    kind = job.get("kind")
    if kind == "train":
        return run_train_job(TrainJob.from_dict(job))
    if kind == "extract":
        return run_extract_job(ExtractJob.from_dict(job))
    raise InputError(f"job {job.get('job_id')!r}: unknown kind {kind!r} (expected 'train' or 'extract')")


# ---------------------------------------------------------------------- training
def run_train_job(job: TrainJob) -> dict[str, Any]:
    """Train, gate and save one domain skill; returns the card's path, SHA-256, the gate report
    and the training summary. The card is saved whether or not it passed (the factory decides
    what to publish); its metadata carries the validation report."""
    import torch

    from ..cards import LoRACard, LoRAFormat, fingerprint_model
    from ..learn import LoRATrainer, validate
    from ..learn._engine import as_engine

    t0 = time.perf_counter()
    engine = _engine(job.engine)
    model = as_engine(engine).model
    with _threads(job.threads):
        base_fp = fingerprint_model(model)
        start = None
        if job.start_card:
            start = LoRAFormat.load(job.start_card, verify=True)
            if start.base_fingerprint not in (None, base_fp):
                start = None  # made for another base: train from scratch rather than mix bases
        targets = start.modules if start is not None else job.target_modules
        originals: dict[str, torch.Tensor] = {}
        try:
            if start is not None:
                # warm start: train the new factors on top of the previous skill merged into the
                # weights, then fold both into one card of the job's rank (combine_factors)
                with torch.no_grad():
                    for key in start.modules:
                        w = model.get_submodule(key).weight
                        originals[key] = w.detach().clone()
                        w += start.delta(key).to(w.dtype)
            card, report = LoRATrainer(engine).train(
                job.train, rank=job.rank, alpha=job.alpha, target_modules=targets, epochs=job.epochs,
                lr=job.lr, batch_size=job.batch_size, seed=job.seed, name=job.name, progress=False)
        finally:
            with torch.no_grad():
                for key, w0 in originals.items():
                    model.get_submodule(key).weight.copy_(w0)
        meta = dict(card.metadata)
        if start is not None:
            from .subspace import combine_factors

            A, B, kept = {}, {}, {}
            for key in card.modules:
                terms = [(card.scaling(key), card.weights_B[key], card.weights_A[key])]
                if key in start.modules:
                    terms.insert(0, (start.scaling(key), start.weights_B[key], start.weights_A[key]))
                B[key], A[key], kept[key] = combine_factors(terms, job.rank, job.alpha)
            meta["warm_start"] = json.dumps({"from": Path(job.start_card).name,
                                             "energy_kept_min": round(min(kept.values()), 6)}, sort_keys=True)
            card = LoRACard(name=job.name, rank=job.rank, alpha=float(job.alpha), target_modules=sorted(A),
                            weights_A=A, weights_B=B, metadata=meta, naming=card.naming, base_fingerprint=base_fp)
        card.metadata.update(job.metadata)
        card.metadata["description"] = job.metadata.get("description", card.metadata.get("description", ""))
        distractors = [a for _, a in job.train]
        val = validate(card, engine, job.heldout, job.guard, margin=job.margin, max_drift=job.max_drift,
                       distractors=distractors)
        out = Path(job.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        LoRAFormat.save(card, out)
    return {"job_id": job.job_id, "kind": "train", "card": str(out), "sha256": file_sha256(out),
            "passed": bool(val.passed), "validation": val.to_dict(),
            "training": {"steps": report.steps, "final_loss": _finite(report.final_loss),
                         "first_loss": _finite(report.losses[0]) if report.losses else None,
                         "seconds": round(report.seconds, 3)},
            "warm_start": start is not None, "seconds": round(time.perf_counter() - t0, 3),
            "pid": os.getpid()}


def _finite(x: float) -> float | None:
    return float(x) if math.isfinite(x) else None


# ---------------------------------------------------------------------- extraction
def run_extract_job(job: ExtractJob) -> dict[str, Any]:
    """Extract one card (see :class:`ExtractJob`); returns path, SHA-256, modules, energy."""
    from ..cards import LoRAFormat
    from ..extract import LoRAExtractor

    t0 = time.perf_counter()
    for f in ("base", "tuned"):
        if not Path(getattr(job, f)).exists():
            raise InputError(f"job {job.job_id!r}: {f} checkpoint {getattr(job, f)} does not exist")
    rank = job.rank if job.rank is not None else (None if job.energy is not None else 16)
    alpha = job.alpha if job.alpha is not None else float(2 * (rank or job.max_rank or 16))
    with _threads(job.threads):
        ex = LoRAExtractor(rank=rank or 16, alpha=alpha, seed=job.seed, progress=False)
        card = ex.extract_delta(job.tuned, job.base, rank=rank if job.energy is None else None,
                                energy=job.energy, max_rank=job.max_rank, include=job.include,
                                exclude=job.exclude, name=job.name or Path(job.out).name.split(".")[0],
                                description=job.description)
        out = Path(job.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        LoRAFormat.save(card, out)
    return {"job_id": job.job_id, "kind": "extract", "card": str(out), "sha256": file_sha256(out),
            "modules": len(card.modules), "energy_fraction": float(card.metadata.get("energy_fraction", "nan")),
            "bytes": out.stat().st_size, "seconds": round(time.perf_counter() - t0, 3), "pid": os.getpid()}
