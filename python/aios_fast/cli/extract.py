"""`aios-fast extract`: a skill card from the delta between a tuned checkpoint and its base.

Streams module by module (about two modules in memory plus the card), from safetensors
(single, sharded, transformers / sentence-transformers directories), ArrowEngine Parquet
directories or GGUF files.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from .._atomic import atomic_write_bytes
from ._args import existing_file, float_range, int_at_least, power_iters
from ._common import add_json_flag, console, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("extract", help="extract a LoRA skill card from tuned − base (truncated SVD)",
                       description="Factorise every changed weight of TUNED − BASE by randomized truncated "
                                   "SVD and save the factors as a .lora.arrow skill card.")
    p.add_argument("--base", required=True, help="base checkpoint (safetensors file/dir/index, Parquet dir, .gguf)")
    p.add_argument("--tuned", required=True, help="tuned checkpoint, same architecture as --base")
    how = p.add_mutually_exclusive_group()
    how.add_argument("--rank", type=int_at_least(1), help="rank per module (default 16 unless --energy/--heat-map)")
    how.add_argument("--energy", type=float_range(0, 1, low_open=True), help="per module, smallest rank keeping this fraction of ‖ΔW‖²_F")
    p.add_argument("--max-rank", type=int_at_least(1), help="rank cap for --energy (default min(m, n))")
    p.add_argument("--alpha", type=float_range(0, low_open=True), help="lora_alpha of the card (default: 2 × rank, or 32)")
    p.add_argument("--include", help="regex: only modules whose key matches")
    p.add_argument("--exclude", help="regex: skip modules whose key matches")
    p.add_argument("--include-embeddings", action="store_true",
                   help="also decompose embedding and lm_head matrices (skipped by default)")
    p.add_argument("--heat-map", type=existing_file, help="HeatMap Parquet (aios-fast probe): spend --budget on hot modules")
    p.add_argument("--budget", type=int_at_least(1), help="total rank budget with --heat-map")
    p.add_argument("--min-explained-variance", type=float_range(0, 1), help="flag (or --drop-low) modules below this energy")
    p.add_argument("--drop-low", action="store_true", help="drop modules below --min-explained-variance")
    # spelled out rather than linalg.SVD_METHODS: building the parser must not import torch
    p.add_argument("--svd-method", default="krylov", choices=("krylov", "subspace"),
                   help="randomized SVD algorithm (default krylov: block Krylov, 4 passes per module)")
    p.add_argument("--power-iters", default="auto", type=power_iters, help="Krylov steps / power iterations (default auto)")
    p.add_argument("--oversample", type=int_at_least(0), default=None,
                   help="extra sketch directions (default: 24 for krylov, 10 for subspace)")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    p.add_argument("--workers", type=int_at_least(1), default=1, help="modules decomposed concurrently (default 1)")
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"),
                   help="dtype of the card's factors")
    p.add_argument("--name", help="card name (default: stem of --out)")
    p.add_argument("--description", help="card description metadata")
    p.add_argument("--out", required=True, type=Path, help="output .lora.arrow card")
    p.add_argument("--summary", type=Path, help="write a JSON summary (rank, energy, seconds per module)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_json_flag(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..cards import LoRAFormat
    from ..errors import InputError
    from ..extract import LoRAExtractor, open_source

    if (args.heat_map is None) != (args.budget is None):
        raise InputError("--heat-map and --budget go together")
    if args.heat_map is not None and (args.rank is not None or args.energy is not None):
        raise InputError("--heat-map/--budget choose the ranks; drop --rank/--energy")
    if args.drop_low and args.min_explained_variance is None:
        raise InputError("--drop-low needs --min-explained-variance")
    if args.device == "cuda" and not torch.cuda.is_available():
        from ..errors import BackendUnavailableError
        raise BackendUnavailableError("--device cuda: no CUDA GPU is visible to torch")
    power = args.power_iters
    if args.out.is_dir():
        raise InputError(f"--out {args.out}: is a directory; give a card file path")
    rank = args.rank if args.rank is not None else 16
    alpha = args.alpha if args.alpha is not None else float(2 * rank)
    ex = LoRAExtractor(rank=rank, alpha=alpha, min_explained_variance=args.min_explained_variance,
                       on_low_variance="drop" if args.drop_low else "flag", oversample=args.oversample,
                       svd_method=args.svd_method,
                       power_iters=power, include_embeddings=args.include_embeddings, device=args.device,
                       dtype=getattr(torch, args.dtype), workers=args.workers,
                       progress=not (args.no_progress or args.json))
    name = args.name or args.out.name.split(".")[0]
    t0 = time.perf_counter()
    tsrc, bsrc = open_source(args.tuned, "--tuned"), open_source(args.base, "--base")
    if args.heat_map is not None:
        from ..probe import HeatMap

        card = ex.extract_from_heat_map(tsrc, bsrc, HeatMap.load(args.heat_map), args.budget,
                                        name=name, description=args.description)
    else:
        card = ex.extract_delta(tsrc, bsrc, rank=args.rank if args.energy is None else None,
                                energy=args.energy, max_rank=args.max_rank, include=args.include,
                                exclude=args.exclude, name=name, description=args.description)
    path = LoRAFormat.save(card, args.out)
    total = time.perf_counter() - t0
    results = ex.last_results
    summary = {
        "card": str(path), "name": card.name, "base": str(args.base), "tuned": str(args.tuned),
        "modules": len(card.modules), "alpha": card.alpha, "default_rank": card.rank,
        "energy_fraction": float(card.metadata.get("energy_fraction", "nan")),
        "seconds": round(total, 3), "bytes": path.stat().st_size,
        "per_module": [r.summary() for r in results],
    }
    if args.summary:
        atomic_write_bytes(args.summary, json.dumps(summary, indent=2).encode())
    if args.json:
        print_json(summary)
    else:
        c = console()
        c.print(f"[bold]{path}[/bold]: {len(card.modules)} modules, default rank {card.rank}, "
                f"alpha {card.alpha:g}, energy kept {summary['energy_fraction']:.4f}, {total:.2f} s")
        skipped = [r for r in results if r.status != "kept"]
        for r in skipped[:10]:
            c.print(f"  {r.key}: {r.status} (energy {r.energy:.3f})")
    return 0
