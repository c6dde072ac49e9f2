"""Benchmark group ``extract``: whole-model extraction, ``aios-fast extract`` against
``mergekit-extract-lora``, same pair, same rank, both as subprocesses on the CPU.

Each tool runs through a small driver (``python -c ...``) that imports the tool's command
module first, then reads the clock, then calls the command's ``main``: the subprocess's wall
time is the **end-to-end** figure, and the time after the imports is the time **after start-up**
(the rest is starting Python and importing torch and the tool). On a SmolLM2-sized pair start-up
dominates both tools; on the 1B-shaped pair compute does.

mergekit lives in its own virtual environment so that it cannot change this one's packages
(see :func:`find_mergekit`); without it the mergekit figures are "not run" with the reason.
Both outputs are checked against the pair's true delta (tuned − base) on a sample of modules:
relative Frobenius error of the rank-r reconstruction under 5 % (the planted delta has rank 8
plus 0.5 % noise), and the set of extracted modules is every decoder-layer linear.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch

from ..core import BenchContext, CaseFailed, Figure, Goal, Measurement
from .pairs import SHAPES, ensure_pair, linear_names, read_tensor

__all__ = ["find_mergekit", "ours_command", "mergekit_command", "run_tool", "check_card", "check_mergekit",
           "run", "MAX_REL_ERROR", "SAMPLE"]

MAX_REL_ERROR = 0.05
SAMPLE = 6  # modules whose reconstruction is checked (first, last and spread between)
_MARK = "AIOS_BENCH_SECONDS"

_OURS_DRIVER = (
    "import sys, time\n"
    "import torch, aios_fast.cards, aios_fast.extract\n"
    "from aios_fast.cli import main\n"
    "t = time.perf_counter()\n"
    "rc = main(sys.argv[1:])\n"
    f"print('{_MARK}', time.perf_counter() - t, flush=True)\n"
    "sys.exit(rc)\n")
_MERGEKIT_DRIVER = (
    "import sys, time\n"
    "from mergekit.scripts.extract_lora import main\n"
    "t = time.perf_counter()\n"
    "main(sys.argv[1:], standalone_mode=False)\n"
    f"print('{_MARK}', time.perf_counter() - t, flush=True)\n")


def find_mergekit() -> tuple[str, str] | tuple[None, str]:
    """(python of mergekit's environment, mergekit version), or (None, why not found).

    Looks at ``$MERGEKIT_EXTRACT_LORA`` (the console script), ``.venv-mergekit/bin`` in the
    current directory and in the source tree, then ``mergekit-extract-lora`` on PATH. Set it up
    with ``python -m venv .venv-mergekit && .venv-mergekit/bin/pip install mergekit`` (its own
    torch), or see ``.ci/setup`` for an environment that reuses this one's torch."""
    candidates = []
    if os.environ.get("MERGEKIT_EXTRACT_LORA"):
        candidates.append(Path(os.environ["MERGEKIT_EXTRACT_LORA"]))
    candidates.append(Path.cwd() / ".venv-mergekit" / "bin" / "mergekit-extract-lora")
    candidates.append(Path(__file__).resolve().parents[4] / ".venv-mergekit" / "bin" / "mergekit-extract-lora")
    on_path = shutil.which("mergekit-extract-lora")
    if on_path:
        candidates.append(Path(on_path))
    for script in candidates:
        if not script.exists():
            continue
        first = script.read_text(errors="replace").splitlines()[0] if script.stat().st_size else ""
        python = first[2:].strip() if first.startswith("#!") else str(script.parent / "python")
        proc = subprocess.run([python, "-c", "import importlib.metadata as m; print(m.version('mergekit'))"],
                              capture_output=True, text=True, env=_clean_env())
        if proc.returncode == 0:
            return python, proc.stdout.strip()
    return None, ("mergekit-extract-lora not found (looked at $MERGEKIT_EXTRACT_LORA, ./.venv-mergekit, PATH); "
                  "python -m venv .venv-mergekit && .venv-mergekit/bin/pip install mergekit")


def _clean_env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME")}
    env["HF_HUB_OFFLINE"] = "1"
    return env


def ours_command(pair: Path, out: Path, rank: int, device: str = "cpu") -> list[str]:
    return [sys.executable, "-c", _OURS_DRIVER, "extract", "--base", str(pair / "base"),
            "--tuned", str(pair / "tuned"), "--rank", str(rank), "--out", str(out),
            "--summary", str(out.with_suffix(".json")), "--no-progress", "--device", device]


def mergekit_command(python: str, pair: Path, out: Path, rank: int, device: str = "cpu") -> list[str]:
    cmd = [python, "-c", _MERGEKIT_DRIVER, "--model", str(pair / "tuned"), "--base-model", str(pair / "base"),
           "--out-path", str(out), "--max-rank", str(rank), "--no-copy-tokenizer", "--quiet",
           "-e", "embed_tokens", "-e", "lm_head"]
    return cmd + (["--cuda"] if device == "cuda" else [])


def run_tool(cmd: list[str], env: dict[str, str] | None = None, timeout: float | None = None) -> tuple[float, float]:
    """Run one tool's driver; returns (end-to-end seconds, seconds after start-up)."""
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    wall = time.perf_counter() - t
    if proc.returncode != 0:
        raise RuntimeError(f"{Path(cmd[0]).name} {' '.join(cmd[3:6])}... exited {proc.returncode}:\n"
                           f"{proc.stdout[-1500:]}\n{proc.stderr[-3000:]}")
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith(_MARK)), None)
    if line is None:
        raise RuntimeError(f"the driver printed no {_MARK} line:\n{proc.stdout[-1500:]}")
    return wall, float(line.split()[1])


def _sample(keys: list[str], n: int = SAMPLE) -> list[str]:
    if len(keys) <= n:
        return keys
    step = (len(keys) - 1) / (n - 1)
    return [keys[round(i * step)] for i in range(n)]


def _rel(approx: torch.Tensor, ref: torch.Tensor) -> float:
    return float(torch.linalg.norm(approx - ref) / torch.linalg.norm(ref))


def check_card(card_path: Path, pair: Path, name: str) -> None:
    """Our card holds every decoder-layer linear and reconstructs the true delta within 5 %."""
    from ...cards import LoRAFormat

    card = LoRAFormat.load(card_path)
    want = linear_names(name)
    if set(card.modules) != set(want):
        missing, extra = sorted(set(want) - set(card.modules)), sorted(set(card.modules) - set(want))
        raise CaseFailed(f"card modules differ from the pair's linears: missing {missing[:3]}, extra {extra[:3]}")
    for key in _sample(want):
        ref = read_tensor(pair / "tuned", key + ".weight") - read_tensor(pair / "base", key + ".weight")
        err = _rel(card.delta(key).float(), ref)
        if err >= MAX_REL_ERROR:
            raise CaseFailed(f"aios-fast {key}: relative error {err:.3f} against tuned − base (limit {MAX_REL_ERROR})")


def check_mergekit(out: Path, pair: Path, name: str) -> None:
    """mergekit's adapter holds every decoder-layer linear and reconstructs the true delta within 5 %."""
    from safetensors.torch import load_file

    files = sorted(out.glob("*.safetensors"))
    if not files:
        raise CaseFailed(f"mergekit wrote no adapter in {out}: {sorted(p.name for p in out.iterdir())}")
    sd: dict[str, torch.Tensor] = {}
    for f in files:
        sd.update(load_file(f))
    cfg = json.loads((out / "adapter_config.json").read_text())
    r = cfg.get("r", 1)
    scale = cfg.get("lora_alpha", r) / r
    want = linear_names(name)
    have = {k.split(".lora_A.")[0].removeprefix("base_model.model.") for k in sd if ".lora_A." in k}
    if not set(want) <= have:
        raise CaseFailed(f"mergekit adapter lacks modules {sorted(set(want) - have)[:3]}")
    for key in _sample(want):
        a = next(v for k, v in sd.items() if k.endswith(f"{key}.lora_A.weight")).float()
        b = next(v for k, v in sd.items() if k.endswith(f"{key}.lora_B.weight")).float()
        ref = read_tensor(pair / "tuned", key + ".weight") - read_tensor(pair / "base", key + ".weight")
        err = _rel(scale * b @ a, ref)
        if err >= MAX_REL_ERROR:
            raise CaseFailed(f"mergekit {key}: relative error {err:.3f} against tuned − base (limit {MAX_REL_ERROR})")


def _rounds_for(name: str, ctx: BenchContext) -> int:
    # mergekit takes minutes per round on the big pairs: one round there, the tier's rounds below
    return 1 if name in ("llama-1b", "llama-7b") or ctx.sizes.quick else ctx.sizes.rounds


def run_pair(ctx: BenchContext, name: str, device: str = "cpu", group: str = "extract") -> list[Figure]:
    """The end-to-end and after-start-up figures of pair ``name`` on ``device``."""
    shape = SHAPES[name]
    rank = ctx.sizes.extract_rank
    pair = ensure_pair(name, progress=ctx.progress)
    n_mod = len(linear_names(name))
    cfg = {"pair": name, "shape": shape.label, "parameters": shape.parameters(), "modules": n_mod,
           "rank": rank, "dtype": "bfloat16", "device": device, "subprocess": True}
    # the goal is stated for the CPU on pairs where compute dominates; elsewhere the ratio is reported as is
    big = name in ("llama-1b", "llama-7b") and device == "cpu"
    goal = Goal(">=", 5.0, "≥ 5× mergekit end to end") if big else None
    prefix = f"{group}.{name}" + ("" if device == "cpu" else f"_{device}")
    e2e = Figure(f"{prefix}.end_to_end", group, f"extract {shape.label}, rank {rank}, {device}: end to end",
                 goal=goal, config=cfg,
                 check=f"both outputs hold every decoder linear and reconstruct tuned − base within {MAX_REL_ERROR:.0%}")
    after = Figure(f"{prefix}.after_startup", group,
                   f"extract {shape.label}, rank {rank}, {device}: after start-up (imports excluded)",
                   config=cfg, check=e2e.check)
    python, version = find_mergekit()
    if python is None:
        for f in (e2e, after):
            f.status, f.reason = "not run", version
        return [e2e, after]
    for f in (e2e, after):
        f.extra["mergekit_version"] = version
    ours_out = ctx.workdir / f"{name}-{device}.lora.arrow"
    mk_out = ctx.workdir / f"{name}-{device}-mergekit"
    o_e2e, o_after, p_e2e, p_after = [], [], [], []
    rounds = _rounds_for(name, ctx)
    try:
        for i in range(rounds):
            order = ("ours", "mergekit") if i % 2 == 0 else ("mergekit", "ours")
            for side in order:
                ctx.progress(f"{name} ({n_mod} modules): {side}, round {i + 1}/{rounds}")
                if side == "ours":
                    w, a = run_tool(ours_command(pair, ours_out, rank, device))
                    o_e2e.append(w)
                    o_after.append(a)
                else:
                    shutil.rmtree(mk_out, ignore_errors=True)
                    cmd = mergekit_command(python, pair, mk_out, rank, device)
                    w, a = run_tool(cmd, env=_clean_env())
                    p_e2e.append(w)
                    p_after.append(a)
    except Exception as exc:  # noqa: BLE001
        for f in (e2e, after):
            f.status, f.reason = "error", f"{type(exc).__name__}: {str(exc)[:2000]}"
        return [e2e, after]
    e2e.ours, e2e.peer = Measurement("aios-fast extract", o_e2e), Measurement("mergekit-extract-lora", p_e2e)
    after.ours, after.peer = (Measurement("aios-fast extract", o_after),
                              Measurement("mergekit-extract-lora", p_after))
    summary = json.loads(ours_out.with_suffix(".json").read_text())
    startup = {"ours_startup_s": round(min(o_e2e) - min(o_after), 3),
               "mergekit_startup_s": round(min(p_e2e) - min(p_after), 3),
               "ours_extract_and_write_s": summary["seconds"]}
    e2e.extra.update(startup)
    after.extra.update(startup)
    ctx.progress(f"{name}: checking both outputs")
    try:
        check_card(ours_out, pair, name)
        check_mergekit(mk_out, pair, name)
    except AssertionError as exc:
        for f in (e2e, after):
            f.status, f.reason = "incorrect", str(exc)
        return [e2e, after]
    return [e2e.finish(), after.finish()]


def run(ctx: BenchContext) -> list[Figure]:
    """The extract group: every pair of the tier's sizes, on the CPU."""
    figs = []
    for name in ctx.sizes.extract_pairs:
        figs += run_pair(ctx, name)
    return figs
