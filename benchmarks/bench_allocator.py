"""glibc's defaults against ``aios_fast.allocator.keep_large_blocks`` on a big-batch forward.

Each round starts two fresh processes, one per setting (alternating which goes first): each
loads the bundled MiniLM and runs 64×128-token forwards, plain and with a WeightMapProbe
attached, alternated, timed in process CPU seconds, with the page faults and the peak resident
set. The figures, per round and then as median and range over rounds:

* forward CPU time, glibc defaults / large blocks kept (a ratio > 1: kept is cheaper);
* the probe's overhead over the plain forward under each setting (the ``aios-fast bench``
  probe figure; under glibc's defaults it moved between +1 % and +19 % from run to run);
* minor page faults per forward and peak resident set of each process.

    python -m pytest benchmarks/bench_allocator.py --benchmark-only -q -s
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ROUNDS = int(os.environ.get("AIOS_ALLOCATOR_BENCH_ROUNDS", "3"))
FORWARDS = 6   # of each kind per process, after one warm-up of each

CHILD = r"""
import json, resource, statistics, sys, time
import torch
from aios_fast.allocator import keep_large_blocks
from aios_fast.bench.cases import probe as P
setting = keep_large_blocks()
torch.set_num_threads(int(sys.argv[2]))
model, tok = P.load_model()
batch = P.make_batch(tok, 64, 128)
ref = P.forward(model, batch)
P.probe_forward(model, batch)
out = {"plain": [], "probe": [], "faults": []}
for i in range(int(sys.argv[1])):
    for kind in (("plain", "probe") if i % 2 else ("probe", "plain")):
        r0 = resource.getrusage(resource.RUSAGE_SELF)
        got = P.forward(model, batch) if kind == "plain" else P.probe_forward(model, batch)[0]
        r1 = resource.getrusage(resource.RUSAGE_SELF)
        assert torch.equal(got, ref)
        out[kind].append(r1.ru_utime + r1.ru_stime - r0.ru_utime - r0.ru_stime)
        out["faults"].append(r1.ru_minflt - r0.ru_minflt)
out["setting"] = setting
out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(out))
"""


def _child(mode: str) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_") and k != "GLIBC_TUNABLES"}
    env["AIOS_FAST_MALLOC"] = mode
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "python"), env.get("PYTHONPATH", "")])
    out = subprocess.run([sys.executable, "-c", CHILD, str(FORWARDS), str(os.cpu_count() or 1)], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_forward_cpu_glibc_default_vs_large_blocks_kept(benchmark):
    runs: dict[str, list[dict]] = {"system": [], "256": []}
    state = {"round": 0}

    def one_round():
        order = ["system", "256"] if state["round"] % 2 == 0 else ["256", "system"]
        for mode in order:
            runs[mode].append(_child(mode))
        state["round"] += 1

    benchmark.pedantic(one_round, rounds=ROUNDS, warmup_rounds=0)
    assert all(not r["setting"]["applied"] for r in runs["system"])
    assert all(r["setting"]["applied"] for r in runs["256"])

    med = statistics.median
    ratios = sorted(med(s["plain"]) / med(k["plain"]) for s, k in zip(runs["system"], runs["256"]))

    def overhead(rs):
        return sorted(100 * (med(r["probe"]) / med(r["plain"]) - 1) for r in rs)

    summary = {
        "rounds": len(ratios), "forwards_per_process": FORWARDS, "threads": os.cpu_count(),
        "forward_cpu_s": {m: med([med(r["plain"]) for r in rs]) for m, rs in runs.items()},
        "system_over_kept": {"median": med(ratios), "range": [ratios[0], ratios[-1]]},
        "probe_overhead_pct": {m: {"median": med(o), "range": [o[0], o[-1]]}
                               for m, o in ((m, overhead(rs)) for m, rs in runs.items())},
        "faults_per_forward": {m: med([med(r["faults"]) for r in rs]) for m, rs in runs.items()},
        "maxrss_mb": {m: [min(r["maxrss_mb"] for r in rs), max(r["maxrss_mb"] for r in rs)]
                      for m, rs in runs.items()},
        "load_average_1min": os.getloadavg()[0],
    }
    benchmark.extra_info.update(summary)
    print("\n" + json.dumps(summary, indent=1))
    out = Path(os.environ.get("AIOS_ALLOCATOR_BENCH_SUMMARY", "/tmp/aios-sections/allocator_summary.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**summary, "runs": runs}, indent=1))
