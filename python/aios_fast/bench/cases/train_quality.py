"""Skill quality of contrastive training on MiniLM: held-out recall@1 and MRR@10 of the base
model, ``LoRATrainer`` with its default recipe, sentence-transformers with a PEFT LoRA adapter
(``model.add_adapter(LoraConfig(...))``) and ``MultipleNegativesRankingLoss`` at the same rank
and targets, and a full fine-tune with the same loss; seconds per training run.

Data sets (fictional domains, questions written the way users ask; held-out questions phrased
differently from the training ones):

- tuning sets, used to CHOOSE the trainer's defaults: ``quillmere`` and ``tidewell``
  (``aios_fast/learn/data``: 30 answers, 60 training questions, 30 held-out questions each;
  the held-out questions retrieve the training answers);
- test set, never used for choosing: ``ferrowind`` (``tests/data/qa``: 45 training pairs,
  15 held-out pairs whose answers were not trained on).

Recall is measured among the held-out answers plus every training answer (the node's answer
pool), with :func:`aios_fast.learn.gate.retrieval_metrics`. Drift is 1 − mean cosine between
base and trained embeddings of the guard texts (the gate's measure).

    python -m aios_fast.bench.cases.train_quality --seeds 0 1 2      # the table, as JSON lines

Shared by ``aios-fast bench --only train_quality`` (:func:`run`: one figure per set, ours'
seconds per training run beside ST + PEFT's) and
``benchmarks/bench_train.py::test_train_quality_table`` (the Markdown table, same check).
Minutes long (3 sets × 3 seeds × 3 trainings, about 15 minutes on 2 cores), so ``--quick``
leaves it out ("not run").

Per set, on the means over seeds. Correctness (:func:`check_set`): ours learns (recall@1 and
MRR@10 above the base model's) with the guard drift under the gate's 0.15. Goals (issue 14,
:func:`quality_shortfalls` and the time ratio): at least ST + PEFT's recall@1 and MRR@10, ≥ 90 %
of the full fine-tune's recall@1 gain, at equal or lower time than ST + PEFT.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from ..core import BenchContext, CaseFailed, Figure, Goal, Measurement

__all__ = ["SETS", "TUNING_SETS", "TEST_SETS", "load_set", "guard_texts", "metrics", "run_ours",
           "run_st", "table", "summarize", "markdown", "check_set", "quality_shortfalls", "figures", "run", "DRIFT_BOUND",
           "SHARE_OF_FULL"]

_LEARN = Path(__file__).resolve().parents[2] / "learn" / "data"
_TESTS = Path(__file__).resolve().parents[4] / "tests" / "data" / "qa"
SETS = {"quillmere": (_LEARN / "quillmere_train.jsonl", _LEARN / "quillmere_heldout.jsonl"),
        "tidewell": (_LEARN / "tidewell_train.jsonl", _LEARN / "tidewell_heldout.jsonl"),
        "ferrowind": (_TESTS / "ferrowind_train.jsonl", _TESTS / "ferrowind_heldout.jsonl")}
TUNING_SETS = ("quillmere", "tidewell")
TEST_SETS = ("ferrowind",)
#: the peers' targets matching the trainer's default (every attention and feed-forward linear)
ST_TARGETS = ["query", "key", "value", "dense"]
DRIFT_BOUND = 0.15    # the gate's bound on guard drift
SHARE_OF_FULL = 0.9   # ours' share of the full fine-tune's recall@1 gain


def _jsonl(path: Path) -> list[tuple[str, str]]:
    rows = [json.loads(l) for l in path.read_text(encoding="utf-8").splitlines() if l.strip()]
    return [(r["query"], r["answer"]) for r in rows]


def load_set(name: str) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(training pairs, held-out pairs) of a named set."""
    train, held = SETS[name]
    return _jsonl(train), _jsonl(held)


def guard_texts() -> list[str]:
    return [l for l in (_LEARN / "guard.txt").read_text(encoding="utf-8").splitlines() if l.strip()]


def metrics(view: Any, train, held, guard_base: torch.Tensor | None = None) -> dict[str, float]:
    """recall@1, mrr@10 (held-out questions vs held-out + training answers) and guard drift."""
    from aios_fast.learn.gate import retrieval_metrics

    out = retrieval_metrics(view, held, distractors=[a for _, a in train])
    if guard_base is not None:
        out["drift"] = float(1.0 - (view.encode(guard_texts()) * guard_base).sum(1).mean())
    return out


def run_ours(encoder, name: str, seed: int, **options) -> dict[str, float]:
    """Train ``LoRATrainer`` (defaults unless ``options`` override) and measure."""
    from aios_fast.learn import LoRATrainer
    from aios_fast.learn._engine import EngineView
    from aios_fast.lora import LoRAManager

    train, held = load_set(name)
    view = EngineView(encoder)
    guard_base = view.encode(guard_texts())
    t0 = time.perf_counter()
    card, rep = LoRATrainer(encoder).train(train, seed=seed, progress=False, **options)
    seconds = time.perf_counter() - t0
    with LoRAManager(encoder.model).applied(card):
        m = metrics(view, train, held, guard_base)
    return dict(m, seconds=seconds, steps=rep.steps)


def _unique_batches(train, bs: int, epochs: int, seed: int) -> list[list[int]]:
    # sentence-transformers' NoDuplicatesBatchSampler rule (no text twice in a batch)
    from aios_fast.learn.recipe import plan_batches

    ids: dict[str, int] = {}
    groups = [ids.setdefault(a, len(ids)) for _, a in train]
    return plan_batches(groups, bs, epochs, torch.Generator().manual_seed(seed), "unique")


def run_st(name: str, seed: int, *, lora: bool, rank: int = 8, alpha: float = 16.0,
           targets: Sequence[str] = tuple(ST_TARGETS), epochs: int = 5, lr: float = 1e-3,
           batch_size: int = 16, warmup_ratio: float = 0.1) -> dict[str, float]:
    """sentence-transformers + MultipleNegativesRankingLoss, with a PEFT LoRA adapter
    (``lora=True``) or fully fine-tuned; duplicate-free batches and a warm-up + linear-decay
    schedule (what sentence-transformers' trainer recommends); AdamW."""
    from sentence_transformers import SentenceTransformer
    try:  # sentence-transformers >= 6 moved the losses
        from sentence_transformers.sentence_transformer.losses import MultipleNegativesRankingLoss
    except ImportError:
        from sentence_transformers.losses import MultipleNegativesRankingLoss

    from aios_fast.bundled import minilm_dir
    from aios_fast.learn._engine import EngineView
    from aios_fast.learn.recipe import lr_factor

    train, held = load_set(name)
    torch.manual_seed(seed)
    model = SentenceTransformer(str(minilm_dir()), device="cpu")
    hf = model[0].auto_model
    tok = model.tokenizer
    view = EngineView((hf, tok))
    guard_base = view.encode(guard_texts())
    how = "full"
    if lora:
        from peft import LoraConfig

        conf = LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=0.0, target_modules=list(targets))
        try:
            model.add_adapter(conf)
            how = "add_adapter"
        except ValueError as exc:
            # transformers 5 wants peft >= 0.22 for add_adapter; with an older peft, do what
            # add_adapter does: inject the LoRA layers into the transformer in place
            if "version of PEFT" not in str(exc):
                raise
            from peft import inject_adapter_in_model

            inject_adapter_in_model(conf, hf)
            for n, p in hf.named_parameters():
                p.requires_grad_("lora_" in n)
            how = "inject_adapter_in_model"
    loss_fn = MultipleNegativesRankingLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    plan = _unique_batches(train, batch_size, epochs, seed)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda i: lr_factor(i, len(plan), "linear", warmup_ratio))
    prep = getattr(model, "preprocess", None) or model.tokenize  # sentence-transformers >= 6 renamed it
    model.train()
    t0 = time.perf_counter()
    for idx in plan:
        feats = [prep([train[i][0] for i in idx]), prep([train[i][1] for i in idx])]
        loss = loss_fn(feats, None)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
    seconds = time.perf_counter() - t0
    model.eval()
    return dict(metrics(view, train, held, guard_base), seconds=seconds, steps=len(plan), peer=how)


def _base(encoder, name: str) -> dict[str, float]:
    from aios_fast.learn._engine import EngineView

    train, held = load_set(name)
    return dict(metrics(EngineView(encoder), train, held), seconds=0.0, steps=0)


def table(encoder, sets: Sequence[str] = TUNING_SETS + TEST_SETS, seeds: Sequence[int] = (0, 1, 2),
          full_lr: float = 1e-4, log=print) -> list[dict[str, Any]]:
    """One row per (set, method, seed): base, ours (defaults), st+peft, full fine-tune."""
    from aios_fast.learn.recipe import OBJECTIVE_DEFAULTS

    d = OBJECTIVE_DEFAULTS["contrastive"]
    rows = []
    for name in sets:
        rows.append(dict(_base(encoder, name), set=name, method="base", seed=None))
        log(json.dumps(rows[-1]))
        for seed in seeds:
            for method in ("ours", "st+peft", "full"):
                if method == "ours":
                    r = run_ours(encoder, name, seed)
                elif method == "st+peft":
                    r = run_st(name, seed, lora=True, rank=d["rank"], alpha=d["alpha"],
                               epochs=d["epochs"], lr=d["lr"])
                else:
                    r = run_st(name, seed, lora=False, epochs=d["epochs"], lr=full_lr)
                rows.append(dict(r, set=name, method=method, seed=seed))
                log(json.dumps(rows[-1]))
    return rows


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Mean over seeds per (set, method), with ours' share of the full fine-tune's recall gain."""
    out = []
    for name in dict.fromkeys(r["set"] for r in rows):
        base = next(r for r in rows if r["set"] == name and r["method"] == "base")
        per = {}
        for method in ("base", "ours", "st+peft", "full"):
            rs = [r for r in rows if r["set"] == name and r["method"] == method]
            if rs:
                per[method] = {k: sum(r[k] for r in rs) / len(rs)
                               for k in ("recall@1", "mrr@10", "seconds") if all(k in r for r in rs)}
                if all("drift" in r for r in rs):
                    per[method]["drift"] = max(r["drift"] for r in rs)
        full_gain = per.get("full", {}).get("recall@1", base["recall@1"]) - base["recall@1"]
        for method, v in per.items():
            gain = v["recall@1"] - base["recall@1"]
            out.append(dict(v, set=name, method=method,
                            share_of_full_gain=(gain / full_gain) if full_gain > 0 else None))
    return out


def markdown(summary: list[dict[str, Any]], seeds: Sequence[int]) -> str:
    """The summary as one Markdown table (means over ``seeds``; drift is the worst seed's)."""
    names = {"base": "base model", "ours": "LoRATrainer defaults", "st+peft": "ST + PEFT LoRA + MNRL",
             "full": "full fine-tune (ST + MNRL)"}
    lines = [f"| set | method | recall@1 | MRR@10 | guard drift (max) | s / run | share of full FT's recall@1 gain |",
             "|---|---|---:|---:|---:|---:|---:|"]
    for r in summary:
        share = "" if r.get("share_of_full_gain") is None or r["method"] == "base" else f"{100 * r['share_of_full_gain']:.0f} %"
        drift = f"{r['drift']:.4f}" if "drift" in r else ""
        secs = f"{r['seconds']:.1f}" if r["method"] != "base" else ""
        lines.append(f"| {r['set']} | {names[r['method']]} | {r['recall@1']:.3f} | {r['mrr@10']:.3f} | "
                     f"{drift} | {secs} | {share} |")
    return "\n".join(lines) + f"\n\nseeds {list(seeds)}; means over seeds.\n"


def check_set(summary: list[dict[str, Any]], name: str) -> None:
    """Correctness on set ``name`` (means over seeds, from :func:`summarize`): ours learns
    (recall@1 and MRR@10 above the base model's) and keeps the guard drift under the gate's
    bound. Raises :class:`CaseFailed` naming what failed."""
    by = {r["method"]: r for r in summary if r["set"] == name}
    ours, base = by["ours"], by["base"]
    for k in ("recall@1", "mrr@10"):
        if not ours[k] > base[k]:
            raise CaseFailed(f"{name}: ours' {k} {ours[k]:.3f} is not above the base model's {base[k]:.3f}")
    if not ours.get("drift", 0.0) < DRIFT_BOUND:
        raise CaseFailed(f"{name}: ours' guard drift {ours['drift']:.4f} reaches the gate's bound {DRIFT_BOUND}")


def quality_shortfalls(summary: list[dict[str, Any]], name: str) -> list[str]:
    """The quality goals ours misses on set ``name``: at least ST + PEFT's recall@1 and MRR@10,
    ≥ 90 % of the full fine-tune's recall@1 gain (empty when all are met)."""
    by = {r["method"]: r for r in summary if r["set"] == name}
    ours, out = by["ours"], []
    if "st+peft" in by:
        for k in ("recall@1", "mrr@10"):
            if ours[k] < by["st+peft"][k]:
                out.append(f"ours' {k} {ours[k]:.3f} is below ST + PEFT's {by['st+peft'][k]:.3f}")
    share = ours.get("share_of_full_gain")
    if "full" in by and share is not None and share < SHARE_OF_FULL:
        out.append(f"ours reaches {100 * share:.0f} % of the full fine-tune's recall@1 gain "
                   f"(goal ≥ {100 * SHARE_OF_FULL:.0f} %)")
    return out


def figures(rows: list[dict[str, Any]]) -> list[Figure]:
    """One figure per set from :func:`table`'s rows: ours' seconds per training run beside
    ST + PEFT's (paired by seed). "incorrect" when :func:`check_set` fails; "fail" when the time
    goal or a quality goal (:func:`quality_shortfalls`) is missed; every method's quality in
    ``extra``."""
    summary = summarize(rows)
    figs = []
    for name in dict.fromkeys(r["set"] for r in rows):
        per = {m: sorted((r for r in rows if r["set"] == name and r["method"] == m), key=lambda r: r["seed"])
               for m in ("ours", "st+peft", "full")}
        fig = Figure(f"train_quality.{name}", "train_quality",
                     f"contrastive LoRA training on MiniLM, {name} set{' (test set)' if name in TEST_SETS else ''}: "
                     "time per run vs ST + PEFT",
                     goal=Goal(">=", 1.0, f"≤ ST + PEFT's time per run (≥ 1×) at ≥ its recall@1 and MRR@10, "
                                          f"≥ {100 * SHARE_OF_FULL:.0f} % of the full fine-tune's recall@1 gain"),
                     check=f"means over seeds: recall@1 and MRR@10 above the base model's, "
                           f"guard drift < {DRIFT_BOUND}",
                     config={"set": name, "seeds": [r["seed"] for r in per["ours"]],
                             "torch_threads": torch.get_num_threads(), "peer": "sentence-transformers + PEFT LoRA "
                             "+ MultipleNegativesRankingLoss, same rank, targets, lr, epochs and schedule"})
        fig.ours = Measurement("LoRATrainer (defaults)", [r["seconds"] for r in per["ours"]])
        if per["st+peft"]:
            fig.peer = Measurement("ST + PEFT LoRA + MNRL", [r["seconds"] for r in per["st+peft"]])
        fig.extra = {"quality": {r["method"]: {k: (None if r.get(k) is None else float(f"{r[k]:.4g}"))
                                               for k in ("recall@1", "mrr@10", "drift", "seconds",
                                                         "share_of_full_gain") if k in r}
                                 for r in summary if r["set"] == name}}
        try:
            check_set(summary, name)
        except AssertionError as exc:
            fig.status, fig.reason = "incorrect", str(exc)
            figs.append(fig)
            continue
        fig.finish()
        short = quality_shortfalls(summary, name)
        if short and fig.status in ("pass", "fail"):
            fig.status, fig.reason = "fail", "; ".join(short)
        figs.append(fig)
    return figs


def run(ctx: BenchContext) -> list[Figure]:
    """The train_quality group: :func:`table` over every set at ``ctx.sizes.train_quality_seeds``;
    "not run" when the sizes give no seeds (``--quick``: the table takes minutes)."""
    def not_run(name: str, why: str) -> Figure:
        return Figure(f"train_quality.{name}", "train_quality", f"contrastive LoRA training on MiniLM, {name} set",
                      status="not run", reason=why)

    sets = TUNING_SETS + TEST_SETS
    if not ctx.sizes.train_quality_seeds:
        why = ("not run with --quick: 3 sets × 3 seeds × 3 trainings take about 15 minutes on 2 cores; "
               "run `aios-fast bench --only train_quality`")
        return [not_run(name, why) for name in sets]
    # the test set lives in the source tree's tests/data, which an installed package lacks
    missing = [n for n in sets if not all(p.exists() for p in SETS[n])]
    skipped = [not_run(n, f"data set files not found: {SETS[n][0]} (run from a source checkout)") for n in missing]
    sets = tuple(n for n in sets if n not in missing)
    if not sets:
        return skipped
    from ...engines import SentenceEncoder

    ctx.progress("loading MiniLM")
    rows = table(SentenceEncoder(), sets, ctx.sizes.train_quality_seeds,
                 log=lambda line: ctx.progress(_step(json.loads(line))))
    return figures(rows) + skipped


def _step(row: dict[str, Any]) -> str:
    seed = "" if row.get("seed") is None else f" seed {row['seed']}"
    return f"{row['set']} {row['method']}{seed}: recall@1 {row['recall@1']:.3f} ({row['seconds']:.0f} s)"


def _main() -> None:
    import argparse

    from aios_fast.engines import SentenceEncoder

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sets", nargs="+", default=list(TUNING_SETS + TEST_SETS), choices=sorted(SETS))
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = table(SentenceEncoder(), args.sets, args.seeds)
    summary = summarize(rows)
    for s in summary:
        print("SUMMARY " + json.dumps(s))
    print(markdown(summary, args.seeds))


if __name__ == "__main__":
    _main()
