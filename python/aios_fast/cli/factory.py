"""`aios-fast factory run --once | schedule | rotate`: the skill factory (aios_fast.factory)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_json_flag, console, print_json
from .extract_batch import add_executor_flags


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--workspace", type=Path, required=True, help="factory workspace (journal, lock, state, runs)")
    p.add_argument("--log", type=Path, help="QALogger directory to distill (default WORKSPACE/qa)")
    p.add_argument("--library", type=Path, help="SkillLibrary directory (default WORKSPACE/library)")
    p.add_argument("--model", type=Path, help="sentence-transformers directory (default: the bundled MiniLM)")
    p.add_argument("--min-records", type=int, default=20, help="new records a domain needs for a new version")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--epochs", type=int, default=2)
    add_executor_flags(p)
    add_json_flag(p)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("factory", help="nightly domain skills from the QA log; model rotation")
    fsub = p.add_subparsers(dest="factory_command", metavar="ACTION")
    run = fsub.add_parser("run", help="one nightly run (for system cron or timers)")
    run.add_argument("--once", action="store_true", required=True, help="run once and exit")
    _common(run)
    run.set_defaults(func=_run)
    sch = fsub.add_parser("schedule", help="run nightly from a cron expression until interrupted")
    sch.add_argument("--cron", default="0 2 * * *", help="cron expression, UTC (default '0 2 * * *')")
    sch.add_argument("--misfire-grace", type=float, default=3600.0,
                     help="seconds a missed fire time may still run late (default 3600)")
    _common(sch)
    sch.set_defaults(func=_schedule)
    rot = fsub.add_parser("rotate", help="publish what changed between two releases as incremental cards")
    rot.add_argument("--new", type=Path, required=True, help="new release (sentence-transformers directory)")
    rot.add_argument("--previous", type=Path, required=True, help="previous release")
    rot.add_argument("--queries", type=Path, required=True,
                     help="benchmark queries: a JSON {domain: [texts]} or a text file, one query per line")
    rot.add_argument("--similarity-threshold", type=float, default=0.9)
    rot.add_argument("--energy", type=float, default=0.9)
    _common(rot)
    rot.set_defaults(func=_rotate)
    p.set_defaults(func=lambda a: (p.print_help(), 2)[1])


def _factory(args: argparse.Namespace):
    from ..engines import SentenceEncoder
    from ..factory import SkillFactory
    from .extract_batch import make_executor_from

    library = None
    if args.library:
        from ..route.library import SkillLibrary

        library = SkillLibrary(args.library)
    if args.executor is None and not args.ray:
        args.executor = "inline"  # one machine: train with the model already loaded here
    return SkillFactory(SentenceEncoder(args.model), args.workspace, library=library,
                        logger=args.log, executor=make_executor_from(args), min_records=args.min_records,
                        rank=args.rank, epochs=args.epochs, progress=not args.json)


def _table(report) -> None:
    from rich.table import Table

    t = Table(title=f"factory run {report.run_id}{' (resumed)' if report.resumed else ''}: "
                    f"{report.records} records, {report.new_records} new, {report.clusters} clusters, "
                    f"{report.outliers} outliers, {report.seconds:.1f} s")
    for col in ("domain", "id", "records", "new", "cluster", "skill", "gate before", "after", "published / why not"):
        t.add_column(col)
    for d in report.domains:
        t.add_row(d.name, str(d.domain_id), str(d.records), str(d.new), d.cluster, d.skill or "-",
                  "" if d.before is None else f"{d.before:.3f}", "" if d.after is None else f"{d.after:.3f}",
                  "published" if d.published else d.reason)
    console().print(t)


def _run(args: argparse.Namespace) -> int:
    fac = _factory(args)
    try:
        report = fac.nightly_distill()
    finally:
        fac.close()
    if args.json:
        print_json(report.to_dict())
    else:
        _table(report)
    return 0


def _schedule(args: argparse.Namespace) -> int:
    import time

    fac = _factory(args)
    out = console()

    def on_event(kind, fire, result):
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(fire))
        if kind == "run":
            out.print(f"[green]{when}[/]: run {result.run_id}: published {result.published or 'nothing'}")
        elif kind == "failed":
            out.print(f"[red]{when}[/]: run failed: {result}")
        else:
            out.print(f"[yellow]{when}[/]: missed by more than the grace; skipped")

    out.print(f"factory scheduled '{args.cron}' (misfire grace {args.misfire_grace:.0f} s); Ctrl-C to stop")
    try:
        fac.schedule(args.cron, misfire_grace=args.misfire_grace, on_event=on_event)
    finally:
        fac.close()
    return 0


def _rotate(args: argparse.Namespace) -> int:
    import json

    from ..errors import InputError

    text = args.queries.read_text(encoding="utf-8") if args.queries.is_file() else None
    if text is None:
        raise InputError(f"--queries {args.queries}: no such file")
    if args.queries.suffix == ".json":
        try:
            queries = json.loads(text)
        except ValueError as exc:
            raise InputError(f"--queries {args.queries}: not valid JSON ({exc})") from None
    else:
        queries = [line for line in text.splitlines() if line.strip()]
    fac = _factory(args)
    try:
        rep = fac.model_rotation(str(args.new), str(args.previous), queries,
                                 similarity_threshold=args.similarity_threshold, energy=args.energy)
    finally:
        fac.close()
    if args.json:
        print_json(rep.to_dict())
        return 0
    from rich.table import Table

    t = Table(title=f"model rotation: published {rep.published or 'nothing'}")
    for col in ("domain", "module", "heat", "rel. change", "rank", "energy", "similarity", "published / status"):
        t.add_column(col)
    for r in rep.modules:
        if r.status == "unchanged":
            continue
        t.add_row(r.domain, r.module, f"{r.heat:.3f}", f"{r.rel_change:.2e}", str(r.rank or ""),
                  "" if r.energy is None else f"{r.energy:.3f}",
                  "" if r.similarity is None else f"{r.similarity:.3f}", "published" if r.published else r.status)
    console().print(t)
    unchanged = sum(r.status == "unchanged" for r in rep.modules)
    console().print(f"{unchanged} module row(s) unchanged between the releases")
    return 0
