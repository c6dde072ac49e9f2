"""Benchmark group ``probe``: WeightMapProbe overhead and the ``token_norms`` kernel, on MiniLM.

Shared by ``aios-fast bench --only probe`` (:func:`run`) and ``benchmarks/bench_probe.py``
(which times the same bodies with pytest-benchmark):

* forward overhead: a forward of the bundled MiniLM with the probe's hooks, and with the seed's
  hooks (``torch.norm(out).item()`` per module), against the plain forward. Timed in process
  CPU seconds: on a machine shared with other jobs the wall time of the same forward varies
  2×, its CPU time by a few percent. Rounds alternate the sides, so drift hits both alike.
* kernel: the token-norm statistics of every Linear output of one forward with the dispatched
  compiled kernel against the same statistics computed with torch ops (the reference).

Every result is checked: hooks leave the output bit-identical, the probe's statistics equal
float64 references, the kernel's equal the torch reference's.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from ..core import BenchContext, CaseFailed, Figure, Goal, measure

__all__ = ["load_model", "make_batch", "forward", "NaiveHooks", "linear_outputs", "all_stats",
           "probe_forward", "naive_forward", "check_same_output", "check_probe_stats",
           "check_naive_norms", "check_kernel_states", "run", "PROBE_MODULE"]

PROBE_MODULE = "encoder.layer.3.intermediate.dense"  # the module whose statistics are checked


def load_model():
    """The bundled all-MiniLM-L6-v2 as a transformers ``BertModel`` in eval mode, and its tokenizer."""
    from transformers import AutoModel, AutoTokenizer
    from transformers.utils import logging as hf_logging

    from ...bundled import minilm_dir

    hf_logging.disable_progress_bar()  # the suite shows its own progress
    return AutoModel.from_pretrained(minilm_dir()).eval(), AutoTokenizer.from_pretrained(minilm_dir())


def make_batch(tokenizer, batch: int, seq: int) -> dict[str, torch.Tensor]:
    """``batch`` rows of ``seq`` real tokens: sentences of the built-in corpora packed until each
    row is full (deterministic), with [CLS]/[SEP] at the ends."""
    from ...probe import corpus

    sents = corpus("code") + corpus("cooking") + corpus("general")
    ids = [t for s in sents for t in tokenizer(s, add_special_tokens=False)["input_ids"]]
    if len(ids) <= seq:
        raise ValueError(f"the built-in corpora have {len(ids)} tokens; seq={seq} needs more")
    rows = []
    for r in range(batch):
        start = (r * 97) % (len(ids) - seq)
        rows.append([tokenizer.cls_token_id] + ids[start:start + seq - 2] + [tokenizer.sep_token_id])
    input_ids = torch.tensor(rows)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids),
            "token_type_ids": torch.zeros_like(input_ids)}


def forward(model, batch) -> torch.Tensor:
    """One no-grad forward; the last hidden state."""
    with torch.no_grad():
        return model(**batch).last_hidden_state


class NaiveHooks:
    """The seed's scoring: one ``torch.norm(out).item()`` per hooked Linear per forward."""

    def __init__(self, model):
        self.norms: dict[str, list[float]] = {}
        self.handles = [m.register_forward_hook(self._hook(n)) for n, m in model.named_modules()
                        if isinstance(m, torch.nn.Linear)]

    def _hook(self, name):
        def hook(mod, inp, out):
            self.norms.setdefault(name, []).append(torch.norm(out).item())
        return hook

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def linear_outputs(model, batch) -> dict[str, torch.Tensor]:
    """Every Linear output of one forward, flattened to (tokens, features)."""
    got: dict[str, torch.Tensor] = {}
    hooks = [m.register_forward_hook(lambda mod, i, o, n=n: got.__setitem__(n, o.detach().reshape(-1, o.shape[-1])))
             for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    try:
        forward(model, batch)
    finally:
        for h in hooks:
            h.remove()
    return got


def all_stats(outputs: dict[str, torch.Tensor], impl: str | None):
    """token_norms statistics of every tensor in ``outputs`` with implementation ``impl``."""
    from ...kernels.norms import NormState, token_norm_stats

    states = {n: NormState.empty(x.shape[1], x.device) for n, x in outputs.items()}
    for n, x in outputs.items():
        token_norm_stats(x, states[n], force=impl)
    return states


def probe_forward(model, batch, impl: str | None = None):
    """One forward with a fresh WeightMapProbe attached (attach/detach cost microseconds against a
    forward's tenths of a second). Returns (output, the probe's statistics)."""
    from ...probe import WeightMapProbe

    p = WeightMapProbe(model, impl=impl).attach()
    try:
        out = forward(model, batch)
    finally:
        p.detach()
    return out, p.statistics()


def naive_forward(model, batch):
    """One forward with the seed's hooks. Returns (output, {module: [norms]})."""
    h = NaiveHooks(model)
    try:
        out = forward(model, batch)
    finally:
        h.remove()
    return out, h.norms


# ---------------------------------------------------------------- checks (raise CaseFailed)
def check_same_output(out: torch.Tensor, reference: torch.Tensor) -> None:
    if not torch.equal(out, reference):
        diff = float((out - reference).abs().max())
        raise CaseFailed(f"hooks changed the model output (max abs difference {diff:.3g})")


def check_probe_stats(stats: dict, outputs: dict[str, torch.Tensor], calls: int = 1) -> None:
    """The probe's count and mean token norm of :data:`PROBE_MODULE` equal float64 references."""
    x = outputs[PROBE_MODULE].double()
    s = stats[PROBE_MODULE]
    if s["count"] != calls * x.shape[0]:
        raise CaseFailed(f"probe count {s['count']} != {calls} × {x.shape[0]} tokens")
    ref = x.norm(dim=1).mean().item()
    if not math.isclose(s["mean_norm"], ref, rel_tol=1e-5):
        raise CaseFailed(f"probe mean_norm {s['mean_norm']:.8g} != float64 reference {ref:.8g} (rel 1e-5)")


def check_naive_norms(norms: dict, outputs: dict[str, torch.Tensor]) -> None:
    # torch.norm sums millions of squares in float32: about 1e-4 off the float64 value
    got, ref = norms[PROBE_MODULE][-1], outputs[PROBE_MODULE].double().norm().item()
    if not math.isclose(got, ref, rel_tol=2e-3):
        raise CaseFailed(f"seed-hook norm {got:.6g} != float64 reference {ref:.6g} (rel 2e-3)")


def check_kernel_states(states: dict, reference: dict) -> None:
    """Every module's statistics equal the torch reference's (rel 1e-5; channel sums 1e-4,
    float32 column sums over thousands of rows in a different order)."""
    for n in reference:
        a, b = states[n].to_dict(), reference[n].to_dict()
        for k in ("count", "sum", "sumsq", "max"):
            if not math.isclose(a[k], b[k], rel_tol=1e-5, abs_tol=1e-9):
                raise CaseFailed(f"{n}: {k} = {a[k]!r}, torch reference {b[k]!r} (rel 1e-5)")
        try:
            np.testing.assert_allclose(states[n].channel_numpy(), reference[n].channel_numpy(), rtol=1e-4)
        except AssertionError as exc:
            raise CaseFailed(f"{n}: channel energies differ from the torch reference: {exc}") from None


# ---------------------------------------------------------------- the group
def run(ctx: BenchContext) -> list[Figure]:
    """The probe group's figures at ``ctx.sizes.probe_batch``, on the CPU."""
    from ...kernels.norms import _cpp_available

    b, s = ctx.sizes.probe_batch
    rounds = ctx.sizes.rounds
    ctx.progress("loading MiniLM")
    model, tok = load_model()
    batch = make_batch(tok, b, s)
    ref = forward(model, batch)
    outputs = linear_outputs(model, batch)
    cfg = {"model": "all-MiniLM-L6-v2", "batch": [b, s], "modules": len(outputs),
           "torch_threads": torch.get_num_threads()}
    figs = []

    ctx.progress("forward with the probe vs plain")
    fig = Figure("probe.forward_overhead", "probe", f"forward with WeightMapProbe hooks, MiniLM {b}×{s}",
                 metric="overhead", goal=Goal("<=", 5.0, "≤ 5 % over the plain forward (CPU time)"),
                 check="output bit-identical; probe statistics equal float64 references", config=cfg)

    def check_probe(o, p):
        check_same_output(o[0], ref)
        check_same_output(p, ref)
        check_probe_stats(o[1], outputs)

    figs.append(measure(fig, lambda: probe_forward(model, batch), lambda: forward(model, batch), check_probe,
                        rounds=2 * rounds, clock="cpu", ours_name="forward + WeightMapProbe",
                        peer_name="plain forward"))

    ctx.progress("forward with the seed's hooks vs plain")
    fig = Figure("probe.seed_hooks_overhead", "probe", f"forward with the seed's norm().item() hooks, MiniLM {b}×{s}",
                 metric="overhead", check="output bit-identical; norms equal float64 references", config=cfg)

    def check_naive(o, p):
        check_same_output(o[0], ref)
        check_naive_norms(o[1], outputs)

    figs.append(measure(fig, lambda: naive_forward(model, batch), lambda: forward(model, batch), check_naive,
                        rounds=2 * rounds, clock="cpu", ours_name="forward + seed hooks",
                        peer_name="plain forward"))

    ok, why = _cpp_available()
    for dtype, goal in (("float32", Goal(">=", 2.0, "≥ 2× the torch ops")), ("bfloat16", None)):
        ctx.progress(f"token_norms kernel {dtype}")
        x = outputs if dtype == "float32" else {n: outputs[n].to(torch.bfloat16) for n in list(outputs)[:4]}
        fig = Figure(f"probe.kernel_{dtype}", "probe",
                     f"token_norms statistics of {len(x)} Linear outputs, {dtype}, cpp vs torch ops",
                     metric="speedup", goal=goal, check="statistics equal the torch reference (rel 1e-5)",
                     config={**cfg, "outputs": len(x), "dtype": dtype})
        if not ok:
            fig.status, fig.reason = "not run", f"compiled kernel unavailable: {why}"
            figs.append(fig)
            continue
        reference = all_stats(x, "torch")
        figs.append(measure(fig, lambda x=x: all_stats(x, "cpp"), lambda x=x: all_stats(x, "torch"),
                            lambda o, p: (check_kernel_states(o, reference), check_kernel_states(p, reference)),
                            rounds=max(rounds, 5), ours_name="token_norms cpp", peer_name="torch ops"))
    return figs
