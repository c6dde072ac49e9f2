"""`aios-fast extract-batch JOBS.(json|yaml)`: many (base, tuned) pairs into skill cards,
resumable, on a local process pool or on Ray (see aios_fast.factory.batch)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ._common import add_json_flag, console, print_json


def add_executor_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--executor", choices=("local", "inline", "ray"), default=None,
                   help="where jobs run: a local process pool (default), this process, or Ray")
    p.add_argument("--workers", type=int, default=None,
                   help="local pool size (default: half the CPUs); CPUs of a local Ray instance")
    p.add_argument("--ray", metavar="ADDRESS", default=None,
                   help="run jobs as Ray tasks on this cluster ('auto', 'ray://host:10001'; 'local' starts one)")
    p.add_argument("--gpus-per-job", type=float, default=0.0, help="GPUs each Ray task requests (default 0)")


def make_executor_from(args: argparse.Namespace):
    from ..factory.executors import make_executor

    kind = args.executor or ("ray" if args.ray else "local")
    address = None if args.ray in (None, "local") else args.ray
    return make_executor(kind, workers=args.workers, ray_address=address, num_gpus=args.gpus_per_job)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract-batch", help="extract cards for many (base, tuned) pairs, resumable",
                       description="Run every job of a JSON (or YAML, with PyYAML) jobs file: extract tuned − base "
                                   "into a .lora.arrow card. Finished outputs are verified and skipped on a rerun.")
    p.add_argument("jobs", type=Path, help="jobs file (.json, .yaml, .yml): {'defaults': {...}, 'jobs': [...]}")
    add_executor_flags(p)
    p.add_argument("--force", action="store_true", help="redo finished jobs too")
    p.add_argument("--summary", type=Path, help="also write the JSON summary to this file (atomically)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import json

    from rich.table import Table

    from .._atomic import atomic_write_bytes
    from ..factory.batch import load_jobs, run_batch

    jobs = load_jobs(args.jobs)
    ex = make_executor_from(args)
    try:
        out = console()
        report = run_batch(jobs, ex, force=args.force, progress=not (args.no_progress or args.json),
                           console=out)
    finally:
        ex.close()
    summary = report.to_dict()
    if args.summary:
        atomic_write_bytes(args.summary, json.dumps(summary, indent=2).encode())
    if args.json:
        print_json(summary)
    else:
        t = Table(title=f"extract-batch: {summary['done']} done, {summary['skipped']} skipped, "
                        f"{summary['failed']} failed ({report.executor}, {report.seconds:.1f} s)")
        for col in ("job", "status", "modules", "energy", "MiB", "seconds", "card / error"):
            t.add_column(col)
        for j in report.jobs:
            ok = j["status"] != "failed"
            t.add_row(j["job_id"], j["status"], str(j.get("modules", "")) if ok else "",
                      f"{j['energy_fraction']:.3f}" if ok and "energy_fraction" in j else "",
                      f"{j['bytes'] / 2**20:.2f}" if ok and "bytes" in j else "",
                      f"{j.get('seconds', 0):.1f}" if ok else "", j.get("card", "") if ok else j["error"])
        out.print(t)
    return 1 if report.failed else 0
