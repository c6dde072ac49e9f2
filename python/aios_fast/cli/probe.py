"""`aios-fast probe`: which modules of the encoder light up on a task, against a baseline.

With no texts it probes the built-in code corpus against the built-in general-text corpus on
the bundled all-MiniLM-L6-v2, offline.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ._args import existing_file, int_at_least
from ._common import add_json_flag, console, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("probe", help="heat map of which modules light up on a task (WeightMapProbe)",
                       description="Probe an encoder with task texts (and baseline texts for the contrast "
                                   "score); print the hot zones, write heatmap.parquet and heatmap.png.")
    p.add_argument("texts", nargs="*", metavar="TEXTS", help="task texts (default: built-in code corpus)")
    p.add_argument("--file", type=existing_file, help="task texts, one per line")
    p.add_argument("--baseline-file", type=existing_file,
                   help="baseline texts, one per line (default: built-in general corpus)")
    p.add_argument("--no-baseline", action="store_true", help="skip the baseline pass (no contrast score)")
    p.add_argument("--model", type=Path, help="sentence-transformers/BERT directory (default: bundled MiniLM)")
    p.add_argument("--modules", help="regex selecting module names (default: every nn.Linear)")
    p.add_argument("--score", choices=("contrast", "mean_norm", "raw_l2", "effect_size"),
                   help="ranking score (default: contrast with a baseline, else mean_norm)")
    p.add_argument("--top", type=int_at_least(1), default=10, help="how many hot zones to print (default 10)")
    p.add_argument("--out", type=Path, default=Path("aios-probe-out"),
                   help="output directory for heatmap.parquet and heatmap.png (default ./aios-probe-out)")
    p.add_argument("--batch-size", type=int_at_least(1), default=16)
    p.add_argument("--max-length", type=int_at_least(2), default=128)
    p.add_argument("--device", default="cpu")
    add_json_flag(p)
    p.set_defaults(func=run)


def _read_lines(path: Path, arg: str) -> list[str]:
    from ..errors import InputError

    try:
        lines = [s.strip() for s in path.read_text(encoding="utf-8").splitlines()]
    except OSError as exc:
        raise InputError(f"{arg} {path}: cannot read: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{arg} {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    lines = [s for s in lines if s]
    if not lines:
        raise InputError(f"{arg} {path}: no non-empty lines (one text per line)")
    return lines


class _HFEngine:
    """Fallback engine on transformers directly (same .model/.tokenize contract as SentenceEncoder)."""

    def __init__(self, path: Path, device: str, max_length: int) -> None:
        from transformers import AutoModel, AutoTokenizer

        self.model = AutoModel.from_pretrained(path).to(device).eval()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.device = device
        self.max_length = max_length

    def tokenize(self, texts: list[str]) -> dict[str, Any]:
        enc = self.tokenizer(list(texts), padding=True, truncation=True, max_length=self.max_length,
                             return_tensors="pt")
        return {k: v.to(self.device) for k, v in enc.items()}


def load_engine(path: Path | None, device: str, max_length: int) -> Any:
    """SentenceEncoder when the engines package provides it, else a transformers fallback."""
    try:
        from ..engines import SentenceEncoder
    except (ImportError, AttributeError):
        SentenceEncoder = None
    if SentenceEncoder is not None:
        return SentenceEncoder(path, device=device, max_length=max_length)
    from ..bundled import minilm_dir

    return _HFEngine(path or minilm_dir(), device, max_length)


def run(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from ..errors import InputError
    from ..probe import WeightMapProbe, corpus

    if args.top < 1:
        raise InputError(f"--top must be >= 1, got {args.top}")
    task = list(args.texts) + (_read_lines(args.file, "--file") if args.file else [])
    task_source = "command line/--file" if task else "built-in corpus 'code'"
    task = task or corpus("code")
    baseline = None
    if not args.no_baseline:
        baseline = _read_lines(args.baseline_file, "--baseline-file") if args.baseline_file else corpus("general")
    c = console()
    engine = load_engine(args.model, args.device, args.max_length)
    probe = WeightMapProbe(engine, modules=args.modules)
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=c, transient=True, disable=args.json) as progress:
        hm = probe.probe(task, baseline, batch_size=args.batch_size, progress=progress)
    hm.metadata.update({"task_source": task_source, "task_texts": str(len(task)),
                        "baseline_texts": str(len(baseline) if baseline else 0)})
    score = args.score or hm.default_score()
    zones = hm.hot_zones(args.top, score)
    parquet = hm.save(args.out / "heatmap.parquet")
    png = hm.to_png(args.out / "heatmap.png", score)
    if args.json:
        print_json({"model": hm.metadata.get("model"), "score": score, "modules": len(hm.modules),
                    "task_texts": len(task), "baseline_texts": len(baseline) if baseline else 0,
                    "hot_zones": [{"module": m, "score": v} for m, v in zones],
                    "parquet": str(parquet), "png": str(png)})
        return 0
    from rich.table import Table

    t = Table(title=f"top {len(zones)} hot zones by {score} ({len(task)} task texts"
                    + (f" vs {len(baseline)} baseline texts)" if baseline else ")"))
    t.add_column("#", justify="right")
    t.add_column("module")
    t.add_column(score, justify="right")
    t.add_column("mean token norm", justify="right")
    for i, (m, v) in enumerate(zones, 1):
        t.add_row(str(i), m, f"{v:.4g}", f"{hm.stats[m]['mean_norm']:.4g}")
    c.print(t)
    c.print(f"wrote {parquet} and {png}")
    return 0
