"""The bench suite's gpu group at Super sizes, with the extraction pairs named on the command line
(the 7B pair does not fit this lease), written as aios-fast bench writes a report."""
import dataclasses
import sys
from pathlib import Path

from aios_fast.bench import runner, write_report
from aios_fast.bench.sizes import sizes_for

out, pairs, with_kernels = Path(sys.argv[1]), tuple(p for p in sys.argv[2].split(",") if p), sys.argv[3] == "1"
base = sizes_for("super")
sizes = dataclasses.replace(base, rounds=3, gpu_extract_pairs=pairs,
                            svd_shapes=base.svd_shapes if with_kernels else ())
runner.sizes_for = lambda tier, quick=False: sizes
if not with_kernels:  # extraction only: skip the MiniLM/norms/probe part of the group
    from aios_fast.bench.cases import extract as ex, gpu
    gpu.run = lambda ctx: [f for p in ctx.sizes.gpu_extract_pairs for f in ex.run_pair(ctx, p, device="cuda", group="gpu")]
cmd = f"aios-fast bench --tier super --only gpu (gpu_extract_pairs={list(pairs)}, rounds 3{'' if with_kernels else ', extraction only'})"
report = runner.run_suite(tier="super", only=["gpu"], command=cmd, progress=False)
print(write_report(report, out))
for f in report["figures"]:
    print(f["id"], f["status"], f.get("ratio"), f.get("reason", "")[:300])
