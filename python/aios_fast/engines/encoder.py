"""Sentence embeddings from a BERT-family sentence-transformers directory, without the
sentence-transformers runtime: a transformers encoder, then the directory's pooling
(mean / CLS / max / mean-sqrt-len, Reimers & Gurevych 2019, "Sentence-BERT") and, where the
directory has a Normalize module, L2 normalisation.

With no path the bundled all-MiniLM-L6-v2 is used (``aios_fast.bundled.minilm_dir()``).
``encode`` matches ``sentence_transformers.SentenceTransformer(dir).encode`` within 1e-5.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch
import torch.nn.functional as F

from ..errors import InputError
from ._util import resolve_device

__all__ = ["SentenceEncoder", "PoolingConfig"]

_POOL_KEYS = {  # sentence-transformers' config keys, in the order it concatenates them
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "mean": "pooling_mode_mean_tokens",
    "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
}
_UNSUPPORTED_KEYS = ("pooling_mode_weightedmean_tokens", "pooling_mode_lasttoken")
_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin")


@dataclass(frozen=True)
class PoolingConfig:
    """Which poolings to apply (concatenated in sentence-transformers' order) and whether to normalise."""

    modes: tuple[str, ...] = ("mean",)
    normalize: bool = False

    def __post_init__(self) -> None:
        if not self.modes:
            raise InputError("PoolingConfig.modes is empty; use one or more of " + ", ".join(_POOL_KEYS))
        bad = [m for m in self.modes if m not in _POOL_KEYS]
        if bad:
            raise InputError(f"PoolingConfig.modes has unsupported {bad}; supported: {list(_POOL_KEYS)}")


def _read_json(path: Path) -> dict | list:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise InputError(f"{path} is not readable JSON: {exc}") from exc


def _pooling_from_file(path: Path) -> tuple[str, ...]:
    cfg = _read_json(path)
    if not isinstance(cfg, dict):
        raise InputError(f"{path} must hold a JSON object")
    if isinstance(cfg.get("pooling_mode"), str):  # newer single-key form
        mode = cfg["pooling_mode"].removesuffix("_tokens").removesuffix("_token")
        if mode not in _POOL_KEYS:
            raise InputError(f"{path}: pooling_mode {cfg['pooling_mode']!r} is not supported; "
                             f"supported: {list(_POOL_KEYS)}")
        return (mode,)
    for key in _UNSUPPORTED_KEYS:
        if cfg.get(key):
            raise InputError(f"{path}: {key} is not supported; supported poolings: {list(_POOL_KEYS)}")
    modes = tuple(m for m, key in _POOL_KEYS.items() if cfg.get(key))
    if not modes:
        raise InputError(f"{path} enables no pooling mode; expected one of {list(_POOL_KEYS.values())}")
    return modes


def _read_layout(root: Path) -> tuple[Path, PoolingConfig, int | None, bool]:
    """(transformer dir, pooling, max_seq_length or None, do_lower_case) of a model directory."""
    if not root.exists():
        raise InputError(f"model directory {root} does not exist")
    if not root.is_dir():
        raise InputError(f"{root} is not a directory; pass a sentence-transformers model directory")
    modules_file = root / "modules.json"
    transformer_dir, pooling = root, PoolingConfig(("mean",), normalize=False)
    if modules_file.is_file():
        modules = _read_json(modules_file)
        if not isinstance(modules, list):
            raise InputError(f"{modules_file} must hold a JSON list of modules")
        types = [str(m.get("type", "")).rsplit(".", 1)[-1] for m in modules if isinstance(m, dict)]
        paths = [str(m.get("path", "")) for m in modules if isinstance(m, dict)]
        if "Transformer" not in types:
            raise InputError(f"{modules_file} lists no sentence_transformers.models.Transformer module")
        transformer_dir = root / paths[types.index("Transformer")]
        modes: tuple[str, ...] = ("mean",)
        if "Pooling" in types:
            pool_cfg = root / paths[types.index("Pooling")] / "config.json"
            if not pool_cfg.is_file():
                raise InputError(f"{root}: modules.json names a Pooling module but {pool_cfg} is missing")
            modes = _pooling_from_file(pool_cfg)
        unknown = [t for t in types if t not in ("Transformer", "Pooling", "Normalize")]
        if unknown:
            raise InputError(f"{modules_file} has modules this encoder cannot run: {unknown}; "
                             "supported: Transformer, Pooling, Normalize")
        pooling = PoolingConfig(modes, normalize="Normalize" in types)
    config = transformer_dir / "config.json"
    if not config.is_file():
        raise InputError(f"{transformer_dir} has no config.json; it is not a transformers/BERT model directory")
    if not any((transformer_dir / f).is_file() for f in _WEIGHT_FILES):
        raise InputError(f"{transformer_dir} has no weights (expected one of {list(_WEIGHT_FILES)})")
    max_len, lower = None, False
    for name in ("sentence_bert_config.json", "sentence_xlnet_config.json"):
        sb = root / name if (root / name).is_file() else transformer_dir / name
        if sb.is_file():
            cfg = _read_json(sb)
            if isinstance(cfg, dict):
                max_len = cfg.get("max_seq_length")
                lower = bool(cfg.get("do_lower_case", False))
            break
    return transformer_dir, pooling, max_len, lower


def pool(token_embeddings: torch.Tensor, attention_mask: torch.Tensor,
         modes: Sequence[str] = ("mean",)) -> torch.Tensor:
    """Pool (n, seq, dim) token embeddings to (n, len(modes)*dim), ignoring padded positions."""
    mask = attention_mask.unsqueeze(-1).to(token_embeddings.dtype)
    out = []
    for mode in modes:
        if mode == "cls":
            out.append(token_embeddings[:, 0])
        elif mode == "max":
            neg = torch.finfo(token_embeddings.dtype).min
            out.append(token_embeddings.masked_fill(mask == 0, neg).max(dim=1).values)
        else:
            summed = (token_embeddings * mask).sum(dim=1)
            count = mask.sum(dim=1).clamp(min=1e-9)
            out.append(summed / (count if mode == "mean" else count.sqrt()))
    return out[0] if len(out) == 1 else torch.cat(out, dim=1)


class SentenceEncoder:
    """A sentence-transformers BERT-family model run directly on transformers.

    Args:
        path: model directory; ``None`` for the bundled all-MiniLM-L6-v2.
        device: ``"cpu"``, ``"cuda"``... where the model runs.
        max_length: token limit per text; ``None`` reads ``max_seq_length`` from the directory's
            ``sentence_bert_config.json`` (256 for MiniLM), else 256.

    ``model`` is the transformers encoder in eval mode (the module LoRAManager adapts),
    ``tokenizer`` its tokenizer, ``pooling`` the directory's :class:`PoolingConfig`.
    """

    def __init__(self, path: str | Path | None = None, device: str | torch.device = "cpu",
                 max_length: int | None = None) -> None:
        from transformers import AutoModel, AutoTokenizer

        if path is None:
            from ..bundled import minilm_dir

            path = minilm_dir()
        self.path = Path(path)
        transformer_dir, self.pooling, dir_max, self.do_lower_case = _read_layout(self.path)
        if max_length is None:
            max_length = int(dir_max) if dir_max else 256
        if not isinstance(max_length, int) or isinstance(max_length, bool) or max_length < 2:
            raise InputError(f"max_length must be an int >= 2, got {max_length!r}")
        device = resolve_device(device)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(transformer_dir)
            model = AutoModel.from_pretrained(transformer_dir)
        except (OSError, ValueError, KeyError) as exc:
            raise InputError(f"{transformer_dir} could not be loaded as a transformers encoder: {exc}") from exc
        model_max = getattr(model.config, "max_position_embeddings", None)
        self.max_length = min(max_length, model_max) if model_max else max_length
        self.model = model.to(device).eval()

    @property
    def device(self) -> torch.device:
        """Where the model's weights are now (follows the model if a trainer moves it)."""
        return next(self.model.parameters()).device

    @property
    def dim(self) -> int:
        """Width of one embedding."""
        return int(self.model.config.hidden_size) * len(self.pooling.modes)

    def __repr__(self) -> str:
        return (f"SentenceEncoder(path={str(self.path)!r}, device={str(self.device)!r}, "
                f"max_length={self.max_length}, pooling={self.pooling.modes}, dim={self.dim})")

    @staticmethod
    def _as_list(texts: str | Sequence[str]) -> list[str]:
        if isinstance(texts, str):
            return [texts]
        out = list(texts)
        bad = [i for i, t in enumerate(out) if not isinstance(t, str)]
        if bad:
            raise InputError(f"texts must be strings; item {bad[0]} is {type(out[bad[0]]).__name__}")
        return out

    def tokenize(self, texts: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise (padded to the longest, truncated to ``max_length``); tensors on ``device``."""
        texts = self._as_list(texts)
        if self.do_lower_case:
            texts = [t.lower() for t in texts]
        batch = self.tokenizer(texts, padding=True, truncation="longest_first",
                               max_length=self.max_length, return_tensors="pt")
        return {k: v.to(self.device) for k, v in batch.items()}

    def embed(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Pooled (n, dim) embeddings of a tokenised batch, not normalised; gradients flow
        (the trainer's forward). Uses the directory's pooling (mean for MiniLM)."""
        out = self.model(**batch)
        return pool(out[0], batch["attention_mask"], self.pooling.modes)

    def encode(self, texts: str | Sequence[str], normalize: bool | None = True,
               batch_size: int = 32) -> torch.Tensor:
        """Embed ``texts`` -> float32 (n, dim) CPU tensor, without gradients.

        ``normalize``: L2-normalise each row; ``None`` follows the directory (normalises when it has
        a Normalize module). Texts are batched by length, as sentence-transformers does, so padding
        stays small; the output keeps the input order. A single string gives a (1, dim) tensor.
        """
        texts = self._as_list(texts)
        if not isinstance(batch_size, int) or batch_size < 1:
            raise InputError(f"batch_size must be a positive int, got {batch_size!r}")
        if normalize is None:
            normalize = self.pooling.normalize
        if not texts:
            return torch.zeros((0, self.dim), dtype=torch.float32)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        out = torch.empty((len(texts), self.dim), dtype=torch.float32)
        was_training = self.model.training
        self.model.eval()  # no dropout, whatever state a trainer left the model in
        try:
            with torch.inference_mode():
                for start in range(0, len(order), batch_size):
                    idx = order[start:start + batch_size]
                    emb = self.embed(self.tokenize([texts[i] for i in idx])).float()
                    if normalize:
                        emb = F.normalize(emb, p=2, dim=1)
                    out[torch.tensor(idx)] = emb.cpu()
        finally:
            self.model.train(was_training)
        return out
