"""Benchmark group ``cards``: what a Leaf does with skills — load a card, apply it, remove it, run with it.

* load: ``LoRAFormat.load`` of three cards (:data:`LOAD_CARDS`: MiniLM query+value at rank 8, 12
  modules, what training makes; every Linear of MiniLM at rank 16, 37 modules; and, beyond
  ``--quick``, every Linear of a SmolLM2-135M-shaped model at rank 16, 211 modules) against
  ``safetensors.safe_open`` reading the same tensors, with framework ``pt`` (torch tensors out,
  like ours) and ``np`` (NumPy arrays out); with ``verify=False`` (like for like: safetensors
  verifies nothing) and with the default ``verify=True`` (SHA-256 + NaN/inf scan);
* apply / remove on MiniLM: ``LoRAManager.apply_card`` / ``remove_card`` against PEFT's
  ``inject_adapter_in_model`` + ``set_peft_model_state_dict`` / ``unload()`` (each round starts
  from a fresh copy of the model, made outside the timed call);
* inference overhead of one applied, unmerged card against the plain forward, PEFT's beside it.

Checks: loaded tensors bit-equal; applied outputs equal W + (α/r)·B@A within 1e-5; PEFT's equal
ours within 1e-5; remove restores the base output bit for bit.

``benchmarks/bench_cards.py`` times the same cases with pytest-benchmark.
"""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import numpy as np
import torch

from ..core import BenchContext, CaseFailed, Figure, Goal, measure

__all__ = ["LOAD_CARDS", "card_shapes", "make_card_files", "load_cards", "load_card", "read_safetensors",
           "check_loaded", "expected_output", "peft_inject", "run", "RANK", "TEXTS"]

RANK = 16
TEXTS = [f"request {i}: how do skill cards move between nodes?" for i in range(4)]
#: the cards the load cases read: label -> (rank, what the card covers)
LOAD_CARDS = {
    "minilm12": (8, "MiniLM query+value, 12 modules (what training makes)"),
    "minilm": (RANK, "every Linear of MiniLM, 37 modules"),
    "smollm2": (RANK, "every Linear of SmolLM2-135M with lm_head, 211 modules"),
}


def card_shapes(label: str, minilm=None) -> dict[str, tuple[int, int]]:
    """Module name -> (in, out) of the :data:`LOAD_CARDS` card ``label``; the MiniLM ones take
    the loaded model (``probe.load_model``), SmolLM2's come from its config numbers."""
    from ...lora.random import linear_shapes
    from .pairs import SHAPES

    if label == "minilm12":
        return linear_shapes(minilm, r"attention\.self\.(query|value)$")
    if label == "minilm":
        return linear_shapes(minilm)
    if label == "smollm2":
        cfg = SHAPES["smollm2-135m"]
        shapes = {k: (i, o) for k, (o, i) in cfg.linear_shapes().items()}
        shapes["lm_head"] = (cfg.hidden_size, cfg.vocab_size)  # a Linear too, even when tied
        return shapes
    raise ValueError(f"unknown card {label!r}; one of {sorted(LOAD_CARDS)}")


def make_card_files(shapes: dict[str, tuple[int, int]], directory: Path, label: str, rank: int = RANK):
    """A random card of ``rank`` over ``shapes`` (name -> (in, out)) saved as .lora.arrow and as
    .safetensors (PEFT's key names). Returns (card, arrow path, safetensors path)."""
    from safetensors.torch import save_file

    from ...cards import LoRAFormat
    from ...lora.random import random_card

    card = random_card(shapes, name=f"{label}-r{rank}", rank=rank, alpha=32, seed=1)
    directory.mkdir(parents=True, exist_ok=True)
    arrow = LoRAFormat.save(card, directory / f"{label}.lora.arrow")
    st = directory / f"{label}.safetensors"
    tensors = {}
    for k in card.modules:
        tensors[f"{k}.lora_A.weight"] = card.weights_A[k]
        tensors[f"{k}.lora_B.weight"] = card.weights_B[k]
    save_file(tensors, str(st))
    return card, arrow, st


def load_cards(directory: Path, labels, minilm=None) -> dict:
    """label -> (card, .lora.arrow path, .safetensors path) for the :data:`LOAD_CARDS` ``labels``."""
    return {label: make_card_files(card_shapes(label, minilm), directory, label, LOAD_CARDS[label][0])
            for label in labels}


def load_card(path: Path, verify: bool):
    """Ours: the card with every tensor a torch tensor viewing the mapped file."""
    from ...cards import LoRAFormat

    return LoRAFormat.load(path, verify=verify)


def read_safetensors(path: Path, framework: str = "pt") -> dict:
    """Every tensor of a safetensors file (the peer of a card load): torch tensors with
    ``framework="pt"``, NumPy arrays with ``"np"``."""
    from safetensors import safe_open

    with safe_open(str(path), framework=framework) as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _same(t, ref: torch.Tensor) -> bool:
    if isinstance(t, np.ndarray):
        t = torch.from_numpy(np.array(t))  # a writable copy: the check is not timed
    return torch.equal(t, ref)


def check_loaded(card, loaded=None, tensors=None) -> None:
    if loaded is not None and not loaded.equal(card):
        raise CaseFailed("LoRAFormat.load returned a card that differs from the one saved")
    if tensors is not None:
        if len(tensors) != 2 * len(card.modules) or not all(
                _same(tensors[f"{k}.lora_A.weight"], card.weights_A[k])
                and _same(tensors[f"{k}.lora_B.weight"], card.weights_B[k]) for k in card.modules):
            raise CaseFailed("safetensors returned tensors that differ from the card's")


def _out(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).last_hidden_state


def expected_output(model, batch, card) -> torch.Tensor:
    """The model's output with W + (α/r)·B@A written into its weights (the reference)."""
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for k in card.modules:
            ref.get_submodule(k).weight += card.delta(k)
        return _out(ref, batch)


def peft_inject(peft_dir: Path):
    """A function ``base -> PEFT-injected model`` with the adapter already in memory (PEFT's
    low-level path, the like-for-like peer of ``apply_card``)."""
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict
    from safetensors.torch import load_file

    cfg = LoraConfig.from_pretrained(str(peft_dir))
    sd = {k.removeprefix("base_model.model."): v for k, v in load_file(str(peft_dir / "adapter_model.safetensors")).items()}

    def inject(base):
        m = inject_adapter_in_model(cfg, base)
        res = set_peft_model_state_dict(m, sd)
        if res.unexpected_keys:
            raise CaseFailed(f"PEFT did not take keys {res.unexpected_keys[:3]}")
        return m.eval()
    return inject


def _close(a: torch.Tensor, b: torch.Tensor, what: str, atol: float = 1e-5) -> None:
    diff = float((a - b).abs().max())
    if diff > atol:
        raise CaseFailed(f"{what}: max abs difference {diff:.3g} from the reference (limit {atol:g})")


def run(ctx: BenchContext) -> list[Figure]:
    from ...interop.peft import to_peft
    from ...lora import LoRAManager
    from .probe import load_model

    figs: list[Figure] = []
    rounds = 3 * ctx.sizes.rounds
    ctx.progress("MiniLM and the cards to load")
    model, tok = load_model()
    batch = tok(TEXTS, padding=True, return_tensors="pt")
    labels = [k for k in LOAD_CARDS if not (ctx.sizes.quick and k == "smollm2")]
    cards = load_cards(ctx.workdir, labels, model)
    for label, (card, arrow, st) in cards.items():
        figs += _load_figures(ctx, label, card, arrow, st, rounds)

    card = cards["minilm"][0]
    expected = expected_output(model, batch, card)
    base_out = _out(model, batch)
    peft_dir = to_peft(card, ctx.workdir / "peft")
    inject = peft_inject(peft_dir)
    cfg = {"model": "all-MiniLM-L6-v2", "modules": len(card.modules), "rank": RANK}

    ctx.progress("apply a card vs PEFT inject")

    def apply_ours(m):
        LoRAManager(m).apply_card(card)
        return m

    fig = Figure("cards.apply_minilm", "cards", f"apply a rank-16 card to all {len(card.modules)} MiniLM linears "
                 "vs PEFT inject_adapter_in_model + state dict", check="outputs equal W + (α/r)·B@A within 1e-5",
                 config=cfg)
    figs.append(measure(fig, apply_ours, inject,
                        lambda o, p: (_close(_out(o, batch), expected, "apply_card"),
                                      _close(_out(p, batch), expected, "PEFT")),
                        rounds=rounds, setup=(lambda: copy.deepcopy(model), lambda: copy.deepcopy(model)),
                        ours_name="LoRAManager.apply_card", peer_name="PEFT inject + set_peft_model_state_dict"))

    ctx.progress("remove a card vs PEFT unload")

    def applied():
        m = copy.deepcopy(model)
        mgr = LoRAManager(m)
        mgr.apply_card(card)
        return m, mgr

    def remove_ours(state):
        state[1].remove_card(card.name)
        return state[0]

    def remove_peft(m):
        return m.unload() if hasattr(m, "unload") else _peft_unload(m)

    fig = Figure("cards.remove_minilm", "cards", "remove the card vs PEFT unload",
                 check="base output restored bit for bit (ours); within 1e-5 (PEFT)", config=cfg)

    def check_remove(o, p):
        if not torch.equal(_out(o, batch), base_out):
            raise CaseFailed("remove_card did not restore the base output bit for bit")
        _close(_out(p, batch), base_out, "PEFT unload")

    figs.append(measure(fig, remove_ours, remove_peft, check_remove, rounds=rounds,
                        setup=(applied, lambda: _peft_model(copy.deepcopy(model), peft_dir)),
                        ours_name="LoRAManager.remove_card", peer_name="PEFT unload()"))

    ctx.progress("inference overhead of an unmerged card")
    ours_model = copy.deepcopy(model)
    LoRAManager(ours_model).apply_card(card)
    peft_model = inject(copy.deepcopy(model))
    # one intra-op thread: a forward of a few short sentences is too small to split over cores, and
    # with two threads its CPU time mostly measures spinning against the other tenants' load
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        figs += _overhead(ours_model, peft_model, model, batch, expected, base_out, cfg, rounds)
    finally:
        torch.set_num_threads(threads)
    return figs


def _load_figures(ctx: BenchContext, label: str, card, arrow: Path, st: Path, rounds: int) -> list[Figure]:
    """Four figures per card: verify off / on, each against safetensors with torch and with
    NumPy tensors out. Goals (issue 13): verify=False at least as fast as safetensors,
    verify=True at most twice its time."""
    figs = []
    rank = LOAD_CARDS[label][0]
    for verify in (False, True):
        for fw in ("pt", "np"):
            ctx.progress(f"load {label} card, verify={verify}, vs safetensors ({fw})")
            v = "verify" if verify else "noverify"
            fig = Figure(f"cards.load_{label}_{v}" + ("" if fw == "pt" else "_np"), "cards",
                         f"load a rank-{rank} card of {len(card.modules)} modules ({label}), verify={verify}, "
                         f"vs safetensors ({fw} tensors out)",
                         goal=Goal(">=", 0.5, "at most 2x safetensors' time") if verify
                         else Goal(">=", 1.0, "at least as fast as safetensors"),
                         check="loaded tensors bit-equal to the saved card",
                         config={"modules": len(card.modules), "rank": rank, "verify": verify,
                                 "peer_framework": fw, "bytes": arrow.stat().st_size})
            figs.append(measure(fig, lambda a=arrow, v=verify: load_card(a, v),
                                lambda s=st, f=fw: read_safetensors(s, f),
                                lambda o, p, c=card: check_loaded(c, o, p), rounds=rounds,
                                ours_name=f"LoRAFormat.load(verify={verify})",
                                peer_name=f"safetensors safe_open({fw})"))
    return figs


def _overhead(ours_model, peft_model, model, batch, expected, base_out, cfg, rounds) -> list[Figure]:
    figs = []
    for label, m, goal in (("aios", ours_model, Goal("<=", 10.0, "≤ 10 % over the base forward")),
                           ("peft", peft_model, None)):
        fig = Figure(f"cards.inference_overhead_{label}", "cards",
                     f"forward of MiniLM ({len(TEXTS)} sentences) with one unmerged card, "
                     f"{'aios-fast' if label == 'aios' else 'PEFT'}, vs the base forward",
                     metric="overhead", goal=goal, check="output equals W + (α/r)·B@A within 1e-5",
                     config={**cfg, "sentences": len(TEXTS), "torch_threads": 1})
        figs.append(measure(fig, lambda m=m: _out(m, batch), lambda: _out(model, batch),
                            lambda o, p, label=label: (_close(o, expected, label), _close(p, base_out, "base")),
                            rounds=4 * rounds, clock="cpu", ours_name=f"forward + card ({label})",
                            peer_name="base forward"))
    return figs


def _peft_model(base, peft_dir: Path):
    from peft import PeftModel

    with warnings.catch_warnings():  # transformers' deprecation notes about PEFT's calls: not ours to fix
        warnings.simplefilter("ignore", FutureWarning)
        return PeftModel.from_pretrained(base, str(peft_dir)).eval()


def _peft_unload(m):  # pragma: no cover - PeftModel always has unload()
    raise CaseFailed(f"{type(m).__name__} has no unload()")
