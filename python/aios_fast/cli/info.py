"""`aios-fast info`: version, tier, devices, compiled features, kernel choices."""

from __future__ import annotations

import argparse
import platform
from typing import Any

from ._common import add_json_flag, console, print_json


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("info", help="show tier, devices, compiled features and kernel choices")
    add_json_flag(p)
    p.set_defaults(func=run)


def collect() -> dict[str, Any]:
    import torch

    from .. import __version__, _native, backends, hardware
    from ..allocator import malloc_setting

    profile = hardware.detect()
    devices = ["cpu"] + [f"cuda:{g.index}" for g in profile.gpus]
    return {
        "version": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "hardware": profile.to_dict(),
        "devices": devices,
        "gpu_present": bool(profile.gpus),
        "compiled": _native.build_info(),
        "kernels": backends.table(("cpu", "cuda")),
        "malloc": malloc_setting(),
    }


def run(args: argparse.Namespace) -> int:
    info = collect()
    if args.json:
        print_json(info)
        return 0
    from rich.table import Table

    c = console()
    hw, comp = info["hardware"], info["compiled"]
    c.print(f"[bold]aios-fast {info['version']}[/] (Python {info['python']}, torch {info['torch']})")
    c.print(f"tier: [bold]{hw['tier']}[/] - {hw['reason']}")
    c.print(f"learning tiers allowed: {', '.join(hw['learning_tiers'])}")
    c.print(f"devices: {', '.join(info['devices'])}; RAM {hw['ram_gb']} GB")
    c.print(f"glibc malloc: {info['malloc']['reason']}")
    if comp.get("compiled"):
        c.print(f"compiled core: OpenMP {'on' if comp['openmp'] else 'off'} "
                f"({comp['openmp_threads']} threads), SIMD {', '.join(comp['cpu_simd']) or 'none'}, "
                f"CUDA {'compiled' if comp['cuda_compiled'] else 'not compiled'}"
                f" (runtime {comp['cuda_runtime_version']}, {comp['cuda_device_count']} GPU(s) visible)"
                f", {comp['compiler']}")
    else:
        c.print(f"compiled core: [red]missing[/] - {comp['reason']}")
    t = Table(title="kernel dispatch")
    for col in ("operation", "device", "chosen", "available", "why"):
        t.add_column(col)
    for row in info["kernels"]:
        avail = ", ".join(i["name"] + ("" if i["available"] else "(x)") for i in row["implementations"])
        t.add_row(row["operation"], row["device"], row["chosen"] or "-", avail, row["why"])
    c.print(t)
    return 0
