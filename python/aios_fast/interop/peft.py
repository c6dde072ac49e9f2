"""Cards to and from PEFT LoRA adapter directories.

``to_peft`` writes what ``peft.PeftModel.from_pretrained`` reads: ``adapter_model.safetensors``
with keys ``base_model.model.<module>.lora_A.weight`` / ``.lora_B.weight`` and an
``adapter_config.json`` (``r``, ``lora_alpha``, ``target_modules``, and ``rank_pattern`` /
``alpha_pattern`` where modules differ). The card's name, metadata, naming and fingerprint
ride along in the safetensors header metadata (key ``aios_card``), so card -> PEFT -> card is
exact. ``from_peft`` reads any PEFT LoRA adapter saved as safetensors (keys with or without the
adapter name, e.g. ``.default``), honouring ``rank_pattern``, ``alpha_pattern`` and
``use_rslora`` (scaling ``alpha/sqrt(r)``, Kalajdzievski 2023, folded into per-module alpha).
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import torch

from .._atomic import atomic_write
from ..cards.card import LoRACard
from ..errors import CardFormatError

__all__ = ["to_peft", "from_peft", "CONFIG_NAME", "WEIGHTS_NAME"]

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_PREFIX = "base_model.model."
_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_\-]+)?\.weight$")
_MAX_CONFIG_BYTES = 1 << 20


def to_peft(card: LoRACard, directory: str | os.PathLike,
            base_model_name_or_path: str | None = None) -> Path:
    """Write ``card`` as a PEFT LoRA adapter into ``directory`` (created if needed).

    Keys use Hugging Face names (an ArrowEngine-named card is translated). Patterns are
    written as anchored, escaped module names so PEFT's regex matching hits exactly one
    module. Returns the directory.
    """
    from safetensors.torch import save

    card.validate()
    hf = card.with_naming("hf")
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for m in hf.modules:
        tensors[f"{_PREFIX}{m}.lora_A.weight"] = hf.weights_A[m].detach().cpu().contiguous()
        tensors[f"{_PREFIX}{m}.lora_B.weight"] = hf.weights_B[m].detach().cpu().contiguous()
    aios = {"name": card.name, "rank": card.rank, "alpha": card.alpha,
            "target_modules": card.target_modules, "metadata": card.metadata,
            "naming": card.naming, "base_fingerprint": card.base_fingerprint}
    blob = save(tensors, metadata={"format": "pt", "aios_card": json.dumps(aios, sort_keys=True)})
    config = {
        "peft_type": "LORA",
        "task_type": None,
        "base_model_name_or_path": base_model_name_or_path,
        "r": hf.rank,
        "lora_alpha": hf.alpha,
        "target_modules": hf.modules,
        "rank_pattern": {re.escape(k): v for k, v in sorted(hf.rank_pattern.items())},
        "alpha_pattern": {re.escape(k): v for k, v in sorted(hf.alpha_pattern.items())},
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "inference_mode": True,
        "init_lora_weights": True,
    }
    atomic_write(out / WEIGHTS_NAME, lambda f: f.write(blob))
    atomic_write(out / CONFIG_NAME, lambda f: f.write(json.dumps(config, indent=2).encode()))
    return out


def _pattern_value(patterns: dict, key: str, default):
    # PEFT's rule (peft.utils.other.get_pattern_key): first pattern p with
    # re.match(rf"(.*\.)?({p})$", key) wins.
    for p, v in patterns.items():
        if re.match(rf"(.*\.)?({p})$", key):
            return v
    return default


def from_peft(directory: str | os.PathLike, name: str | None = None) -> LoRACard:
    """Read a PEFT LoRA adapter directory into a :class:`LoRACard` (Hugging Face naming,
    unless the adapter was written by :func:`to_peft` from a card with another scheme).

    Raises :class:`CardFormatError` for a missing or malformed config or weights, a non-LoRA
    adapter, DoRA, trained biases, or A/B keys that do not pair up.
    """
    from safetensors import SafetensorError, safe_open

    d = Path(directory)
    cfg_path, w_path = d / CONFIG_NAME, d / WEIGHTS_NAME
    for p in (cfg_path, w_path):
        if not p.is_file():
            hint = (" (only safetensors adapters are read; re-save a .bin adapter with "
                    "PEFT's save_pretrained(safe_serialization=True))"
                    if p is w_path and (d / "adapter_model.bin").is_file() else "")
            raise CardFormatError(f"{d}: not a PEFT adapter directory ({p.name} is missing){hint}")
    if cfg_path.stat().st_size > _MAX_CONFIG_BYTES:
        raise CardFormatError(f"{cfg_path}: config is over {_MAX_CONFIG_BYTES} bytes")
    try:
        cfg = json.loads(cfg_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CardFormatError(f"{cfg_path}: not valid JSON ({exc})") from None
    if not isinstance(cfg, dict) or cfg.get("peft_type", "LORA") != "LORA":
        raise CardFormatError(f"{cfg_path}: peft_type {cfg.get('peft_type') if isinstance(cfg, dict) else cfg!r} "
                              f"is not LORA")
    for flag, why in (("use_dora", "DoRA magnitude vectors"), ("lora_bias", "LoRA biases")):
        if cfg.get(flag):
            raise CardFormatError(f"{cfg_path}: {flag}=true ({why}) cannot be held by a card")
    if cfg.get("bias", "none") != "none":
        raise CardFormatError(f"{cfg_path}: bias={cfg['bias']!r}; a card holds no biases")
    try:
        r0, alpha0 = int(cfg["r"]), float(cfg["lora_alpha"])
    except (KeyError, TypeError, ValueError):
        raise CardFormatError(f"{cfg_path}: r / lora_alpha missing or not numbers") from None
    alpha_pattern_cfg = cfg.get("alpha_pattern") or {}
    A: dict[str, torch.Tensor] = {}
    B: dict[str, torch.Tensor] = {}
    try:
        with safe_open(w_path, framework="pt") as f:
            meta = f.metadata() or {}
            for key in f.keys():
                m = _KEY.match(key)
                if not m:
                    raise CardFormatError(f"{w_path}: tensor {key!r} is not a LoRA A/B weight "
                                          f"(embeddings, DoRA, modules_to_save are unsupported)")
                target = A if m["ab"] == "A" else B
                if m["module"] in target:
                    raise CardFormatError(f"{w_path}: module {m['module']!r} has two lora_{m['ab']} tensors")
                target[m["module"]] = f.get_tensor(key)
    except SafetensorError as exc:
        raise CardFormatError(f"{w_path}: not a readable safetensors file ({exc})") from None
    if not A:
        raise CardFormatError(f"{w_path}: holds no LoRA weights")
    keys = sorted(A)
    ranks = {k: int(A[k].shape[0]) for k in keys}
    alphas = {k: float(_pattern_value(alpha_pattern_cfg, k, alpha0)) for k in keys}
    if cfg.get("use_rslora"):
        # rsLoRA scales by alpha/sqrt(r); the card's alpha/r equals that with alpha*sqrt(r)
        alphas = {k: a * math.sqrt(ranks[k]) for k, a in alphas.items()}
        alpha0 = alpha0 * math.sqrt(r0)
    extra = None
    if "aios_card" in meta:
        try:
            extra = json.loads(meta["aios_card"])
            if not isinstance(extra, dict) or not {"name", "rank", "alpha", "target_modules",
                                                   "metadata"} <= set(extra):
                raise ValueError("missing fields")
        except ValueError as exc:
            raise CardFormatError(f"{w_path}: header entry aios_card is malformed ({exc})") from None
    rank = r0 if extra is None else int(extra["rank"])
    alpha = alpha0 if extra is None else float(extra["alpha"])
    card = LoRACard(
        name=name or (extra["name"] if extra else d.resolve().name),
        rank=rank, alpha=alpha, target_modules=keys, weights_A=A, weights_B=B,
        metadata=dict(extra["metadata"]) if extra else (
            {"peft_base_model": str(cfg["base_model_name_or_path"])}
            if cfg.get("base_model_name_or_path") else {}),
        rank_pattern={k: r for k, r in ranks.items() if r != rank},
        alpha_pattern={k: a for k, a in alphas.items() if a != alpha},
        naming="hf",
        base_fingerprint=extra.get("base_fingerprint") if extra else None)
    if extra and extra.get("naming", "hf") != "hf":
        card = card.with_naming(extra["naming"])
    if extra:
        card.target_modules = list(extra["target_modules"])
        card.validate()
    return card
