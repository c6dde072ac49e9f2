"""Training-time LoRA injection: trainable A, B beside frozen ``nn.Linear`` layers (and
transformers' GPT-2 ``Conv1D``, whose weight is stored (in, out): every layer the serving
wrapper's dispatch chain accepts).

``y = base(x) + scaling · (x Aᵀ) Bᵀ`` (Hu et al. 2021, "LoRA"), PEFT's orientation: A (r, in),
B (out, r). The wrapper is the serving one, :class:`aios_fast.lora.layer.LoRALayer`, holding a
trainable adapter (:meth:`~aios_fast.lora.layer.LoRALayer.add_trainable_adapter`) named
:data:`TRAIN_ADAPTER`: training, serving, merging and the scope rules share one forward and
one set of refusals, and a card the trainer exports from it is served by ``LoRAManager``
through the same code.

Init ``"default"`` is PEFT's: A Kaiming-uniform (a=√5), B zeros, so training starts at the base
model. Init ``"pissa"`` (Meng et al. 2024, "PiSSA: Principal Singular values and Singular
vectors Adaptation") starts A, B at the principal factors of W and trains on the residual
``W_res = W − scaling·B₀A₀`` kept in the base during training.

:func:`injected` wraps the layers (or adds to an existing wrapper) and, on exit (also on error),
removes its adapters, unwraps layers left without any, and copies the saved original weights
into place, so the base model is bit-identical. Cards a ``LoRAManager`` applies meanwhile stay.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
from torch import nn

from ..errors import CardMismatchError, InputError
from ..lora.layer import LoRALayer, geometry_of, model_lock, unwrap_if_empty, wrap_module

__all__ = ["LoRALinear", "TRAIN_ADAPTER", "resolve_targets", "init_factors", "injected", "DEFAULT_TARGETS"]

# what PEFT targets by default for these families: attention query and value projections
# (GPT-2 fuses them with the key into one Conv1D, c_attn)
DEFAULT_TARGETS = ("query", "value", "q_proj", "v_proj", "q_lin", "v_lin", "c_attn")

#: Name of the trainer's adapter inside each wrapped layer (distinct from any card's name, so
#: a card can be served on the same layers during training).
TRAIN_ADAPTER = "aios_fast_train"

# Former name of the training wrapper, kept because tests and callers check
# ``isinstance(m, LoRALinear)`` to see that training left no wrapper behind; the training
# layers are LoRALayers now, so the check keeps its meaning (and covers served wrappers too).
LoRALinear = LoRALayer


def resolve_targets(model: nn.Module, target_modules: Sequence[str] | str | None) -> list[str]:
    """Module keys of the layers to adapt: ``nn.Linear`` and GPT-2 ``Conv1D`` (what
    :func:`aios_fast.lora.layer.geometry_of` accepts).

    ``None``: every such layer whose last name part is in :data:`DEFAULT_TARGETS`. Otherwise the
    package's one selection rule (:func:`aios_fast.cards.naming.select_modules`): a list's
    entries name a key or a ``.``-suffix of it (``"query"`` matches
    ``encoder.layer.0.attention.self.query``); a string is a regular expression searched in
    the full key. Layers LoRA cannot adapt (quantised linears, MultiheadAttention's out_proj)
    are never candidates.
    """
    from ..cards.naming import select_modules

    mods = dict(model.named_modules())
    linears = {}
    for n, m in mods.items():
        # a wrapped layer (cards applied) is a candidate under its own name, never its inner
        # base_layer: its trainable adapter goes into the same wrapper
        if n.endswith(".base_layer") and isinstance(mods.get(n.rpartition(".")[0]), LoRALayer):
            continue
        if not isinstance(getattr(m, "weight", None), torch.Tensor):
            continue  # cheap filter: containers and weightless modules are never layers
        try:
            geometry_of(m, n, mods.get(n.rpartition(".")[0]))
        except CardMismatchError:
            continue  # not adaptable (norms, embeddings, quantised, MHA's out_proj)
        linears[n] = m
    if target_modules is None:
        keys = [n for n in linears if n.rsplit(".", 1)[-1] in DEFAULT_TARGETS]
        if not keys:
            raise CardMismatchError(f"default targets {DEFAULT_TARGETS} match no nn.Linear of "
                                    f"{type(model).__name__}; some Linear keys: {sorted(linears)[:6]}")
        return sorted(keys)
    try:
        keys = select_modules(linears, target_modules, what="target_modules", error=CardMismatchError)
    except CardMismatchError as exc:
        raise CardMismatchError(f"{exc} (candidates: the nn.Linear / Conv1D layers of "
                                f"{type(model).__name__}; they match no nn.Linear or Conv1D)") from None
    return sorted(keys)


def _principal_factors(W: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) with B0 @ A0 = the best rank-r approximation of W, split as √S on both sides.
    Uses ``LoRAExtractor.extract`` when that module is present, else ``torch.linalg.svd``."""
    try:
        from ..extract import LoRAExtractor  # helper D's extractor, when built

        out = LoRAExtractor().extract(W, rank)
        A0, B0 = out[0].to(torch.float32), out[1].to(torch.float32)
        if A0.shape == (rank, W.shape[1]) and B0.shape == (W.shape[0], rank):
            return A0, B0
    except (ImportError, AttributeError, TypeError):
        pass
    U, S, Vh = torch.linalg.svd(W.to(torch.float64), full_matrices=False)
    sq = S[:rank].sqrt()
    return (sq[:, None] * Vh[:rank]).to(torch.float32), (U[:, :rank] * sq).to(torch.float32)


def init_factors(model: nn.Module, keys: Sequence[str], rank: int, scaling: float, init: str,
                 generator: torch.Generator) -> tuple[dict, dict, dict]:
    """Initial (A, B) per key on CPU float32, and for PiSSA the residual weights ``W − s·B₀A₀``.

    For PiSSA the factors are divided by √scaling so that ``scaling·B₀A₀`` is exactly the
    principal part of W (as PEFT's ``pissa_init`` does) whatever alpha is.
    """
    mods = dict(model.named_modules())
    A, B, residual = {}, {}, {}
    for k in keys:
        lin = mods[k]
        geo = geometry_of(lin, k)
        out_f, in_f = geo.out_features, geo.in_features
        if rank > min(out_f, in_f):
            raise InputError(f"rank {rank} exceeds min(out, in) = {min(out_f, in_f)} of {k}")
        if init == "default":
            a = torch.empty(rank, in_f)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5), generator=generator)
            A[k], B[k] = a, torch.zeros(out_f, rank)
        elif init == "pissa":
            W = lin.weight.detach().to("cpu", torch.float32)
            if geo.fan_in_fan_out:  # Conv1D stores (in, out): factor the (out, in) map
                W = W.T
            a0, b0 = _principal_factors(W, rank)
            a0, b0 = a0 / math.sqrt(scaling), b0 / math.sqrt(scaling)
            A[k], B[k] = a0, b0
            res = W - scaling * (b0 @ a0)
            residual[k] = res.T.contiguous() if geo.fan_in_fan_out else res  # the layer's own layout
        else:
            raise InputError(f"init must be 'default' or 'pissa', got {init!r}")
    return A, B, residual


@contextmanager
def injected(model: nn.Module, A: dict, B: dict, scaling: float, residual: dict | None = None,
             train: bool = True, dropout: float = 0.0) -> Iterator[dict[str, LoRALayer]]:
    """Wrap each key's layer in a :class:`LoRALayer` (or use the wrapper already there) holding
    the trainable adapter :data:`TRAIN_ADAPTER` (A, B as given, float32 parameters on the
    model's device: ``layer.lora_A[TRAIN_ADAPTER]``, ``layer.lora_B[TRAIN_ADAPTER]``); freeze
    every other parameter. Restores modules, weights, ``requires_grad`` flags and train/eval
    mode on exit; wrappers that still hold a card (applied meanwhile) stay, minus the adapter."""
    mods = dict(model.named_modules())
    was_training = model.training
    # by object, not by name: a wrapper that stays (a card applied meanwhile) renames its base
    grad_flags = [(p, p.requires_grad) for p in model.parameters()]
    saved_weights: dict[str, torch.Tensor] = {}
    layers: dict[str, LoRALayer] = {}
    lock = model_lock(model)
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for k in A:
            w = mods[k].weight  # a wrapper's weight is its base layer's
            with lock:
                layer = wrap_module(model, k)
                layers[k] = layer
                # float32 master weights, copied: the caller's tensors are never trained in place
                layer.add_trainable_adapter(TRAIN_ADAPTER, A[k].to(w.device, torch.float32).clone(),
                                            B[k].to(w.device, torch.float32).clone(), scaling,
                                            dropout=dropout)
            if residual and k in residual:
                saved_weights[k] = w.detach().clone()
                with torch.no_grad():
                    w.copy_(residual[k].to(w.device, w.dtype))
        model.train(train)
        yield layers
    finally:
        with lock:
            for k, layer in layers.items():
                if TRAIN_ADAPTER in layer.adapters:
                    layer.remove_adapter(TRAIN_ADAPTER)
                unwrap_if_empty(model, k)
        with torch.no_grad():
            for k, w in saved_weights.items():
                mods[k].weight.copy_(w)
        for p, flag in grad_flags:
            p.requires_grad_(flag)
        model.train(was_training)
