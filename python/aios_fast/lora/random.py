"""Random LoRA cards of the right shapes for a model: test fixtures, benchmarks, smoke checks.

Unlike PEFT's default initialisation (``B = 0``, so the adapter starts as a no-op), both
factors are non-zero here, so an applied card really changes the model's output.
"""

from __future__ import annotations

from typing import Mapping

import torch
from torch import nn

from ..errors import InputError
from .layer import geometry_of

__all__ = ["linear_shapes", "random_card"]


def linear_shapes(model: nn.Module, modules: str | list[str] | None = None) -> dict[str, tuple[int, int]]:
    """Module name -> ``(in_features, out_features)`` for every layer LoRA can adapt in
    ``model``, optionally only those :func:`aios_fast.cards.naming.select_modules` picks with
    ``modules`` (a regex searched in the name, or a list of names / ``.``-suffixes)."""
    from ..cards.naming import select_modules

    out = {}
    mods = dict(model.named_modules())
    for name, mod in mods.items():
        if not name or name.endswith(".base_layer"):
            continue
        try:
            geo = geometry_of(mod, name, mods.get(name.rpartition(".")[0]))
        except ValueError:
            continue
        out[name] = (geo.in_features, geo.out_features)
    if modules is None:
        return out
    return {n: out[n] for n in select_modules(out, modules, what="modules")}


def random_card(shapes: Mapping[str, tuple[int, int]] | nn.Module, *, name: str = "random",
                rank: int = 8, alpha: float = 16.0, seed: int = 0, std: float = 0.02,
                dtype: torch.dtype = torch.float32, **card_kwargs):
    """A :class:`aios_fast.LoRACard` with Gaussian ``A`` (r, in) and ``B`` (out, r).

    Args:
        shapes: a model (every adaptable layer) or module name -> ``(in, out)``.
        name, rank, alpha: the card's header.
        seed: generator seed (the same seed gives the same card).
        std: standard deviation of both factors.
        dtype: tensor dtype (float32 / float16 / bfloat16).
        card_kwargs: passed on to ``LoRACard`` (``naming``, ``metadata``, ...).
    """
    from ..cards import LoRACard

    if isinstance(shapes, nn.Module):
        shapes = linear_shapes(shapes)
    if not shapes:
        raise InputError("random_card needs at least one module shape")
    g = torch.Generator().manual_seed(seed)
    A, B = {}, {}
    for key, (fan_in, fan_out) in shapes.items():
        A[key] = (torch.randn(rank, fan_in, generator=g) * std).to(dtype)
        B[key] = (torch.randn(fan_out, rank, generator=g) * std).to(dtype)
    return LoRACard(name=name, rank=rank, alpha=alpha, target_modules=list(A),
                    weights_A=A, weights_B=B, **card_kwargs)
