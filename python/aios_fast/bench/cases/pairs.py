"""Llama-shaped (base, tuned) checkpoint pairs for the extraction benchmarks, generated once and cached.

Random weights (timing does not depend on the values), bfloat16, saved as sharded safetensors
transformers directories (one shard per decoder layer, so generating a 7B-shaped pair never
holds more than a layer in memory). The tuned copy adds to every linear weight of the decoder
layers a planted rank-8 delta plus small noise. Generation is deterministic: the generator of
tensor ``i`` is seeded with ``seed * 1_000_003 + i``.

Pairs live under ``<aios_fast cache>/bench-pairs/<name>-s<seed>-v<format>/{base,tuned}``
(``AIOS_FAST_CACHE``, else ``$XDG_CACHE_HOME/aios_fast``, else ``~/.cache/aios_fast``), written
into a temporary directory and renamed into place when complete, so an interrupted run never
leaves a half pair behind.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

__all__ = ["PairShape", "SHAPES", "ensure_pair", "linear_names", "read_tensor", "pair_dir"]

_FORMAT = 1
PLANTED_RANK = 8


@dataclass(frozen=True)
class PairShape:
    """A Llama architecture (the fields of transformers' LlamaConfig that set the shapes)."""

    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    vocab_size: int
    tie_word_embeddings: bool
    label: str

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(out, in) of every decoder-layer linear: what both tools extract (no embeddings, no lm_head)."""
        h, i, d = self.hidden_size, self.intermediate_size, self.head_dim
        kv = self.num_key_value_heads * d
        per = {"self_attn.q_proj": (h, h), "self_attn.k_proj": (kv, h), "self_attn.v_proj": (kv, h),
               "self_attn.o_proj": (h, h), "mlp.gate_proj": (i, h), "mlp.up_proj": (i, h),
               "mlp.down_proj": (h, i)}
        return {f"model.layers.{layer}.{k}": v for layer in range(self.num_hidden_layers) for k, v in per.items()}

    def parameters(self) -> int:
        lin = sum(o * i for o, i in self.linear_shapes().values())
        emb = self.vocab_size * self.hidden_size * (1 if self.tie_word_embeddings else 2)
        norms = (2 * self.num_hidden_layers + 1) * self.hidden_size
        return lin + emb + norms

    def config(self) -> dict:
        return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
                "hidden_size": self.hidden_size, "intermediate_size": self.intermediate_size,
                "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
                "num_key_value_heads": self.num_key_value_heads, "head_dim": self.head_dim,
                "vocab_size": self.vocab_size, "tie_word_embeddings": self.tie_word_embeddings,
                "max_position_embeddings": 2048, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
                "initializer_range": 0.02, "attention_bias": False, "mlp_bias": False,
                "bos_token_id": 1, "eos_token_id": 2, "torch_dtype": "bfloat16", "dtype": "bfloat16",
                "use_cache": True}


SHAPES: dict[str, PairShape] = {
    # smoke size for --quick: SmolLM2's widths, 4 layers, a small vocabulary
    "tiny": PairShape(576, 1536, 4, 9, 3, 8192, True, "4-layer SmolLM2-width Llama"),
    "smollm2-135m": PairShape(576, 1536, 30, 9, 3, 49152, True, "SmolLM2-135M-shaped Llama"),
    "llama-1b": PairShape(2048, 8192, 16, 32, 8, 128256, True, "Llama-3.2-1B-shaped (1.2B parameters)"),
    "llama-7b": PairShape(4096, 11008, 32, 32, 32, 32000, False, "Llama-2-7B-shaped (6.7B parameters)"),
}


def pair_dir(name: str, seed: int = 0) -> Path:
    from ...engines.causal import cache_root

    return cache_root() / "bench-pairs" / f"{name}-s{seed}-v{_FORMAT}"


def _gen(seed: int, i: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + i)


def _randn(shape, gen, std) -> torch.Tensor:
    return (torch.randn(*shape, generator=gen) * std).to(torch.bfloat16)


def ensure_pair(name: str, seed: int = 0, progress: Callable[[str], None] = lambda m: None) -> Path:
    """The cached pair ``name`` (a key of :data:`SHAPES`), generated on first use. Returns the
    directory holding ``base/`` and ``tuned/``."""
    from safetensors.torch import save_file

    if name not in SHAPES:
        raise ValueError(f"unknown pair {name!r}; pairs: {sorted(SHAPES)}")
    shape = SHAPES[name]
    final = pair_dir(name, seed)
    if (final / "complete.json").exists():
        return final
    tmp = final.with_name(final.name + f".tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    for side in ("base", "tuned"):
        (tmp / side).mkdir(parents=True)
        (tmp / side / "config.json").write_text(json.dumps(shape.config(), indent=2))
    h, n_layers = shape.hidden_size, shape.num_hidden_layers
    index: dict[str, str] = {}
    idx = 0

    def put(tensors_base: dict, tensors_tuned: dict, shard: str) -> None:
        save_file(tensors_base, str(tmp / "base" / shard), metadata={"format": "pt"})
        save_file(tensors_tuned, str(tmp / "tuned" / shard), metadata={"format": "pt"})
        for k in tensors_base:
            index[k] = shard

    n_shards = n_layers + 1
    shard_name = "model-{:05d}-of-{:05d}.safetensors".format
    emb = {"model.embed_tokens.weight": _randn((shape.vocab_size, h), _gen(seed, idx), 0.02),
           "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}
    idx += 1
    if not shape.tie_word_embeddings:
        emb["lm_head.weight"] = _randn((shape.vocab_size, h), _gen(seed, idx), 0.02)
    idx += 1
    put(emb, emb, shard_name(1, n_shards))
    del emb
    shapes = shape.linear_shapes()
    for layer in range(n_layers):
        progress(f"generating {name} pair: layer {layer + 1}/{n_layers}")
        base, tuned = {}, {}
        for key, (out_f, in_f) in shapes.items():
            if not key.startswith(f"model.layers.{layer}."):
                continue
            g = _gen(seed, idx)
            idx += 1
            w = _randn((out_f, in_f), g, 0.02)
            delta = (torch.randn(out_f, PLANTED_RANK, generator=g) * 0.02) @ \
                torch.randn(PLANTED_RANK, in_f, generator=g) / PLANTED_RANK ** 0.5
            delta += 1e-4 * torch.randn(out_f, in_f, generator=g)
            base[key + ".weight"] = w
            tuned[key + ".weight"] = (w.float() + delta).to(torch.bfloat16)
            del delta
        for norm in ("input_layernorm", "post_attention_layernorm"):
            t = torch.ones(h, dtype=torch.bfloat16)
            base[f"model.layers.{layer}.{norm}.weight"] = t
            tuned[f"model.layers.{layer}.{norm}.weight"] = t.clone()
        put(base, tuned, shard_name(layer + 2, n_shards))
        del base, tuned
    total = {"metadata": {"total_size": 2 * shape.parameters()}, "weight_map": index}
    for side in ("base", "tuned"):
        (tmp / side / "model.safetensors.index.json").write_text(json.dumps(total, indent=1))
    (tmp / "complete.json").write_text(json.dumps({"name": name, "seed": seed, "format": _FORMAT,
                                                    "shape": asdict(shape), "planted_rank": PLANTED_RANK}))
    final.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.replace(tmp, final)
    except OSError:  # another process finished the same pair first
        shutil.rmtree(tmp, ignore_errors=True)
    return final


def linear_names(name: str) -> list[str]:
    """Module keys (no ``.weight``) both tools should extract from pair ``name``."""
    return list(SHAPES[name].linear_shapes())


def read_tensor(model_dir: Path, key: str) -> torch.Tensor:
    """One tensor of a sharded safetensors directory, as float32."""
    from safetensors import safe_open

    index = json.loads((model_dir / "model.safetensors.index.json").read_text())["weight_map"]
    with safe_open(str(model_dir / index[key]), framework="pt") as fh:
        return fh.get_tensor(key).float()
