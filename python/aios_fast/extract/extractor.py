"""LoRAExtractor: skill cards from the difference between a tuned model and its base.

For every adapted module the delta ΔW = W_tuned − W_base is factorised by
:func:`aios_fast.linalg.truncated_svd` (never formed in full precision when the fp32 copy
would not fit, see there), truncated to ``U_k S_k V_kᵀ`` and stored in PEFT orientation with
the scale accounted for:

    A = s · √S_k · V_kᵀ   (r, in),   B = s · U_k · √S_k   (out, r),   s = √(r / alpha)

so that the card's ``(alpha / r) · B @ A`` is exactly ``U_k S_k V_kᵀ`` — the best rank-r
approximation of the delta (Eckart–Young), whatever alpha the card advertises.
"""

from __future__ import annotations

import json
import math
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ..errors import InputError
from ..linalg import SVD_METHODS, truncated_svd
from .sources import WeightSource, open_source

__all__ = ["LoRAExtractor", "ModuleResult", "DEFAULT_SKIP"]

# Token embeddings and output heads: huge vocab-sized matrices that LoRA users usually leave
# alone (mergekit's users ask for the choice); decompose them with include_embeddings=True.
DEFAULT_SKIP = r"(^|\.)(embed_tokens|word_embeddings|position_embeddings|token_type_embeddings|wte|wpe|lm_head|embed_out)$"

# The exact nuclear fraction needs the whole spectrum (a full SVD, what we exist to avoid):
# computed only for modules this small; above, estimated (see ModuleResult.nuclear).
_EXACT_NUCLEAR_ELEMS = 1 << 16


@dataclass
class ModuleResult:
    """What extraction measured on one module."""

    key: str
    shape: tuple[int, int]
    rank: int
    energy: float  # Σσ²(kept) / ‖ΔW‖²_F, true Frobenius norm
    nuclear: float  # Σσ(kept) / Σσ
    # False: Σσ estimated as Σ(sketch's ℓ values) + √(c·R), with R = ‖ΔW‖²_F − Σσ²(sketch) the
    # energy left outside the sketch and c the number of remaining singular values — the
    # largest tail Cauchy–Schwarz allows (a flat tail), so the fraction is a lower bound.
    nuclear_exact: bool
    frob: float  # ‖ΔW‖_F
    seconds: float
    A: torch.Tensor | None = None
    B: torch.Tensor | None = None
    status: str = "kept"  # kept | low_variance | dropped | unchanged

    def summary(self) -> dict[str, Any]:
        return {"module": self.key, "shape": list(self.shape), "rank": self.rank,
                "energy": round(self.energy, 6), "nuclear": round(self.nuclear, 6),
                "nuclear_exact": self.nuclear_exact, "frob": self.frob,
                "seconds": round(self.seconds, 4), "status": self.status}


@dataclass
class LoRAExtractor:
    """Extract LoRA skill cards (deltas) or principal factors (PiSSA) from weights.

    Args:
        rank: default rank of each module's factors.
        alpha: the card's ``lora_alpha``; factors are scaled so the applied card reproduces
            the truncated delta exactly for any alpha.
        min_explained_variance: threshold on the *energy* fraction Σσ²(kept)/‖ΔW‖²_F; modules
            below it are flagged in the card metadata (``on_low_variance="flag"``) or left out
            (``"drop"``).
        oversample, power_iters, seed: passed to :func:`aios_fast.linalg.truncated_svd`
            (``None`` / ``"auto"``: its defaults).
        svd_method: ``"krylov"`` (default) or ``"subspace"``, truncated_svd's ``method``.
        include_embeddings: also decompose embedding and output-head matrices (skipped by
            default, see ``DEFAULT_SKIP``).
        device: where the SVDs run (``"cpu"``, ``"cuda"``).
        dtype: dtype of the card's factors.
        workers: modules decomposed concurrently (threads; the kernels release the GIL).
        progress: show a rich progress bar.
    """

    rank: int = 8
    alpha: float = 16.0
    min_explained_variance: float | None = None
    on_low_variance: str = "flag"
    oversample: int | None = None
    power_iters: int | str = "auto"
    svd_method: str = "krylov"
    seed: int = 0
    include_embeddings: bool = False
    device: str = "cpu"
    dtype: torch.dtype = torch.float32
    workers: int = 1
    progress: bool = False
    last_results: list[ModuleResult] = field(default_factory=list, init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise InputError(f"LoRAExtractor: rank must be an int ≥ 1, got {self.rank!r}")
        if not isinstance(self.alpha, (int, float)) or not math.isfinite(self.alpha) or self.alpha <= 0:
            raise InputError(f"LoRAExtractor: alpha must be a finite number > 0, got {self.alpha!r}")
        mev = self.min_explained_variance
        if mev is not None and not (isinstance(mev, (int, float)) and 0.0 <= mev <= 1.0):
            raise InputError(f"LoRAExtractor: min_explained_variance must be in [0, 1] or None, got {mev!r}")
        if self.on_low_variance not in ("flag", "drop"):
            raise InputError(f"LoRAExtractor: on_low_variance must be 'flag' or 'drop', got {self.on_low_variance!r}")
        if self.svd_method not in SVD_METHODS:
            raise InputError(f"LoRAExtractor: svd_method must be one of {', '.join(map(repr, SVD_METHODS))}, "
                             f"got {self.svd_method!r}")
        if not isinstance(self.workers, int) or self.workers < 1:
            raise InputError(f"LoRAExtractor: workers must be an int ≥ 1, got {self.workers!r}")
        if self.dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
            raise InputError(f"LoRAExtractor: dtype must be a float dtype, got {self.dtype}")
        self.device = str(self.device)

    # ------------------------------------------------------------------ public API
    def extract(self, W: torch.Tensor, rank: int | None = None) -> tuple[torch.Tensor, torch.Tensor, float]:
        """Principal factors of a weight itself: ``W ≈ B @ A`` with ``A = √S_r V_rᵀ`` (r, in) and
        ``B = U_r √S_r`` (out, r); returns ``(A, B, explained_variance)`` (energy fraction).

        This is a principal-component factorisation (PiSSA initialisation, Meng et al. 2024;
        or compression), NOT a skill: adding ``B @ A`` on top of ``W`` would double the layer,
        so never publish it as an additive card — use :meth:`extract_delta` for skills.
        """
        r = self.rank if rank is None else rank
        res = truncated_svd(_tensor(W, "W"), r, oversample=self.oversample, power_iters=self.power_iters,
                            seed=self.seed, device=self.device, method=self.svd_method)
        root = res.S.clamp_min(0).sqrt()
        A = (root[:, None] * res.Vh).to(self.dtype).cpu()
        B = (res.U * root[None, :]).to(self.dtype).cpu()
        return A, B, res.energy_fraction

    def extract_delta(self, tuned, base, *, rank: int | None = None, energy: float | None = None,
                      sv_ratio: float | None = None, epsilon: float | None = None,
                      max_rank: int | None = None, include: str | None = None,
                      exclude: str | None = None, name: str = "extracted", module: str = "delta",
                      description: str | None = None, base_fingerprint: str | bool | None = None):
        """A :class:`~aios_fast.cards.LoRACard` of ``tuned − base``.

        ``tuned``/``base``: two tensors (the card has one module, named ``module``), two state
        dicts / ``nn.Module``s, or two checkpoint paths (see :mod:`aios_fast.extract.sources`;
        streamed module by module). At most one of:

        * ``rank``: fixed rank per module (default ``self.rank``);
        * ``energy``: per module, the smallest rank keeping this fraction of ‖ΔW‖²_F
          (capped by ``max_rank``, default min(m, n));
        * ``sv_ratio``: keep σᵢ ≥ sv_ratio·σ₁ among the top ``max_rank`` (default 64);
        * ``epsilon``: keep σᵢ > epsilon (absolute) among the top ``max_rank`` (default 64).

        ``include``/``exclude``: the package's selection rule on module keys
        (:func:`aios_fast.cards.naming.select_modules`: a regex searched in the key, or a list of
        names / ``.``-suffixes). Unchanged modules
        (ΔW = 0) are left out. ``base_fingerprint``: a string to record, ``True`` to compute
        ``fingerprint_model`` of the base (default: computed when base is a state dict or
        module). Metadata ``explained_variance`` holds per-module ``energy`` (exact: the true
        ‖ΔW‖_F comes from the fused pass) and ``nuclear`` Σσ(kept)/Σσ fractions (JSON).
        The nuclear fraction needs every σ: it is exact (``nuclear_exact``) for modules of at
        most 2^16 elements and otherwise a lower bound from the sketch's spectrum plus the
        largest tail the leftover energy allows. ``energy_fraction`` is the total
        Σσ²(kept)/Σ‖ΔW‖²_F over all selected modules.
        """
        mode = _mode(rank, energy, sv_ratio, epsilon, self.rank)
        if isinstance(tuned, torch.Tensor) or isinstance(base, torch.Tensor):
            if not (isinstance(tuned, torch.Tensor) and isinstance(base, torch.Tensor)):
                raise InputError("extract_delta: pass two tensors, two state dicts or two paths, not a mix")
            tsrc = open_source({module + ".weight": tuned}, "tuned")
            bsrc = open_source({module + ".weight": base}, "base")
        else:
            tsrc, bsrc = open_source(tuned, "tuned"), open_source(base, "base")
        keys = self.select_modules(tsrc, bsrc, include, exclude)
        plan = [(k, mode, max_rank) for k in keys]
        fp = _resolve_fingerprint(base, bsrc, base_fingerprint)
        return self._build(tsrc, bsrc, plan, name=name, description=description,
                           base_fingerprint=fp, extra={"mode": json.dumps(mode)})

    def extract_from_heat_map(self, tuned, base, heat_map, rank_budget: int, *, score: str | None = None,
                              min_rank: int = 1, max_rank: int | None = None, name: str = "extracted",
                              description: str | None = None, base_fingerprint: str | bool | None = None):
        """Probe-guided extraction: spend a total ``rank_budget`` over the hottest modules of a
        :class:`~aios_fast.probe.HeatMap`.

        Module ranks are proportional to the heat score (``heat_map.scores(score)``), at least
        ``min_rank``, at most ``max_rank`` and min(m, n); modules are served hottest first
        until the budget is spent, so cold modules get nothing. Heat-map names in
        ArrowEngine's scheme are translated to the checkpoint's HF keys.
        """
        if not isinstance(rank_budget, int) or rank_budget < 1:
            raise InputError(f"extract_from_heat_map: rank_budget must be an int ≥ 1, got {rank_budget!r}")
        tsrc, bsrc = open_source(tuned, "tuned"), open_source(base, "base")
        keys = set(self.select_modules(tsrc, bsrc, None, None))
        from ..cards import naming

        scores: dict[str, float] = {}
        for mod, s in heat_map.scores(score).items():
            key = mod if mod in keys else _safe_to_hf(naming, mod)
            if key in keys and math.isfinite(s) and s > 0:
                scores[key] = max(scores.get(key, 0.0), float(s))
        if not scores:
            raise InputError(f"extract_from_heat_map: no heat-map module matches a changed weight "
                             f"(heat map: {heat_map.modules[:3]}..., checkpoint: {sorted(keys)[:3]}...)")
        ranks = allocate_budget(scores, rank_budget, {k: min(tsrc.shape(k)) for k in scores},
                                min_rank=min_rank, max_rank=max_rank)
        plan = [(k, ("rank", r), None) for k, r in ranks.items()]
        fp = _resolve_fingerprint(base, bsrc, base_fingerprint)
        return self._build(tsrc, bsrc, plan, name=name, description=description,
                           base_fingerprint=fp,
                           extra={"heat_map_budget": str(rank_budget), "heat_map_score": str(score or heat_map.default_score())})

    def select_modules(self, tsrc: WeightSource, bsrc: WeightSource, include: str | None,
                       exclude: str | None) -> list[str]:
        """Keys of 2-D weights present in both sources with equal shapes, after the filters."""
        common = sorted(set(tsrc) & set(bsrc))
        if not common:
            raise InputError(f"extract: the checkpoints share no 2-D weight: tuned has {sorted(tsrc)[:3]}..., "
                             f"base has {sorted(bsrc)[:3]}...")
        bad = [k for k in common if tsrc.shape(k) != bsrc.shape(k)]
        if bad:
            raise InputError(f"extract: shapes differ for {bad[:3]} (e.g. {tsrc.shape(bad[0])} vs "
                             f"{bsrc.shape(bad[0])}); are these checkpoints of the same architecture?")
        # the package's one selection rule (cards.naming.select_modules): a regex searched in
        # the key, or a list of module names / '.'-suffixes
        from ..cards.naming import select_modules

        class _NoMatch(Exception):
            pass

        try:
            chosen = (set(select_modules(common, include, what="extract: include", error=_NoMatch))
                      if include is not None else None)
        except _NoMatch:
            chosen = set()  # reported below as "no module left", with both filters
        try:
            dropped = set(select_modules(common, exclude, what="extract: exclude", error=_NoMatch)
                          if exclude is not None else ())
        except _NoMatch:
            dropped = set()
        skip = None if self.include_embeddings else re.compile(DEFAULT_SKIP)
        out = [k for k in common
               if (chosen is None or k in chosen) and k not in dropped
               and not (skip is not None and skip.search(k))]
        if not out:
            raise InputError(f"extract: no module left after include={include!r} exclude={exclude!r} "
                             f"(and the embedding/head skip: include_embeddings={self.include_embeddings})")
        return out

    # ------------------------------------------------------------------ internals
    def decompose(self, key: str, T: torch.Tensor, B: torch.Tensor, mode: tuple[str, Any],
                  max_rank: int | None = None) -> ModuleResult:
        """Truncated SVD of one module's ``T − B`` into card factors (see the module docstring)."""
        t0 = time.perf_counter()
        m, n = T.shape
        small = min(m, n)
        kind, value = mode
        kw = dict(oversample=self.oversample, power_iters=self.power_iters, seed=self.seed, device=self.device,
                  method=self.svd_method)
        if kind == "rank":
            res = truncated_svd((T, B), min(value, small), **kw)
        elif kind == "energy":
            res = truncated_svd((T, B), energy=value, max_rank=min(max_rank or small, small), **kw)
        else:
            res = truncated_svd((T, B), min(max_rank or 64, small), **kw)
        fro2 = res.frob_sq
        if fro2 == 0.0:
            return ModuleResult(key, (m, n), 0, 1.0, 1.0, True, 0.0, time.perf_counter() - t0, status="unchanged")
        S = res.S
        if kind == "sv_ratio":
            keep = int((S >= value * S[0]).sum())
        elif kind == "epsilon":
            keep = int((S > value).sum())
        else:
            keep = int(S.numel())
        if keep == 0:
            return ModuleResult(key, (m, n), 0, 0.0, 0.0, False, math.sqrt(fro2), time.perf_counter() - t0,
                                status="dropped")
        U, S, Vh = res.U[:, :keep], S[:keep], res.Vh[:keep]
        energy = float((S.double() ** 2).sum()) / fro2
        exact = m * n <= _EXACT_NUCLEAR_ELEMS
        if exact:
            full = torch.linalg.svdvals((T.to(torch.float64) - B.to(torch.float64)))
            total = float(full.sum())
        else:
            sk = res.sketch_S.double()
            rest = max(fro2 - float((sk ** 2).sum()), 0.0)
            total = float(sk.sum()) + math.sqrt(max(small - sk.numel(), 0) * rest)
        nuclear = float(S.double().sum()) / total if total > 0 else 1.0
        s = math.sqrt(keep / self.alpha)
        root = S.clamp_min(0).sqrt()
        A = ((s * root)[:, None] * Vh).to(self.dtype).cpu().contiguous()
        Bf = (U * (s * root)[None, :]).to(self.dtype).cpu().contiguous()
        status = "kept"
        if self.min_explained_variance is not None and energy < self.min_explained_variance:
            status = "low_variance" if self.on_low_variance == "flag" else "dropped"
        return ModuleResult(key, (m, n), keep, min(energy, 1.0), min(nuclear, 1.0), exact, math.sqrt(fro2),
                            time.perf_counter() - t0, A, Bf, status)

    def run(self, tsrc: WeightSource, bsrc: WeightSource, plan: list[tuple[str, tuple, int | None]],
            on_result: Callable[[ModuleResult], None] | None = None) -> list[ModuleResult]:
        """Decompose every planned module, streaming: each worker loads its module's two
        tensors, decomposes, and lets them go. Results are in plan order."""
        def one(item):
            key, mode, mr = item
            return self.decompose(key, tsrc[key], bsrc[key], mode, mr)

        results: list[ModuleResult] = []
        with _progress(self.progress, len(plan)) as advance:
            if self.workers == 1:
                for item in plan:
                    r = one(item)
                    results.append(r)
                    advance(r)
                    if on_result:
                        on_result(r)
            else:
                with ThreadPoolExecutor(self.workers) as pool:
                    for r in pool.map(one, plan):  # map keeps plan order; ≤ workers modules in flight
                        results.append(r)
                        advance(r)
                        if on_result:
                            on_result(r)
        self.last_results = results
        return results

    def _build(self, tsrc, bsrc, plan, *, name, description, base_fingerprint, extra):
        from ..cards import LoRACard

        results = self.run(tsrc, bsrc, plan)
        kept = [r for r in results if r.status in ("kept", "low_variance")]
        if not kept:
            if all(r.status == "unchanged" for r in results):
                raise InputError(f"extract: tuned and base are identical on all {len(results)} selected modules")
            raise InputError("extract: every module was dropped (below min_explained_variance or the "
                             "sv_ratio/epsilon threshold); lower the threshold")
        ranks = [r.rank for r in kept]
        default_rank = max(set(ranks), key=ranks.count)
        total = sum(r.frob ** 2 for r in results)
        captured = sum(r.energy * r.frob ** 2 for r in kept)
        meta = {
            "source": "aios-fast extract (randomized truncated SVD of tuned − base)",
            "explained_variance": json.dumps({r.key: {"energy": round(r.energy, 6), "nuclear": round(r.nuclear, 6),
                                                      "nuclear_exact": r.nuclear_exact, "rank": r.rank}
                                              for r in kept}, sort_keys=True),
            "energy_fraction": f"{captured / total if total else 1.0:.6f}",
            **extra,
        }
        low = [r.key for r in results if r.status == "low_variance"]
        if low:
            meta["low_variance_modules"] = ",".join(low)
        dropped = [r.key for r in results if r.status == "dropped"]
        if dropped:
            meta["dropped_modules"] = ",".join(dropped)
        if description:
            meta["description"] = description
        return LoRACard(
            name=name, rank=default_rank, alpha=float(self.alpha), target_modules=[r.key for r in kept],
            weights_A={r.key: r.A for r in kept}, weights_B={r.key: r.B for r in kept}, metadata=meta,
            rank_pattern={r.key: r.rank for r in kept if r.rank != default_rank},
            naming="hf", base_fingerprint=base_fingerprint)


def allocate_budget(scores: Mapping[str, float], budget: int, caps: Mapping[str, int], *,
                    min_rank: int = 1, max_rank: int | None = None) -> dict[str, int]:
    """Split ``budget`` ranks over modules in proportion to ``scores`` (hottest first), each at
    least ``min_rank`` and at most its cap / ``max_rank``; modules the budget does not reach get
    none. Returns key -> rank in descending score order."""
    order = sorted(scores, key=lambda k: (-scores[k], k))
    cap = {k: min(caps[k], max_rank or caps[k]) for k in order}
    total = sum(scores.values())
    want = {k: max(min_rank, int(budget * scores[k] / total)) for k in order}
    out: dict[str, int] = {}
    left = budget
    for k in order:
        r = min(want[k], cap[k], left)
        if r < min_rank:
            break
        out[k] = r
        left -= r
    # Leftover (from rounding down or caps): hottest modules first, one rank at a time.
    while left > 0:
        grew = False
        for k in out:
            if left > 0 and out[k] < cap[k]:
                out[k] += 1
                left -= 1
                grew = True
        if not grew:
            break
    return out


def _mode(rank, energy, sv_ratio, epsilon, default_rank):
    given = {k: v for k, v in (("rank", rank), ("energy", energy), ("sv_ratio", sv_ratio), ("epsilon", epsilon))
             if v is not None}
    if len(given) > 1:
        raise InputError(f"extract_delta: pass at most one of rank/energy/sv_ratio/epsilon, got {sorted(given)}")
    if not given:
        return ("rank", default_rank)
    kind, v = next(iter(given.items()))
    if kind == "rank" and (isinstance(v, bool) or not isinstance(v, int) or v < 1):
        raise InputError(f"extract_delta: rank must be an int ≥ 1, got {v!r}")
    if kind in ("energy", "sv_ratio") and not (isinstance(v, (int, float)) and 0 < v <= 1):
        raise InputError(f"extract_delta: {kind} must be in (0, 1], got {v!r}")
    if kind == "epsilon" and not (isinstance(v, (int, float)) and v >= 0):
        raise InputError(f"extract_delta: epsilon must be ≥ 0, got {v!r}")
    return (kind, v)


def _tensor(x, what):
    if not isinstance(x, torch.Tensor):
        raise InputError(f"extract: {what} must be a torch.Tensor, got {type(x).__name__}")
    return x.detach()


def _safe_to_hf(naming, name):
    try:
        return naming.to_hf(name)
    except Exception:  # not an ArrowEngine name: keep as is
        return name


class _progress:
    def __init__(self, enabled: bool, total: int):
        self.enabled, self.total = enabled, total

    def __enter__(self):
        if not self.enabled:
            return lambda r: None
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

        self.p = Progress(TextColumn("[bold]extract"), BarColumn(), MofNCompleteColumn(),
                          TimeRemainingColumn(), TextColumn("{task.description}"))
        self.p.__enter__()
        task = self.p.add_task("", total=self.total)

        def advance(r: ModuleResult):
            self.p.update(task, advance=1, description=f"{r.key} r={r.rank} E={r.energy:.3f}")
        return advance

    def __exit__(self, *exc):
        if self.enabled:
            self.p.__exit__(*exc)
        return False


def _resolve_fingerprint(base, bsrc, requested: str | bool | None) -> str | None:
    """The card's base fingerprint: a given string as is; ``True`` computes it; ``None`` computes
    it only when the base is in memory (a state dict or a module), since for a checkpoint path
    it would mean reading the whole base model once more."""
    fp = requested
    if fp is None:
        fp = isinstance(base, (Mapping, torch.nn.Module)) and not isinstance(base, WeightSource)
    if fp is True:
        from ..cards import fingerprint_model
        fp = fingerprint_model(bsrc.full_state())
    return fp or None

