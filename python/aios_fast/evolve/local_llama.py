"""The bundled GGUF run in process by llama.cpp (``llama-cpp-python``): :class:`LocalTeacher`'s
fast backend.

The transformers engine dequantises SmolLM2's Q4_1 weights into float32 and decodes one token at a
time through PyTorch; llama.cpp computes on the quantised blocks directly and keeps the KV cache in
C. On the same GGUF it asked 2.4× as many questions per minute as the transformers engine when served
over HTTP (BENCHMARKS.md, "Distillation"); this backend is that engine without the server, so
nothing listens on a port and no child process has to be started or stopped.

Decoding matches :meth:`aios_fast.engines.causal.CausalLM.generate`: the GGUF's own chat template,
greedy at ``temperature == 0``, pure temperature sampling above it (no top-k, top-p or min-p
truncation and no repetition penalty), seeded per call; every prompt is evaluated from scratch, so
a reply depends on its prompt and seed only, never on the prompts before it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailableError, InputError

__all__ = ["LlamaCppEngine", "llama_cpp_available"]


def llama_cpp_available() -> str | None:
    """``None`` when ``llama_cpp`` can be imported here, else what to install."""
    if importlib.util.find_spec("llama_cpp") is None:
        return "llama-cpp-python is not installed; run `pip install llama-cpp-python`"
    return None


class LlamaCppEngine:
    """One ``llama_cpp.Llama`` over a GGUF, loaded on construction (not thread-safe: the caller
    serialises generations, as :class:`~aios_fast.evolve.teachers.LocalTeacher` does).

    Args:
        gguf: the model file.
        n_ctx: context window in tokens (prompt + reply).
        n_threads: CPU threads (``None``: torch's intra-op thread count, so the teacher uses what
            the rest of the process was given rather than every core of a shared machine).
    """

    def __init__(self, gguf: str | Path, *, n_ctx: int = 2048, n_threads: int | None = None) -> None:
        missing = llama_cpp_available()
        if missing:
            raise BackendUnavailableError(missing)
        self.gguf_path = Path(gguf)
        if not self.gguf_path.is_file():
            raise InputError(f"GGUF file {self.gguf_path} does not exist")
        if n_threads is None:
            import torch

            n_threads = max(1, torch.get_num_threads())
        if isinstance(n_threads, bool) or not isinstance(n_threads, int) or n_threads < 1:
            raise InputError(f"n_threads must be an int >= 1, got {n_threads!r}")
        import llama_cpp

        try:
            self.llm = llama_cpp.Llama(model_path=str(self.gguf_path), n_ctx=n_ctx, n_threads=n_threads,
                                       n_threads_batch=n_threads, verbose=False)
        except (ValueError, RuntimeError) as exc:   # llama.cpp's "failed to load model"
            raise InputError(f"{self.gguf_path}: llama.cpp could not load it as a model ({exc})") from exc
        self.n_threads = n_threads

    def complete(self, messages: list[dict], *, max_tokens: int, temperature: float, seed: int | None,
                 json_schema: dict | None = None) -> dict[str, Any]:
        """One chat completion: ``{"text", "prompt_tokens", "completion_tokens", "finish_reason",
        "structured"}``. With ``json_schema``, decoding is constrained by llama.cpp's grammar for
        that schema (``structured == "json_schema"``); a schema it cannot compile falls back to
        unconstrained decoding (``structured is None``), and the reply is parsed as untrusted text
        either way."""
        kwargs: dict[str, Any] = dict(messages=messages, max_tokens=max_tokens, temperature=float(temperature),
                                      top_k=0, top_p=1.0, min_p=0.0, repeat_penalty=1.0,
                                      seed=seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
        structured = None
        if json_schema is not None:
            try:
                out = self._fresh_completion(response_format={"type": "json_object", "schema": json_schema}, **kwargs)
                structured = "json_schema"
            except (ValueError, RuntimeError, TypeError, KeyError):   # a schema its grammar builder refuses
                out = self._fresh_completion(**kwargs)
        else:
            out = self._fresh_completion(**kwargs)
        choice = out["choices"][0]
        usage = out.get("usage") or {}
        return {"text": (choice["message"].get("content") or "").strip(),
                "prompt_tokens": int(usage.get("prompt_tokens", 0)),
                "completion_tokens": int(usage.get("completion_tokens", 0)),
                "finish_reason": choice.get("finish_reason"), "structured": structured}

    def _fresh_completion(self, **kwargs: Any) -> dict[str, Any]:
        # llama-cpp-python reuses the KV cache of the longest prefix the previous prompt shares and
        # evaluates only the rest; logits of a token evaluated in another batch split differ in the
        # last bits, enough to change a greedy reply (two identical greedy calls disagreed on this
        # CPU). Evaluating every prompt from scratch makes a reply a function of its prompt alone,
        # whatever ran before it (a resumed distillation asks its teacher in another order).
        self.llm.reset()
        return self.llm.create_chat_completion(**kwargs)

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.close()
