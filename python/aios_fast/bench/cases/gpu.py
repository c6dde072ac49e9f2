"""Benchmark group ``gpu``: the CUDA paths against their torch references, on the first GPU.

* ``token_norms`` CUDA kernel vs the torch ops, on every Linear output of a MiniLM forward
  (float32) and on two outputs in bfloat16; statistics checked against the reference.
* WeightMapProbe overhead on a MiniLM forward on the GPU (goal ≤ 2 %); output bit-identical.
* ``truncated_svd`` on CUDA vs ``torch.svd_lowrank`` on CUDA; σ_k error over 5 seeded starts, median
  no higher than the peer's.
* whole-model extraction with ``--device cuda`` vs ``mergekit-extract-lora --cuda``.

The runner marks the whole group "not run" on a machine where torch sees no CUDA device. GPU
work is asynchronous, so every timed body ends with ``torch.cuda.synchronize()``.
"""

from __future__ import annotations

import torch

from ..core import BenchContext, Figure, Goal, measure
from . import extract as ex
from . import probe as pr
from . import svd as sv

__all__ = ["run"]


def _sync(fn):
    def body():
        out = fn()
        torch.cuda.synchronize()
        return out
    return body


def run(ctx: BenchContext) -> list[Figure]:
    if not torch.cuda.is_available():  # the runner checks first; this guards direct calls
        f = Figure("gpu.token_norms_float32", "gpu", "token_norms on CUDA", status="not run",
                   reason="no CUDA GPU visible to torch")
        return [f]
    from ...kernels.norms import _cuda_available

    dev = torch.device("cuda")
    figs: list[Figure] = []
    rounds = max(ctx.sizes.rounds, 5)
    seeds = range(3) if ctx.sizes.quick else range(5)
    b, s = ctx.sizes.probe_batch
    ctx.progress("MiniLM on the GPU")
    model, tok = pr.load_model()
    model = model.to(dev)
    batch = {k: v.to(dev) for k, v in pr.make_batch(tok, b, s).items()}
    ref = pr.forward(model, batch)
    outputs = pr.linear_outputs(model, batch)
    name = torch.cuda.get_device_name(0)
    cfg = {"gpu": name, "model": "all-MiniLM-L6-v2", "batch": [b, s]}

    ok, why = _cuda_available()
    for dtype in ("float32", "bfloat16"):
        x = outputs if dtype == "float32" else {n: outputs[n].to(torch.bfloat16) for n in list(outputs)[:2]}
        fig = Figure(f"gpu.token_norms_{dtype}", "gpu", f"token_norms of {len(x)} outputs on {name}, {dtype}, "
                     "CUDA kernel vs torch ops", goal=Goal(">=", 2.0, "≥ 2× the torch ops") if dtype == "float32"
                     else None, check="statistics equal the torch reference (rel 1e-5)",
                     config={**cfg, "dtype": dtype, "outputs": len(x)})
        if not ok:
            fig.status, fig.reason = "not run", why
            figs.append(fig)
            continue
        reference = pr.all_stats(x, "torch")
        figs.append(measure(fig, _sync(lambda x=x: pr.all_stats(x, "cuda")),
                            _sync(lambda x=x: pr.all_stats(x, "torch")),
                            lambda o, p: (pr.check_kernel_states(o, reference), pr.check_kernel_states(p, reference)),
                            rounds=rounds, ours_name="token_norms cuda", peer_name="torch ops"))

    ctx.progress("probe overhead on the GPU")
    fig = Figure("gpu.probe_forward_overhead", "gpu", f"forward with WeightMapProbe hooks on {name}, MiniLM {b}×{s}",
                 metric="overhead", goal=Goal("<=", 2.0, "≤ 2 % over the plain forward"),
                 check="output bit-identical; probe statistics equal float64 references", config=cfg)

    def check_probe(o, p):
        pr.check_same_output(o[0], ref)
        pr.check_same_output(p, ref)
        pr.check_probe_stats(o[1], outputs)

    figs.append(measure(fig, _sync(lambda: pr.probe_forward(model, batch)), _sync(lambda: pr.forward(model, batch)),
                        check_probe, rounds=4 * rounds, ours_name="forward + WeightMapProbe",
                        peer_name="plain forward"))
    del model, outputs
    torch.cuda.empty_cache()

    for shape in ctx.sizes.svd_shapes:
        for k in ctx.sizes.svd_ranks:
            ctx.progress(f"SVD {shape[0]}×{shape[1]} rank {k} on the GPU")
            T, B = (t.to(dev) for t in sv.make_pair(shape, torch.bfloat16))
            refs = sv.reference_sigma(T, B, k).cpu()
            fig = Figure(f"gpu.svd_{shape[0]}x{shape[1]}_bf16_r{k}", "gpu",
                         f"truncated SVD on {name}, {shape[0]}×{shape[1]} bf16, rank {k}",
                         goal=Goal(">=", 1.25, "≤ 0.8× svd_lowrank's time (≥ 1.25×)"),
                         check=f"σ_k error over {len(seeds)} starts < 2 %, median ≤ svd_lowrank's",
                         config={**cfg, "shape": list(shape), "rank": k, "error_seeds": len(seeds)})
            errs: dict[str, list[float]] = {}

            def check(_o, _p, k=k, refs=refs, errs=errs):
                # one draw each is a coin flip between two good answers: compare medians over
                # the same seeds, as the CPU group does (the peer's seed drives torch's CUDA RNG)
                errs["ours"] = sv.seeded_errors(sv.ours, T, B, refs, k, seeds)
                errs["lowrank"] = sv.seeded_errors(sv.lowrank, T, B, refs, k, seeds)
                sv.check_errors(errs["ours"], errs["lowrank"], k)

            figs.append(measure(fig, _sync(lambda k=k: sv.ours(T, B, k)), _sync(lambda k=k: sv.lowrank(T, B, k)),
                                check, rounds=rounds, ours_name="truncated_svd (cuda)",
                                peer_name="torch.svd_lowrank (cuda)"))
            for side, e in errs.items():
                fig.extra[f"{side}_sigma_k_rel_err"] = sv.error_summary(e)
            del T, B
            torch.cuda.empty_cache()

    for pair in ctx.sizes.gpu_extract_pairs:
        figs += ex.run_pair(ctx, pair, device="cuda", group="gpu")
    return figs
