"""`aios-fast train`: train a LoRA skill on (question, answer) pairs, gate it, save it if it passes.

With no arguments it trains the bundled MiniLM on the packaged example domain (an invented
storage appliance's jargon) so the whole loop can be seen end to end.
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from ._args import existing_file, float_range, int_at_least
from ._common import add_json_flag, console, print_json

_DATA = Path(__file__).resolve().parent.parent / "learn" / "data"


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a LoRA skill on QA pairs, validate it, save it if it passes")
    p.add_argument("--pairs", default=str(_DATA / "ferrowind.jsonl"), type=existing_file,
                   help="JSONL with query (or question) and answer per line (default: packaged example)")
    p.add_argument("--heldout", type=existing_file, help="held-out JSONL; default: a seeded 25%% split of --pairs")
    p.add_argument("--guard", default=str(_DATA / "guard.txt"), type=existing_file,
                   help="general texts, one per line, for the drift check (default: packaged)")
    p.add_argument("--objective", choices=("contrastive", "sft"), default="contrastive",
                   help="contrastive: bundled MiniLM encoder; sft: bundled SmolLM2 chat model")
    p.add_argument("--out", default="skill.lora.arrow", help="card path (default: ./skill.lora.arrow)")
    p.add_argument("--name", help="skill name (default: from --out)")
    p.add_argument("--rank", type=int_at_least(1), default=8)
    p.add_argument("--alpha", type=float_range(0, low_open=True), default=16.0)
    p.add_argument("--epochs", type=int_at_least(1), default=4)
    p.add_argument("--lr", type=float_range(0, low_open=True), default=3e-3)
    p.add_argument("--batch-size", type=int_at_least(2), default=16)
    p.add_argument("--init", choices=("default", "pissa"), default="default")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--target-modules", help="comma-separated module names or suffixes (default: query,value)")
    p.add_argument("--margin", type=float_range(), help="required metric gain (default 0.05)")
    p.add_argument("--max-drift", type=float_range(0), help="allowed guard drift (default 0.15 encoder / 0.25 causal)")
    p.add_argument("--device", default="cpu")
    add_json_flag(p)
    p.set_defaults(func=run)


def _read_pairs(path: str, arg: str = "--pairs") -> list[tuple[str, str]]:
    from ..errors import InputError
    from ..learn._engine import as_pairs

    rows = []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as exc:
                        raise InputError(f"{arg} {path}:{n}: not JSON: {exc}") from None
    except UnicodeDecodeError as exc:
        raise InputError(f"{arg} {path}: not UTF-8 text ({exc.reason} at byte {exc.start})") from None
    except OSError as exc:
        raise InputError(f"{arg} {path}: cannot read: {exc.strerror}") from None
    return as_pairs(rows, f"{arg} {path}")


def run(args: argparse.Namespace) -> int:
    from ..errors import InputError
    from ..learn import LoRATrainer, save_validated, validate

    pairs = _read_pairs(args.pairs)
    if args.heldout:
        train, heldout = pairs, _read_pairs(args.heldout, "--heldout")
    else:
        order = list(range(len(pairs)))
        random.Random(args.seed).shuffle(order)
        k = max(2, len(pairs) // 4)
        heldout, train = [pairs[i] for i in order[:k]], [pairs[i] for i in order[k:]]
    if len(train) < 2:
        raise InputError(f"{args.pairs}: need at least 2 training pairs after the held-out split")
    try:
        guard = [l.strip() for l in Path(args.guard).read_text(encoding="utf-8").splitlines() if l.strip()]
    except (OSError, UnicodeDecodeError) as exc:
        raise InputError(f"--guard {args.guard}: cannot read UTF-8 text: {exc}") from None
    if not guard:
        raise InputError(f"--guard {args.guard}: no non-empty lines (one general text per line)")
    out = Path(args.out)
    if out.exists() and out.is_dir():
        raise InputError(f"--out {out}: is a directory; give a card file path such as {out / 'skill.lora.arrow'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise InputError(f"--out {out}: cannot create its directory: {exc.strerror}") from None
    name = args.name or out.name.split(".")[0] or "skill"
    targets = args.target_modules.split(",") if args.target_modules else None
    if args.objective == "contrastive":
        from ..engines import SentenceEncoder

        engine = SentenceEncoder(device=args.device)
    else:
        from ..engines import CausalLM

        engine = CausalLM(device=args.device)
    c = console()
    if not args.json:
        c.print(f"training [bold]{name}[/] ({args.objective}, rank {args.rank}) on {len(train)} pairs, "
                f"{len(heldout)} held out")
    card, rep = LoRATrainer(engine).train(
        train, objective=args.objective, rank=args.rank, alpha=args.alpha, target_modules=targets,
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, init=args.init, seed=args.seed,
        name=name)
    png = out.with_name(name + ".loss.png")
    out.parent.mkdir(parents=True, exist_ok=True)
    rep.save_png(png)
    val = validate(card, engine, heldout, guard, margin=args.margin, max_drift=args.max_drift,
                   distractors=[a for _, a in train])
    saved = None
    if val.passed:
        saved = str(save_validated(card, out, val))
    result = {"card": saved, "passed": val.passed, "loss_png": str(png), "validation": val.to_dict(),
              "training": {k: v for k, v in rep.to_dict().items() if k != "losses"}}
    if args.json:
        print_json(result)
    else:
        from rich.table import Table

        t = Table(title=f"validation of {name}")
        for col in ("metric", "before", "after"):
            t.add_column(col)
        keys = sorted({k.rsplit("_", 1)[0] for k in val.details})
        for k in keys:
            t.add_row(k, f"{val.details[k + '_before']:.4f}", f"{val.details[k + '_after']:.4f}")
        t.add_row("guard drift", "", f"{val.drift:.4f} (max {val.max_drift})")
        c.print(t)
        c.print(f"{rep.steps} steps, {rep.samples_per_sec:.1f} samples/s on {rep.device}; loss curve: {png}")
        if saved:
            c.print(f"[green]passed[/]: card saved to {saved}")
    if not val.passed:
        import sys

        print(f"aios-fast train: skill rejected, card NOT saved to {out}: " + "; ".join(val.reasons),
              file=sys.stderr)
        return 3
    return 0
