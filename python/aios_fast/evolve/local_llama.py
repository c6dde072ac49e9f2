"""The bundled GGUF run in process by llama.cpp (``llama-cpp-python``): :class:`LocalTeacher`'s
fast backend.

The transformers engine dequantises SmolLM2's Q4_1 weights into float32 and decodes one token at a
time through PyTorch; llama.cpp computes on the quantised blocks directly and keeps the KV cache in
C. On the same GGUF it asked 2.4× as many questions per minute as the transformers engine when served
over HTTP (BENCHMARKS.md, "Distillation"); this backend is that engine without the server, so
nothing listens on a port and no child process has to be started or stopped.

Decoding matches :meth:`aios_fast.engines.causal.CausalLM.generate`: the GGUF's own chat template,
greedy at ``temperature == 0``, pure temperature sampling above it (no top-k, top-p or min-p
truncation and no repetition penalty), seeded per call. A prompt's earlier turns (system prompt,
few-shot examples) are evaluated once and their KV cache kept; only the last turn is evaluated per
call, always from the same point, so a reply depends on its messages and seed only, never on the
prompts before it.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from ..errors import BackendUnavailableError, InputError

__all__ = ["LlamaCppEngine", "llama_cpp_available"]

#: a shared prefix shorter than this many tokens is re-evaluated rather than kept
_MIN_KEPT = 32


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
        self._kept: list[int] | None = None   # the prefix whose KV cache stays (see _fresh_completion)
        self._formatter = _template_renderer(self.llm)

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
        # CPU). So the reuse is pinned: a prompt reuses exactly the tokens of its messages before
        # the last one (a system prompt and few-shot turns, evaluated once from scratch and kept),
        # never more, so a reply is a function of its messages alone, whatever ran before it (a
        # resumed distillation asks its teacher in another order).
        prefix = self._prefix_tokens(kwargs["messages"])
        if prefix is None or prefix != self._kept:
            self.llm.reset()
            self._kept = None
            if prefix is not None:
                self.llm.eval(prefix)
                self._kept = prefix
        if self._kept is not None:
            # llama.cpp drops the KV cache past this point and evaluates the prompt's rest
            self.llm.n_tokens = len(self._kept)
        try:
            return self.llm.create_chat_completion(**kwargs)
        finally:
            # had the prompt llama.cpp evaluated not started with the kept tokens (a template
            # rendered otherwise than here), their cache was overwritten: never reuse it
            if self._kept is not None and list(self.llm.input_ids[:len(self._kept)]) != self._kept:
                self._kept = None

    def _prefix_tokens(self, messages: list[dict]) -> list[int] | None:
        """The tokens of ``messages[:-1]`` as the chat template renders them, when they are the
        start of the whole prompt's tokens and long enough to be worth keeping; else ``None``."""
        if len(messages) < 2 or self._formatter is None:
            return None
        try:
            head = self._formatter(messages=messages[:-1], add_generation_prompt=False)
            whole = self._formatter(messages=messages, add_generation_prompt=True)
        except Exception:   # a template that cannot render a partial conversation: no reuse
            return None
        if not whole.startswith(head):
            return None
        tok = self.llm.tokenize   # as llama-cpp-python's chat handler does: the template writes any BOS
        head_ids = tok(head.encode("utf-8"), add_bos=False, special=True)
        whole_ids = tok(whole.encode("utf-8"), add_bos=False, special=True)
        if len(head_ids) < _MIN_KEPT or whole_ids[:len(head_ids)] != head_ids or len(whole_ids) <= len(head_ids):
            return None
        return head_ids

    def close(self) -> None:
        llm, self.llm = getattr(self, "llm", None), None
        if llm is not None:
            llm.close()


def _template_renderer(llm: Any):
    """``render(messages=..., add_generation_prompt=...) -> str`` with the GGUF's own chat
    template, as llama-cpp-python renders it for ``create_chat_completion``; ``None`` when the
    model has no template (then every prompt is evaluated from scratch)."""
    template = (getattr(llm, "metadata", None) or {}).get("tokenizer.chat_template")
    if not template:
        return None
    from llama_cpp import llama_chat_format

    def text(token: int) -> str:
        return llm.detokenize([token], special=True).decode("utf-8", errors="ignore") if token >= 0 else ""

    eos, bos = text(llm.token_eos()), text(llm.token_bos())

    formatters = {g: llama_chat_format.Jinja2ChatFormatter(template=template, eos_token=eos, bos_token=bos,
                                                           add_generation_prompt=g) for g in (False, True)}

    def render(*, messages: list[dict], add_generation_prompt: bool) -> str:
        return formatters[add_generation_prompt](messages=messages).prompt

    return render

