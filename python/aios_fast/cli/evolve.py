"""`aios-fast evolve`: the whole self-evolution loop on one machine, on embedded defaults.

Queries arrive at a :class:`~aios_fast.evolve.node.SkillNode`; the router is unsure; the
:class:`~aios_fast.evolve.trigger.CognitiveTrigger` groups the unsure queries into a topic and
fires; the node's background worker runs the :class:`~aios_fast.evolve.distiller.SkillDistiller`
(Tier 1 library, then Tier 2: retrieval over the documents, the teacher's questions judged against
their passages, document pairs, LoRA training, the gate); the skill enters the library; the same
kind of queries now route to it confidently. Measured before and after: routing confidence on
probe queries, and recall@1 / MRR@10 on a human-written evaluation set (the bundled demo ships
48 questions about the fictional Kestrel Mobility domain).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

from ._common import add_json_flag, console, print_json

# DistillConfig's GATE_HELDOUT with the results table's name for each, spelt out as the other
# subcommands spell their choices: importing the distiller here put it (~50 ms by -X importtime)
# into every subcommand's start-up (tests/test_evolve_cli.py checks that the two agree)
HELDOUT_LABELS = {"questions": "teacher questions", "unseen": "unseen passages", "studied": "teacher + ICT"}
GATE_HELDOUT = tuple(HELDOUT_LABELS)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("evolve", help="run the self-evolution loop end to end (bundled demo by default)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--docs", help="folder of .txt/.md documents to ground on (default: the bundled demo domain)")
    p.add_argument("--url", action="append", default=[], metavar="URL", help="web page to ground on (repeatable)")
    p.add_argument("--queries", help="incoming queries, one per line, '#' comments (default: the demo's)")
    p.add_argument("--probe-queries", help="queries of the same kind to measure routing confidence "
                                           "before/after (default: the demo's; else the last quarter of --queries)")
    p.add_argument("--eval", dest="eval_file", help="human-written eval set, JSONL with question, doc, answer "
                                                    "(default: the demo's when --docs is not given)")
    p.add_argument("--library", help="skill library directory (default: OUT/library, emptied first)")
    p.add_argument("--out", default="evolve-out", help="where the report and the PNGs go (default: %(default)s)")
    p.add_argument("--teacher-url", help="OpenAI-compatible server, e.g. http://127.0.0.1:8080/v1 "
                                         "(default: the bundled SmolLM2 in process)")
    p.add_argument("--teacher-model", help="model name on --teacher-url")
    p.add_argument("--teacher-timeout", type=float, default=60.0, help="seconds per teacher request")
    p.add_argument("--no-teacher", action="store_true", help="document pairs only (inverse cloze, cropping)")
    p.add_argument("--min-support", type=int, default=5, help="unsure queries a topic needs to fire")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--teacher-questions", type=int, default=None, metavar="N",
                   help="questions to ask the teacher (default: DistillConfig.teacher_questions, 120)")
    p.add_argument("--gate-folds", type=int, default=None, metavar="K",
                   help="K >= 2: the gate measures K cross-fitted cards, each trained without the questions "
                        "it is measured on, then keeps the card trained on all pairs (default: "
                        "DistillConfig.gate_folds, 4); 1: one held-out split (one training, a weaker gate)")
    p.add_argument("--gate-heldout", choices=GATE_HELDOUT, default=None,
                   help="what the gate's held-out questions ask about: 'questions' (default), teacher questions "
                        "about the documents the skill studies, never trained on; 'unseen', passages the card "
                        "never trained on; 'studied', teacher questions and inverse-cloze sentences of studied "
                        "passages (DistillConfig.gate_heldout)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds to wait for the learning job")
    add_json_flag(p)
    p.set_defaults(func=_run)


def _lines(path: Path) -> list[str]:
    from ..errors import InputError

    if not path.is_file():
        raise InputError(f"{path}: no such queries file (one query per line)")
    out = [l.strip() for l in path.read_text(encoding="utf-8").splitlines()]
    out = [l for l in out if l and not l.startswith("#")]
    if not out:
        raise InputError(f"{path}: no queries in the file (blank lines and '#' comments are skipped)")
    return out


def _teacher(args):
    from ..errors import InputError

    if args.no_teacher:
        return False
    if args.teacher_url:
        if not args.teacher_model:
            raise InputError("--teacher-url needs --teacher-model (the model name the server serves)")
        from ..evolve.teachers import OpenAICompatibleProvider

        return OpenAICompatibleProvider(args.teacher_url, args.teacher_model, timeout=args.teacher_timeout)
    if args.teacher_model:
        raise InputError("--teacher-model needs --teacher-url")
    from ..evolve.teachers import LocalTeacher

    return LocalTeacher(seed=args.seed)


def _run(args: argparse.Namespace) -> int:
    import torch

    # This thread only encodes a few dozen texts; the node's worker trains. Kept at one thread,
    # this thread never starts an OpenMP team of its own, so the worker's team is the only one
    # and libgomp keeps spin-waiting between its parallel regions: with a second team on
    # 2 cores it sleeps and wakes on every region and training ran 1.5-2x slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _evolve(args, threads)
    finally:
        torch.set_num_threads(threads)


def _evolve(args: argparse.Namespace, threads: int) -> int:
    import shutil

    from ..evolve.demo import demo_paths

    from ..errors import InputError

    if args.gate_folds is not None and args.gate_folds < 1:
        raise InputError(f"--gate-folds: expected an int >= 1 (1: one held-out split), got {args.gate_folds}")
    if args.teacher_questions is not None and args.teacher_questions < 1:
        raise InputError(f"--teacher-questions: expected an int >= 1, got {args.teacher_questions}")
    demo = demo_paths()
    quiet = bool(args.json)
    con = console()
    say = (lambda *a, **k: None) if quiet else con.print
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    docs = Path(args.docs) if args.docs else (None if args.url else demo["docs"])
    queries = _lines(Path(args.queries) if args.queries else demo["queries"])
    if args.probe_queries:
        probes = _lines(Path(args.probe_queries))
    elif not args.queries:
        probes = _lines(demo["probe_queries"])
    else:
        cut = max(1, len(queries) // 4)
        queries, probes = queries[:-cut], queries[-cut:]
    eval_file = Path(args.eval_file) if args.eval_file else (demo["eval"] if not args.docs and not args.url else None)
    if args.library:
        lib_dir = Path(args.library)
    else:
        lib_dir = out / "library"
        shutil.rmtree(lib_dir, ignore_errors=True)   # the demo's scratch library: start empty
    t_start = time.perf_counter()
    report: dict[str, Any] = {"docs": None if docs is None else str(docs), "urls": args.url,
                              "queries": len(queries), "probe_queries": len(probes), "library": str(lib_dir),
                              "eval_set": None if eval_file is None else str(eval_file)}

    teacher = _teacher(args)
    say("[bold]aios-fast evolve[/] — a node learns a skill it lacks\n")
    with con.status("loading the encoder (bundled MiniLM)", spinner="dots") if not quiet else _null():
        from ..engines import SentenceEncoder
        from ..evolve.node import SkillNode

        encoder = SentenceEncoder()
        node = SkillNode(encoder, lib_dir, trigger_options={"min_support": args.min_support,
                                                            "topic_similarity": 0.2, "backoff": 60.0,
                                                            "seed": args.seed},
                         learner_threads=threads)
    report["teacher"] = None if not teacher else teacher.name()
    events: list[dict] = []

    def on_event(stage: str, info: dict) -> None:
        events.append({"stage": stage, **info})
        if quiet:
            return
        if stage == "ground":
            say(f"  [cyan]ground[/]  {info['passages']} passages from {info['sources']} document(s)")
        elif stage == "pairs":
            rej = ", ".join(f"{k} {v}" for k, v in sorted(info.get("rejected", {}).items(), key=lambda kv: -kv[1]))
            say(f"  [cyan]pairs[/]   {info['total']} kept {info['kept']}; teacher asked {info['asked']}"
                + (f"; rejected: {rej}" if rej else ""))
        elif stage == "log":
            say(f"  [cyan]log[/]     {info['logged']} QA records written to the QALogger")
        elif stage == "fold_start" and info["fold"] == 1:
            say(f"  [cyan]folds[/]   {info['folds']} cross-fitted cards for the gate, each trained without the "
                f"questions it is measured on ...")
        elif stage == "fold":
            say(f"  [cyan]fold[/]    {info['fold']}/{info['folds']}: {info['heldout']} held-out questions, "
                f"mrr@10 {info['mrr_before']:.3f} -> {info['mrr_after']:.3f} ({info['seconds']:.0f} s)")
        elif stage == "train_start":
            say(f"  [cyan]train[/]   contrastive LoRA on {info['pairs']} pairs, {info['epochs']} epochs ...")
        elif stage == "train":
            say(f"  [cyan]train[/]   {info['steps']} steps, final loss {info['final_loss']} ({info['seconds']:.0f} s)")
        elif stage == "gate":
            mark = "[green]passed[/]" if info["passed"] else "[red]refused[/]"
            drift = "no card measured for drift" if info["drift"] is None else f"drift {info['drift']:.3f}"
            say(f"  [cyan]gate[/]    {mark}: held-out {info['metric']} {info['before']:.3f} -> {info['after']:.3f}, "
                f"{drift}")
        elif stage == "save":
            say(f"  [cyan]save[/]    {info.get('key', 'not stored')}")
        elif stage == "done" and not info["passed"]:
            say(f"  [red]no skill[/]: {info['reason']}")

    from ..evolve.distiller import enable_evolution

    distiller = enable_evolution(node, cloud_providers=teacher if teacher else None, docs=docs,
                                 urls=args.url or None, progress=not quiet, on_event=on_event,
                                 config={"seed": args.seed, **{k: v for k, v in (
                                     ("gate_folds", args.gate_folds), ("gate_heldout", args.gate_heldout),
                                     ("teacher_questions", args.teacher_questions)) if v is not None}})
    if teacher is False:
        distiller.teacher = None

    # ---- before
    evalset = None
    with con.status("measuring before: routing and the human-written eval", spinner="dots") if not quiet else _null():
        index = distiller.cloud.index
        if index is None:
            from ..evolve.retrieval import DocumentIndex

            index = distiller.cloud.index = DocumentIndex(encoder)
        if docs is not None:
            index.add_folder(docs)
            distiller.cloud._grounded.add(f"docs:{Path(docs).resolve()}")
        if args.url:
            index.add_urls(args.url)
            distiller.cloud._grounded.update(f"url:{u}" for u in args.url)
        conf_before = [r.confidence for r in node.router.route_many(probes)]
        if eval_file is not None:
            from ..evolve.demo import load_eval, retrieval_eval

            evalset = load_eval(eval_file)
            ev_before = retrieval_eval(encoder, index.passages, evalset)
    report["before"] = {"probe_confidence": _mean(conf_before)}
    if evalset is not None:
        report["before"].update(ev_before)
    say(f"[bold]1. before[/]: {len(node.library.list())} skill(s); probe routing confidence "
        f"{_mean(conf_before):.2f}" + (f"; eval recall@1 {ev_before['recall@1']:.3f}, MRR@10 "
                                        f"{ev_before['mrr@10']:.3f} on {ev_before['n']} human-written questions"
                                        if evalset is not None else ""))

    # ---- the stream
    say(f"[bold]2. queries arrive[/] ({len(queries)})")
    fired = []
    t0 = time.perf_counter()
    for q in queries:
        _, route = node.encode_with_lora(q, return_route=True)
        d = node.trigger.recent(1)[-1] if node.trigger.recent(1) else {}
        if d.get("fired"):
            fired.append(d)
            say(f"  [yellow]unsure[/] ({route.confidence:.2f}) {q!r} -> topic {d.get('topic_id')} "
                f"[bold yellow]fired[/] ({d.get('reason')})")
    report["stream"] = {"seconds": round(time.perf_counter() - t0, 2), "fired": len(fired),
                        "topics": node.trigger.topics()}
    if not fired:
        say("  no topic gathered enough unsure queries to fire (lower --min-support or add queries)")

    # ---- learning (the node's background worker)
    say("[bold]3. the node learns[/] (background worker: Tier 1 library -> Tier 2 distillation)")
    t0 = time.perf_counter()
    idle = node.wait_idle(timeout=args.timeout)
    jobs = node.status()["finished"]
    report["learning"] = {"seconds": round(time.perf_counter() - t0, 2), "finished": idle,
                          "jobs": [_job(j) for j in jobs]}
    learnt = [j for j in jobs if j.get("ok")]
    # ---- after
    node.router.refresh()
    conf_after = [r.confidence for r in node.router.route_many(probes)]
    routed = [r.skill for r in node.router.route_many(probes)]
    report["after"] = {"probe_confidence": _mean(conf_after),
                       "probe_routed": sum(s is not None for s in routed)}
    skill = learnt[-1]["skill"] if learnt else None
    card = None
    if skill is not None:
        entry = node.library.get(skill.split("@v")[0])
        card = node.library.load_card(entry)
        report["skill"] = {"key": entry.key, "examples": len(entry.examples), "origin": entry.origin,
                           "content_hash": entry.content_hash, "validation": entry.validation,
                           "sources": json.loads(entry.metadata.get("sources", "[]"))}
        if evalset is not None:
            with node.manager.applied(card):
                ev_after = retrieval_eval(encoder, index.passages, evalset)
            report["after"].update(ev_after)
    say(f"[bold]4. after[/]: probe routing confidence {_mean(conf_before):.2f} -> {_mean(conf_after):.2f} "
        f"({report['after']['probe_routed']}/{len(probes)} probe queries routed to a skill)")

    # ---- figures
    figures = {}
    tr = distiller.cloud.last_training
    if tr is not None and tr.losses:
        figures["loss_curve"] = str(tr.save_png(out / "loss_curve.png"))
    figures["before_after"] = str(_chart(report, out / "before_after.png"))
    report["figures"] = figures
    report["seconds"] = round(time.perf_counter() - t_start, 1)
    report["passed"] = card is not None
    node.close()
    from .._atomic import atomic_write_bytes

    atomic_write_bytes(out / "report.json", json.dumps(report, indent=2, default=str).encode())
    if args.json:
        print_json(report)
    else:
        _table(con, report, evalset is not None)
        say(f"figures: {', '.join(figures.values())}; report: {out / 'report.json'}; "
            f"{report['seconds']:.0f} s in all")
    return 0 if card is not None else 3


def _job(j: dict) -> dict:
    rep = j.get("report") or {}
    t2 = (rep.get("tiers") or {}).get("2") or {}
    return {"ok": j.get("ok"), "skill": j.get("skill"), "tier": j.get("tier"), "reason": j.get("reason"),
            "seconds": round(j.get("seconds", 0.0), 1), "tiers": {k: v.get("reason") for k, v in
                                                                   (rep.get("tiers") or {}).items()},
            "pairs": t2.get("pairs"), "gate": t2.get("gate"), "timings": t2.get("timings"),
            "split": t2.get("split"), "folds": t2.get("folds"), "qa_logged": t2.get("qa_logged")}


def _mean(xs) -> float:
    xs = list(xs)
    return float(sum(xs) / len(xs)) if xs else 0.0


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *a):
        return False


def _gate_of(report: dict) -> dict | None:
    """The kept skill's gate report, else the last job's (a refused skill's figures are shown too)."""
    gate = (report.get("skill") or {}).get("validation")
    if gate:
        return gate
    jobs = (report.get("learning") or {}).get("jobs") or []
    return next((j["gate"] for j in reversed(jobs) if j.get("gate")), None)


def _signed(x) -> str:
    return "n/a (one passage)" if x is None else f"{x:+.3f}"


def _table(con, report: dict, has_eval: bool) -> None:
    from rich.table import Table

    t = Table(title="aios-fast evolve: before and after")
    t.add_column("measure")
    t.add_column("before", justify="right")
    t.add_column("after", justify="right")
    b, a = report["before"], report["after"]
    t.add_row("probe routing confidence (mean)", f"{b['probe_confidence']:.3f}", f"{a['probe_confidence']:.3f}")
    gate = _gate_of(report)
    if gate:
        verdict = "passed" if gate["passed"] else "REFUSED"
        det = gate.get("details") or {}
        how = f"{det['cross_fit_folds']}-fold cross-fitted" if det.get("cross_fit_folds") else "held-out"
        asked = HELDOUT_LABELS.get(det.get("gate_heldout"), "held-out")
        t.add_row(f"gate ({verdict}): {how} {gate['metric']} ({asked})", f"{gate['before']:.3f}", f"{gate['after']:.3f}")
        if "mrr@10_gain_lower_bound" in det:
            t.add_row(f"gate: {how} recall@1 ({gate.get('n_heldout', '?')} q)",
                      f"{det['recall@1_before']:.3f}", f"{det['recall@1_after']:.3f}")
            on_loss = det.get("gate_statistic") == "loss"
            conf, passages = f"{det['gate_confidence']:.0%}", det.get("heldout_passages", "?")
            if on_loss:
                t.add_row(f"gate: {how} contrastive loss ({passages} passages)",
                          f"{det['loss_before']:.3f}", f"{det['loss_after']:.3f}")
                t.add_row(f"gate: loss reduction, {conf} bootstrap lower bound by passage (must be > 0)",
                          "", _signed(det["loss_reduction_lower_bound"]))
            # Under the loss rule the MRR@10 bound does not decide, but a reader comparing runs
            # across statistics needs it: label which one the verdict rests on.
            t.add_row(f"gate: MRR@10 gain, {conf} bootstrap lower bound by passage "
                      + ("(reported; its mean must not fall)" if on_loss else f"({passages} passages; must be > 0)"),
                      "", _signed(det["mrr@10_gain_lower_bound"]))
        drift = f"{gate['drift']:.3f}" if gate.get("n_guard") else "not measured (no card trained)"
        t.add_row("gate: drift on general texts (max %.2f)" % gate["max_drift"], "", drift)
    if has_eval and "recall@1" in a:
        t.add_row(f"human-written eval recall@1 ({b['n']} q)", f"{b['recall@1']:.3f}", f"{a['recall@1']:.3f}")
        t.add_row("human-written eval MRR@10", f"{b['mrr@10']:.3f}", f"{a['mrr@10']:.3f}")
    con.print(t)
    if report.get("skill"):
        con.print(f"[green]skill {report['skill']['key']} added[/] with {report['skill']['examples']} router examples")
    else:
        reasons = [j.get("reason") for j in report["learning"]["jobs"]]
        con.print(f"[red]no skill was added[/]: {reasons or 'no learning job ran'}")


def _chart(report: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .._atomic import save_figure

    b, a = report["before"], report.get("after", {})
    labels, before, after = ["routing confidence"], [b["probe_confidence"]], [a.get("probe_confidence", 0.0)]
    gate = _gate_of(report)
    if gate:
        labels.append(f"gate {gate['metric']}")
        before.append(gate["before"])
        after.append(gate["after"])
    for k, name in (("recall@1", "eval recall@1"), ("mrr@10", "eval MRR@10")):
        if k in b and k in a:
            labels.append(name)
            before.append(b[k])
            after.append(a[k])
    fig, ax = plt.subplots(figsize=(7, 3.8))
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], before, 0.4, label="before", color="#999999")
    ax.bar([i + 0.2 for i in x], after, 0.4, label="after", color="#2a7ab9")
    for i, (v0, v1) in enumerate(zip(before, after)):
        ax.text(i - 0.2, v0 + 0.01, f"{v0:.2f}", ha="center", fontsize=8)
        ax.text(i + 0.2, v1 + 0.01, f"{v1:.2f}", ha="center", fontsize=8)
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylim(0, 1.1)
    ax.legend()
    ax.set_title("aios-fast evolve: the node before and after learning the skill")
    fig.tight_layout()
    return save_figure(fig, path, dpi=110)
