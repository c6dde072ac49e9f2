"""Arrow routing: route to a LoRA card by its weights when it carries no example texts.

Ostapenko et al. 2024 ("Towards Modular LLMs by Building and Reusing a Library of LoRAs")
route with the top right singular vector of each adapted layer's update ``ΔW = s·B·A``: the
input direction the adapter amplifies most. A token whose hidden state ``h`` (the layer's
input) is aligned with it is one the adapter was made for; the sign of a singular vector is
arbitrary, hence ``|h·v|``.

The prototype comes from the ``r×r`` core, never from the ``out×in`` matrix: with
``B = Q_b R_b`` and ``Aᵀ = Q_a R_a`` (reduced QR), ``ΔW = s · Q_b (R_b R_aᵀ) Q_aᵀ``; if
``R_b R_aᵀ = U Σ Vᵀ`` then the right singular vectors of ``ΔW`` are ``Q_a V``. Cost
``O((in + out)·r²)`` instead of ``O(in·out·r)`` to form ``ΔW`` and more to decompose it.

A query's score for a card: the mean over the card's layers of the mean over the query's
tokens of ``|ĥ·v|`` with ``ĥ = h/‖h‖`` (so the score is a mean |cosine| in [0, 1]).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping, Sequence

import torch
import torch.nn.functional as F

from ..cards import naming as _naming
from ..errors import CardMismatchError, InputError

if TYPE_CHECKING:  # pragma: no cover
    from ..cards import LoRACard

__all__ = ["top_right_singular_vector", "card_prototypes", "ArrowIndex", "encode_with_hidden",
           "resolve_module"]


def top_right_singular_vector(A: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Unit top right singular vector (length ``in``) of ``B @ A`` (A: ``(r, in)``, B:
    ``(out, r)``), from the QR factors' ``r×r`` core; computed in float64, returned float32.
    The sign is arbitrary (as for any singular vector)."""
    if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
        raise InputError(f"A must be (r, in) and B (out, r); got A {tuple(A.shape)}, B {tuple(B.shape)}")
    a, b = A.detach().to("cpu", torch.float64), B.detach().to("cpu", torch.float64)
    Qb, Rb = torch.linalg.qr(b, mode="reduced")        # (out, k), (k, r)
    Qa, Ra = torch.linalg.qr(a.T, mode="reduced")      # (in, k'), (k', r)
    core = Rb @ Ra.T                                   # (k, k'): the whole update lives here
    _, _, Vh = torch.linalg.svd(core, full_matrices=False)
    v = Qa @ Vh[0]
    return F.normalize(v, dim=0).to(torch.float32)


def card_prototypes(card: "LoRACard") -> dict[str, torch.Tensor]:
    """Module key (in Hugging Face naming) -> unit prototype vector, for every module of the card."""
    out = {}
    for key in card.modules:
        hf = _naming.convert(key, card.naming, "hf") if card.naming != "hf" else key
        out[hf] = top_right_singular_vector(card.weights_A[key], card.weights_B[key])
    return out


def resolve_module(model: torch.nn.Module, key: str) -> str:
    """The name of ``model``'s module that card key ``key`` means: exact, or the model wraps
    the key (``0.auto_model.<key>``), or the key carries a prefix the model lacks."""
    names = {n for n, _ in model.named_modules() if n and not n.endswith(".base_layer")}
    if key in names:
        return key
    hits = [n for n in names if n.endswith("." + key)]
    if len(hits) == 1:
        return hits[0]
    parts = key.split(".")
    for i in range(1, len(parts)):
        tail = ".".join(parts[i:])
        if tail in names:
            return tail
    raise CardMismatchError(f"card key {key!r} matches no module of the encoder "
                            f"(modules look like {sorted(names)[:3]})")


class ArrowIndex:
    """Prototypes of several example-less skills, grouped by layer for vectorised scoring.

    Args:
        prototypes: skill name -> {module key -> unit prototype (in,)}.
    """

    def __init__(self, prototypes: Mapping[str, Mapping[str, torch.Tensor]]) -> None:
        self.names = sorted(prototypes)
        col = {n: i for i, n in enumerate(self.names)}
        by_module: dict[str, list[tuple[int, torch.Tensor]]] = {}
        for n in self.names:
            if not prototypes[n]:
                raise InputError(f"skill {n!r} has no prototypes")
            for key, v in prototypes[n].items():
                by_module.setdefault(key, []).append((col[n], v))
        self.modules = sorted(by_module)
        # per module: skill columns and their (S_m, in) prototype matrix
        self._cols = {m: torch.tensor([c for c, _ in by_module[m]]) for m in self.modules}
        self._V = {m: torch.stack([v for _, v in by_module[m]]) for m in self.modules}
        self._layers = torch.zeros(len(self.names))
        for m in self.modules:
            self._layers[self._cols[m]] += 1

    def score(self, hidden: Mapping[str, tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
        """``(n, S)`` scores from ``hidden``: module key -> (token states ``(n, T, in)``,
        attention mask ``(n, T)``), as :func:`encode_with_hidden` returns them."""
        n = next(iter(hidden.values()))[0].shape[0] if hidden else 0
        total = torch.zeros((n, len(self.names)))
        for m in self.modules:
            H, mask = hidden[m]
            Hn = F.normalize(H.float(), dim=-1)
            a = (Hn @ self._V[m].T).abs()                         # (n, T, S_m)
            w = mask.to(a.dtype).unsqueeze(-1)
            per = (a * w).sum(1) / w.sum(1).clamp_min(1)          # mean over real tokens
            total[:, self._cols[m]] += per
        return total / self._layers.clamp_min(1)


def encode_with_hidden(encoder: Any, texts: Sequence[str], keys: Sequence[str]
                       ) -> tuple[torch.Tensor, dict[str, tuple[torch.Tensor, torch.Tensor]]]:
    """One encoder forward that returns both the L2-normalised sentence embeddings ``(n, d)``
    and, for each card module key, the inputs of that layer ``(n, T, in)`` with the mask."""
    model = encoder.model
    mods = {k: resolve_module(model, k) for k in keys}
    captured: dict[str, torch.Tensor] = {}
    handles = []
    for k, name in mods.items():
        def hook(_mod, args, _k=k):
            captured[_k] = args[0].detach()
        handles.append(model.get_submodule(name).register_forward_pre_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            batch = encoder.tokenize(list(texts))
            emb = F.normalize(encoder.embed(batch).float(), p=2, dim=1).cpu()
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    mask = batch["attention_mask"].cpu()
    return emb, {k: (captured[k].cpu(), mask) for k in keys}
