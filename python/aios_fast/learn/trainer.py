"""LoRATrainer: turn (question, answer) pairs into a LoRA skill card.

Objectives:
- ``"contrastive"`` (encoders): in-batch negatives over (question, answer) pairs, cosine
  similarity × ``scale`` (20) then cross-entropy against the diagonal - the
  MultipleNegativesRankingLoss of sentence-transformers (Henderson et al. 2017, "Efficient
  Natural Language Response Suggestion"), with the engine's own (mean) pooling; batches never hold
  one answer twice and same-answer logits are masked (the default recipe, ``learn/recipe.py``).
- ``"sft"`` (causal LMs): next-token cross-entropy on the answer tokens only; the chat-templated
  prompt and the padding are masked with -100.

PiSSA cards: training runs on ``W_res = W − s·B₀A₀`` with trainable factors starting at
(A₀, B₀). Applied to the ORIGINAL base the card must give ``W_res + s·B_tA_t = W + s·(B_tA_t −
B₀A₀)``, a delta of rank ≤ 2r, so it is published exactly as a rank-2r card
``B' = [B_t, −B₀]``, ``A' = [A_t; A₀]`` with alpha 2·alpha (the scaling alpha/r is unchanged).
"""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from .._atomic import save_figure
from ..errors import InputError, TrainingDivergedError
from ._engine import as_engine, as_pairs
from ._inject import TRAIN_ADAPTER, init_factors, injected, resolve_targets
from .recipe import ContrastiveData, lr_factor, plan_batches

__all__ = ["LoRATrainer", "TrainConfig", "TrainingReport"]


@dataclass
class TrainConfig:
    """Hyper-parameters of one training run (validated on construction)."""

    # None fields take the objective's default recipe (learn/recipe.py OBJECTIVE_DEFAULTS)
    objective: str = "contrastive"
    rank: int | None = None
    alpha: float | None = None
    target_modules: Sequence[str] | str | None = None
    epochs: int | None = None
    lr: float | None = None
    batch_size: int = 16
    init: str = "default"
    seed: int = 0
    scale: float = 20.0           # contrastive: cosine -> logits multiplier
    weight_decay: float = 0.0
    max_grad_norm: float | None = None  # 0 = no clipping
    schedule: str | None = None   # "constant" | "linear" | "cosine" decay after the warm-up
    warmup_ratio: float | None = None
    batching: str | None = None   # "unique": no answer group twice in a batch; "random"
    near_duplicate: float = 0.95  # base-encoder cosine at which two answers count as one
    hard_negatives: int | None = None  # per question, mined with the base encoder
    symmetric: bool | None = None  # contrastive: also answer -> question
    # encoders on a CPU: texts per length bucket of a forward (EngineView.embed_texts); None: one
    # padded batch. Off by default: it trains a different seeded card (dropout draws its masks in
    # another order), and the figures quoted for this recipe were measured without it
    length_buckets: int | None = None
    explode_factor: float = 2.0   # loss > factor·(mean earlier loss) + explode_margin: divergence
    explode_margin: float = 1.0

    def __post_init__(self) -> None:
        def check(name, ok, want):
            if not ok:
                raise InputError(f"{name}: expected {want}, got {getattr(self, name)!r}")
        check("objective", self.objective in ("contrastive", "sft"), "'contrastive' or 'sft'")
        from .recipe import BATCHING, SCHEDULES, resolve_defaults

        resolve_defaults(self)
        check("schedule", self.schedule in SCHEDULES, f"one of {SCHEDULES}")
        check("warmup_ratio", isinstance(self.warmup_ratio, (int, float)) and 0 <= self.warmup_ratio < 1, "a number in [0, 1)")
        check("batching", self.batching in BATCHING, f"one of {BATCHING}")
        check("near_duplicate", isinstance(self.near_duplicate, (int, float)) and 0 < self.near_duplicate <= 1, "a number in (0, 1]")
        check("hard_negatives", isinstance(self.hard_negatives, int) and self.hard_negatives >= 0, "an int >= 0")
        check("length_buckets", self.length_buckets is None or (
            isinstance(self.length_buckets, int) and not isinstance(self.length_buckets, bool)
            and self.length_buckets >= 1), "None or an int >= 1")
        check("symmetric", isinstance(self.symmetric, bool) and not (self.symmetric and self.batching == "grouped"),
              "True or False (False with batching 'grouped': a grouped batch has several questions per answer)")
        check("rank", isinstance(self.rank, int) and not isinstance(self.rank, bool) and self.rank > 0, "an int > 0")
        check("alpha", isinstance(self.alpha, (int, float)) and math.isfinite(self.alpha) and self.alpha > 0, "a finite number > 0")
        check("epochs", isinstance(self.epochs, int) and self.epochs > 0, "an int > 0")
        check("lr", isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0, "a finite number > 0")
        check("batch_size", isinstance(self.batch_size, int) and self.batch_size > 0, "an int > 0")
        check("init", self.init in ("default", "pissa"), "'default' or 'pissa'")
        check("seed", isinstance(self.seed, int), "an int")
        check("scale", self.scale > 0, "> 0")
        check("explode_factor", self.explode_factor > 1, "> 1")

    @property
    def scaling(self) -> float:
        return float(self.alpha) / self.rank


@dataclass
class TrainingReport:
    """What happened in a run: per-step losses, throughput, time, device, steps."""

    objective: str
    device: str
    steps: int = 0
    samples: int = 0
    seconds: float = 0.0
    samples_per_sec: float = 0.0
    losses: list[float] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    target_modules: list[str] = field(default_factory=list)
    diverged: bool = False
    reason: str = ""

    @property
    def final_loss(self) -> float:
        return float("nan") if not self.losses else float(sum(self.losses[-5:]) / len(self.losses[-5:]))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["final_loss"] = self.final_loss
        return d

    def save_png(self, path: str | Path) -> Path:
        """Loss curve (per step) as a PNG, written atomically."""
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 3.5))
        ax.plot(range(1, len(self.losses) + 1), self.losses, lw=1.5)
        ax.set_xlabel("step")
        ax.set_ylabel(f"{self.objective} loss")
        ax.set_title(f"LoRA training ({self.samples_per_sec:.1f} samples/s on {self.device})")
        ax.grid(alpha=0.3)
        fig.tight_layout()
        return save_figure(fig, path, dpi=110)


class LoRATrainer:
    """Trains LoRA skills on a ``SentenceEncoder``, a ``CausalLM`` or a ``(model, tokenizer)``.

    The base model is never left modified: adapters are injected for the run only and the
    original modules and weights restored bit-for-bit afterwards (also on error).
    """

    def __init__(self, engine: Any) -> None:
        self.view = as_engine(engine)

    @property
    def model(self):
        return self.view.model

    def train(self, pairs: Any, objective: str | None = None, rank: int | None = None, alpha: float | None = None,
              target_modules: Sequence[str] | str | None = None, epochs: int | None = None, lr: float | None = None,
              batch_size: int = 16, init: str = "default", seed: int = 0, device: str | None = None,
              name: str = "skill", progress: bool = True,
              on_trained: Callable[[torch.nn.Module], None] | None = None, **options: Any):
        """Train and return ``(LoRACard, TrainingReport)``.

        Args:
            pairs: (question, answer) tuples, mappings with query/answer, or a QALogger table.
            objective: "contrastive" (default for encoders) or "sft" (default for causal LMs).
            rank, alpha: LoRA rank and alpha (ΔW = alpha/rank · B @ A).
            target_modules: keys, key suffixes or a regex, among the model's ``nn.Linear`` and
                GPT-2 ``Conv1D`` layers (a Conv1D card has PEFT's orientation, A (r, in), B (out, r)).
            epochs, lr, batch_size, seed: optimisation (AdamW); same seed on CPU -> same card.
            rank, alpha, target_modules, epochs, lr (and the options schedule, warmup_ratio,
                max_grad_norm, batching, hard_negatives, symmetric) left None take the
                objective's measured default recipe, :data:`aios_fast.learn.recipe.OBJECTIVE_DEFAULTS`.
            init: "default" (PEFT: A Kaiming-uniform, B = 0) or "pissa" (principal factors).
            device: move the model there for training (it is moved back afterwards).
            name: the card's name. progress: show a rich progress bar (on a terminal).
            on_trained: called with the model while the trained adapters are still in place
                (eval mode), e.g. to record the training-time outputs.
            options: further :class:`TrainConfig` fields (scale, weight_decay, max_grad_norm, ...).
        Raises:
            TrainingDivergedError: NaN/inf or exploding loss; ``exc.report`` holds the report.
        """
        view = self.view
        cfg = TrainConfig(objective=objective or ("sft" if view.kind == "causal" else "contrastive"),
                          rank=rank, alpha=alpha, target_modules=target_modules, epochs=epochs, lr=lr,
                          batch_size=batch_size, init=init, seed=seed, **options)
        if cfg.objective == "contrastive" and view.kind != "encoder":
            raise InputError("objective 'contrastive' needs an encoder; use 'sft' for a causal LM")
        if cfg.objective == "sft" and view.kind != "causal":
            raise InputError("objective 'sft' needs a causal LM; use 'contrastive' for an encoder")
        data = as_pairs(pairs)
        if len(data) < 2:
            raise InputError(f"pairs: need at least 2 pairs, got {len(data)}")
        model = view.model
        home = view.device
        dev = torch.device(device) if device else home
        keys = resolve_targets(model, cfg.target_modules)
        from ..cards import fingerprint_model
        from ..lora.layer import base_state_dict

        # the base model's, as LoRAManager computes it (cards applied meanwhile left out)
        fingerprint = fingerprint_model(base_state_dict(model))
        report = TrainingReport(objective=cfg.objective, device=str(dev), config=_jsonable(cfg),
                                target_modules=keys)
        cuda_ids = [dev.index if dev.index is not None else torch.cuda.current_device()] \
            if dev.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda_ids):
            torch.manual_seed(cfg.seed)
            gen = torch.Generator().manual_seed(cfg.seed)
            A0, B0, residual = init_factors(model, keys, cfg.rank, cfg.scaling, cfg.init, gen)
            gen = torch.Generator().manual_seed(cfg.seed)  # data order independent of the init
            if dev != home:
                model.to(dev)
            buckets, view.length_buckets = view.length_buckets, cfg.length_buckets
            try:
                # answer groups and hard negatives come from the base encoder, before injection
                prep = ContrastiveData(view, data, cfg) if cfg.objective == "contrastive" else None
                with injected(model, A0, B0, cfg.scaling, residual, train=True) as layers:
                    self._loop(cfg, data, layers, gen, report, progress, prep)
                    model.eval()
                    A = {k: l.lora_A[TRAIN_ADAPTER].detach().to("cpu", torch.float32).clone()
                         for k, l in layers.items()}
                    B = {k: l.lora_B[TRAIN_ADAPTER].detach().to("cpu", torch.float32).clone()
                         for k, l in layers.items()}
                    if on_trained is not None:
                        with torch.no_grad():
                            on_trained(model)
            finally:
                view.length_buckets = buckets
                if dev != home:
                    model.to(home)
        return self._card(cfg, name, A, B, A0, B0, report, fingerprint), report

    # ------------------------------------------------------------------ internals
    def _loss(self, cfg: TrainConfig, batch: list[tuple[str, str]]) -> torch.Tensor:
        """SFT loss of a batch (the contrastive loss is :meth:`ContrastiveData.loss`)."""
        view = self.view
        nll, n = view.token_nll(view.sft_batch(batch))
        return nll / n.clamp_min(1)

    def _loop(self, cfg, data, layers, gen, report: TrainingReport, progress: bool,
              prep: ContrastiveData | None = None) -> None:
        from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

        params = [p for l in layers.values() for p in (l.lora_A[TRAIN_ADAPTER], l.lora_B[TRAIN_ADAPTER])]
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
        # every epoch's batches up front (ragged rest dropped: in-batch negatives need size)
        plan = prep.plan(gen) if prep is not None else plan_batches(
            range(len(data)), cfg.batch_size, cfg.epochs, gen, "random")
        bs = len(plan[0]) if plan else min(cfg.batch_size, len(data))
        total = len(plan)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda i: lr_factor(i, total, cfg.schedule, cfg.warmup_ratio))
        running = 0.0  # sum of the losses so far: their mean is the reference for "exploding"
        t0 = time.perf_counter()
        with Progress(TextColumn("[bold]train[/] {task.description}"), BarColumn(),
                      TextColumn("{task.completed}/{task.total} steps"), TimeRemainingColumn(),
                      transient=True, disable=not (progress and _interactive())) as bar:
            task = bar.add_task(f"{cfg.objective} r={cfg.rank}", total=total)
            for idx in plan:
                loss = prep.loss(idx) if prep is not None else self._loss(cfg, [data[i] for i in idx])
                value = float(loss.detach())
                step = len(report.losses)
                report.losses.append(value)
                why = None
                ref = running / step if step else None
                if not math.isfinite(value):
                    why = f"loss is {value} at step {step + 1}"
                elif ref is not None and value > cfg.explode_factor * ref + cfg.explode_margin:
                    why = (f"loss exploded to {value:.4g} at step {step + 1} "
                           f"(mean so far {ref:.4g}); lower lr (now {cfg.lr:g})")
                running += value
                if why is None:
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    limit = cfg.max_grad_norm if cfg.max_grad_norm else float("inf")
                    gnorm = float(torch.nn.utils.clip_grad_norm_(params, limit))
                    if not math.isfinite(gnorm):
                        why = f"gradient norm is {gnorm} at step {len(report.losses)}"
                if why is not None:
                    self._finish(report, t0, len(report.losses) - 1, bs)
                    report.diverged, report.reason = True, why
                    err = TrainingDivergedError(f"training diverged: {why}; no card was made")
                    err.report = report
                    raise err
                opt.step()
                sched.step()
                bar.advance(task)
        self._finish(report, t0, total, bs)

    @staticmethod
    def _finish(report: TrainingReport, t0: float, steps: int, bs: int) -> None:
        report.seconds = time.perf_counter() - t0
        report.steps = steps
        report.samples = steps * bs
        report.samples_per_sec = report.samples / report.seconds if report.seconds > 0 else 0.0

    def _card(self, cfg, name, A, B, A0, B0, report, fingerprint):
        from ..cards import LoRACard

        alpha = float(cfg.alpha)
        rank = cfg.rank
        if cfg.init == "pissa":  # publish the exact delta on the original base, rank 2r
            A = {k: torch.cat([A[k], A0[k]], 0).contiguous() for k in A}
            B = {k: torch.cat([B[k], -B0[k]], 1).contiguous() for k in B}
            rank, alpha = 2 * cfg.rank, 2 * alpha
        meta = {
            "description": f"LoRA skill trained by aios-fast ({cfg.objective}, init {cfg.init})",
            "source": "aios_fast.learn.LoRATrainer",
            "objective": cfg.objective, "init": cfg.init, "trained_rank": str(cfg.rank),
            "epochs": str(cfg.epochs), "lr": repr(float(cfg.lr)), "seed": str(cfg.seed),
            "steps": str(report.steps), "final_loss": repr(report.final_loss),
            "base_model": type(self.view.model).__name__,
        }
        return LoRACard(name=name, rank=rank, alpha=alpha, target_modules=sorted(A), weights_A=A,
                        weights_B=B, metadata=meta, naming="hf", base_fingerprint=fingerprint)


def _jsonable(cfg: TrainConfig) -> dict[str, Any]:
    d = asdict(cfg)
    if d["target_modules"] is not None and not isinstance(d["target_modules"], str):
        d["target_modules"] = list(d["target_modules"])
    return d


def _interactive() -> bool:
    import sys

    return sys.stderr.isatty()
