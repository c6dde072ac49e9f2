"""``fingerprint_model``: a short, stable identity of a base model's weights.

A card records the fingerprint of the model it was trained or extracted on, so that a node
can tell whether a card fits the model it serves before applying it.

Definition (``fp1``): SHA-256 over, for every tensor in order of sorted name, the name, the
dtype name and the shape, then 8 values (fewer for small tensors) read at evenly spaced flat
indices ``i_k = k·(n-1)//7`` as their raw little-endian bytes. Names, shapes and dtypes catch
a different architecture or precision; the sampled values catch different weights of the same
architecture, at a cost independent of model size (no full pass over the weights). It is an
identity check, not a security hash: a deliberately crafted model can collide.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping

import torch

from ..errors import InputError

__all__ = ["fingerprint_model"]

_SAMPLES = 8


def fingerprint_model(model_or_state_dict: torch.nn.Module | Mapping[str, torch.Tensor]) -> str:
    """Fingerprint a model (its ``state_dict()``) or a state dict; returns ``"fp1:<32 hex>"``.

    The same weights give the same fingerprint on any device; a change of any name, shape,
    dtype, or of a sampled value changes it.
    """
    if isinstance(model_or_state_dict, torch.nn.Module):
        sd: Mapping[str, torch.Tensor] = model_or_state_dict.state_dict()
    elif isinstance(model_or_state_dict, Mapping):
        sd = model_or_state_dict
    else:
        raise InputError(f"fingerprint_model takes an nn.Module or a state dict, got "
                         f"{type(model_or_state_dict).__name__}")
    if not sd:
        raise InputError("fingerprint_model: the model has no tensors")
    h = hashlib.sha256(b"aios-fp1")
    for name in sorted(sd):
        t = sd[name]
        if not isinstance(t, torch.Tensor):
            raise InputError(f"fingerprint_model: {name!r} is a {type(t).__name__}, not a tensor")
        desc = f"{name}|{str(t.dtype).removeprefix('torch.')}|{tuple(t.shape)}".encode()
        h.update(struct.pack("<Q", len(desc)) + desc)
        n = t.numel()
        if n:
            k = min(n, _SAMPLES)
            idx = torch.tensor([i * (n - 1) // max(k - 1, 1) for i in range(k)], dtype=torch.long)
            vals = t.detach().reshape(-1)[idx.to(t.device)].cpu().contiguous()
            h.update(vals.view(torch.uint8).numpy().tobytes())
    return "fp1:" + h.hexdigest()[:32]
