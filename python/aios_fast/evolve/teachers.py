"""Teachers: the models a node asks when it has to learn a skill (Tier 2 of the loop).

Two providers share one interface (:class:`Teacher`):

* :class:`OpenAICompatibleProvider` speaks the OpenAI chat-completions API through the ``openai``
  client, against any ``base_url`` (OpenAI, vLLM, Ollama, llama.cpp, llama-cpp-python's server).
* :class:`LocalTeacher` runs the bundled SmolLM2-135M-Instruct in process, offline: the default
  (on llama.cpp when llama-cpp-python is installed, else on transformers).

Both also keep ArrowEngine's provider interface, ``query(prompt, system="") -> str`` and
``name()``. A teacher's reply is untrusted text: turn it into pairs with
:func:`aios_fast.evolve.parsing.parse_qa_pairs`, never use it as is.

Retries live in ONE layer, ours: the ``openai`` client is built with ``max_retries=0`` so a 429
is never retried twice over (client + us). Ours retries 429, 408, 5xx, timeouts and dropped
connections up to ``max_retries`` times, honours ``Retry-After`` / ``retry-after-ms`` (refusing
waits longer than ``max_retry_after``), otherwise backs off exponentially with full jitter
(Brooker, "Exponential Backoff And Jitter", AWS 2015), and charges every attempt and every wait
to the :class:`TeacherBudget`.

Contract 5 names are kept exactly. Additions beyond it (all optional): ``TeacherReply.attempts``,
``.structured`` and ``.finish_reason``; ``provider.stats``; ``TeacherBudget.charge/check/
remaining/reset/to_dict``; ``QA_SCHEMA``-style ``json_schema`` requests fall back from
``json_schema`` to ``json_object`` to plain text when a server rejects them (remembered per
provider).
"""

from __future__ import annotations

import email.utils
import logging
import math
import os
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

from ..errors import AiosError, InputError

if TYPE_CHECKING:  # pragma: no cover
    from ..engines.causal import CausalLM

__all__ = [
    "Teacher",
    "TeacherReply",
    "TeacherBudget",
    "TeacherError",
    "BudgetExceeded",
    "OpenAICompatibleProvider",
    "LocalTeacher",
    "API_KEY_ENV_VARS",
    "default_teacher",
]

log = logging.getLogger(__name__)

#: environment variables read, in order, when no ``api_key`` is passed
API_KEY_ENV_VARS = ("AIOS_TEACHER_API_KEY", "OPENAI_API_KEY")
# local servers (llama.cpp, vLLM, Ollama) ignore the key, but the client requires a non-empty one
_NO_KEY = "no-key"
_FORMAT_LEVELS = ("json_schema", "json_object", None)


class TeacherError(AiosError, RuntimeError):
    """A teacher could not answer: unreachable, timed out after retries, an HTTP error, or a malformed reply."""


class BudgetExceeded(TeacherError):
    """The distillation's teacher budget (requests, tokens or seconds) is spent; no request was sent."""


# ---------------------------------------------------------------------------------------- types
@dataclass(frozen=True)
class TeacherReply:
    """One completion: its text, token counts (the server's ``usage``, else estimated at
    4 characters per token), the wall seconds spent (retries and waits included), how many HTTP
    attempts it took, which structured-output mode the server accepted (``"json_schema"``,
    ``"json_object"`` or ``None``) and the finish reason."""

    text: str
    prompt_tokens: int
    completion_tokens: int
    seconds: float
    attempts: int = 1
    structured: str | None = None
    finish_reason: str | None = None

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens


@runtime_checkable
class Teacher(Protocol):
    """What the distiller needs from a teacher (both providers implement it)."""

    def name(self) -> str: ...

    def query(self, prompt: str, system: str = "") -> str: ...

    def complete(self, messages: list[dict], *, max_tokens: int = 256, temperature: float = 0.2,
                 json_schema: dict | None = None) -> TeacherReply: ...


def _check_limit(name: str, value: Any, kind: type) -> None:
    if value is None:
        return
    ok = isinstance(value, (int, float)) and not isinstance(value, bool)
    if kind is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
    if not ok or not math.isfinite(value) or value <= 0:
        raise InputError(f"TeacherBudget.{name} must be None or a positive {kind.__name__}, got {value!r}")


@dataclass
class TeacherBudget:
    """Total teacher spend allowed for one distillation.

    Args:
        max_requests: HTTP attempts / local generations (retries count), ``None`` = unlimited.
        max_tokens: prompt + completion tokens, ``None`` = unlimited. A request never asks for
            more completion tokens than remain.
        max_seconds: wall seconds spent inside teacher calls (waits between retries included),
            ``None`` = unlimited. A request's timeout is cut to what remains.

    :meth:`check` raises :class:`BudgetExceeded` *before* a request once any limit is reached.
    Thread-safe; share one instance between the teachers of a distillation, ``reset()`` it for
    the next one.
    """

    max_requests: int | None = None
    max_tokens: int | None = None
    max_seconds: float | None = None
    requests: int = field(default=0, init=False)
    tokens: int = field(default=0, init=False)
    seconds: float = field(default=0.0, init=False)

    def __post_init__(self) -> None:
        _check_limit("max_requests", self.max_requests, int)
        _check_limit("max_tokens", self.max_tokens, int)
        _check_limit("max_seconds", self.max_seconds, float)
        self._lock = threading.Lock()

    def check(self) -> None:
        """Raise :class:`BudgetExceeded` if another request would break a limit."""
        with self._lock:
            if self.max_requests is not None and self.requests >= self.max_requests:
                raise BudgetExceeded(f"teacher budget spent: {self.requests} of max_requests="
                                     f"{self.max_requests} requests used")
            if self.max_tokens is not None and self.tokens >= self.max_tokens:
                raise BudgetExceeded(f"teacher budget spent: {self.tokens} of max_tokens="
                                     f"{self.max_tokens} tokens used")
            if self.max_seconds is not None and self.seconds >= self.max_seconds:
                raise BudgetExceeded(f"teacher budget spent: {self.seconds:.1f} s of max_seconds="
                                     f"{self.max_seconds} s used")

    def charge(self, *, requests: int = 0, tokens: int = 0, seconds: float = 0.0) -> None:
        """Record spend (never raises: the next :meth:`check` does)."""
        with self._lock:
            self.requests += int(requests)
            self.tokens += int(tokens)
            self.seconds += float(seconds)

    def remaining(self) -> dict[str, float | None]:
        """What is left of each limit (``None`` = unlimited)."""
        with self._lock:
            return {
                "requests": None if self.max_requests is None else max(0, self.max_requests - self.requests),
                "tokens": None if self.max_tokens is None else max(0, self.max_tokens - self.tokens),
                "seconds": None if self.max_seconds is None else max(0.0, self.max_seconds - self.seconds),
            }

    def reset(self) -> None:
        """Forget the spend (start of a new distillation); limits stay."""
        with self._lock:
            self.requests, self.tokens, self.seconds = 0, 0, 0.0

    def to_dict(self) -> dict[str, Any]:
        with self._lock:
            return {"max_requests": self.max_requests, "max_tokens": self.max_tokens,
                    "max_seconds": self.max_seconds, "requests": self.requests,
                    "tokens": self.tokens, "seconds": round(self.seconds, 3)}


# --------------------------------------------------------------------------------- validation
def _validate_messages(messages: Any) -> list[dict]:
    if not isinstance(messages, (list, tuple)) or not messages:
        raise InputError(f"messages must be a non-empty list of {{'role', 'content'}} dicts, got {messages!r:.80}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or m.get("role") not in ("system", "user", "assistant") \
                or not isinstance(m.get("content"), str):
            raise InputError(f"messages[{i}] must be a dict with role 'system'|'user'|'assistant' and "
                             f"string 'content', got {m!r:.80}")
        out.append({"role": m["role"], "content": m["content"]})
    return out


def _validate_generation(max_tokens: Any, temperature: Any) -> None:
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise InputError(f"max_tokens must be a positive int, got {max_tokens!r}")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) \
            or not math.isfinite(temperature) or not 0 <= temperature <= 2:
        raise InputError(f"temperature must be a number in [0, 2], got {temperature!r}")


def _as_messages(prompt: str, system: str) -> list[dict]:
    if not isinstance(prompt, str) or not prompt.strip():
        raise InputError(f"prompt must be a non-empty string, got {prompt!r:.80}")
    if not isinstance(system, str):
        raise InputError(f"system must be a string, got {type(system).__name__}")
    msgs = [{"role": "system", "content": system}] if system else []
    return msgs + [{"role": "user", "content": prompt}]


def _estimate_tokens(text: str) -> int:
    return max(1, len(text) // 4) if text else 0


# ------------------------------------------------------------------------------ HTTP provider
def _retry_after(headers: Any) -> float | None:
    """Seconds the server asked us to wait (``retry-after-ms``, ``retry-after`` as seconds or an
    HTTP date), or ``None``."""
    if headers is None:
        return None
    raw = headers.get("retry-after-ms")
    if raw is not None:
        try:
            return max(0.0, float(raw) / 1000.0)
        except ValueError:
            pass
    raw = headers.get("retry-after")
    if raw is None:
        return None
    try:
        return max(0.0, float(raw))
    except ValueError:
        when = email.utils.parsedate_to_datetime(raw) if raw else None
        if when is None:
            return None
        return max(0.0, when.timestamp() - time.time())


class OpenAICompatibleProvider:
    """A teacher behind any OpenAI-compatible chat-completions endpoint.

    Args:
        base_url: the API root, e.g. ``https://api.openai.com/v1`` or ``http://127.0.0.1:8080/v1``.
        model: the model name the server knows.
        api_key: the key; ``None`` reads ``$AIOS_TEACHER_API_KEY`` then ``$OPENAI_API_KEY``; local
            servers need none. Never logged, never in ``repr`` or error messages.
        timeout: seconds per HTTP attempt (connect, read, write); cut to the budget's remainder.
        max_retries: extra attempts after a 429, 408, 5xx, timeout or dropped connection.
        budget: a :class:`TeacherBudget` charged for every attempt (``None`` = unlimited).
        max_retry_after: a ``Retry-After`` longer than this (seconds) is not waited for; the call
            fails with :class:`TeacherError` instead.
        backoff: first back-off delay (s) when the server gives no ``Retry-After``; doubles per
            retry, capped at 8 s, with full jitter.
        structured: ``"auto"`` tries ``json_schema`` then ``json_object`` then plain text when a
            ``json_schema`` is requested and the server rejects the format (HTTP 400/422);
            ``"json_object"`` starts there; ``"off"`` never sends ``response_format``.
    """

    def __init__(self, base_url: str, model: str, api_key: str | None = None, *, timeout: float = 30,
                 max_retries: int = 3, budget: TeacherBudget | None = None,
                 max_retry_after: float = 60.0, backoff: float = 0.5, structured: str = "auto") -> None:
        if not isinstance(base_url, str) or not base_url.startswith(("http://", "https://")):
            raise InputError(f"base_url must be an http:// or https:// URL, got {base_url!r}")
        if not isinstance(model, str) or not model.strip():
            raise InputError(f"model must be a non-empty string, got {model!r}")
        if not isinstance(timeout, (int, float)) or isinstance(timeout, bool) or not timeout > 0:
            raise InputError(f"timeout must be a positive number of seconds, got {timeout!r}")
        if not isinstance(max_retries, int) or isinstance(max_retries, bool) or max_retries < 0:
            raise InputError(f"max_retries must be an int >= 0, got {max_retries!r}")
        if budget is not None and not isinstance(budget, TeacherBudget):
            raise InputError(f"budget must be a TeacherBudget or None, got {type(budget).__name__}")
        if not isinstance(max_retry_after, (int, float)) or max_retry_after < 0:
            raise InputError(f"max_retry_after must be a number >= 0, got {max_retry_after!r}")
        if not isinstance(backoff, (int, float)) or backoff < 0:
            raise InputError(f"backoff must be a number >= 0, got {backoff!r}")
        if structured not in ("auto", "json_object", "off"):
            raise InputError(f"structured must be 'auto', 'json_object' or 'off', got {structured!r}")
        if api_key is not None and (not isinstance(api_key, str) or not api_key):
            raise InputError("api_key must be a non-empty string or None")
        self.base_url = base_url.rstrip("/")
        self.model = model
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self.budget = budget
        self.max_retry_after = float(max_retry_after)
        self.backoff = float(backoff)
        key = api_key or next((os.environ[v] for v in API_KEY_ENV_VARS if os.environ.get(v)), None)
        self._has_key = key is not None
        self._format_level = {"auto": 0, "json_object": 1, "off": 2}[structured]
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "retries": 0, "failures": 0, "format_fallbacks": 0,
                      "prompt_tokens": 0, "completion_tokens": 0}

        import openai

        # max_retries=0: this class is the one retry layer (see the module docstring)
        self._client = openai.OpenAI(base_url=self.base_url, api_key=key or _NO_KEY,
                                     timeout=self.timeout, max_retries=0)

    def __repr__(self) -> str:
        return (f"OpenAICompatibleProvider(base_url={self.base_url!r}, model={self.model!r}, "
                f"api_key={'<set>' if self._has_key else '<none>'}, timeout={self.timeout}, "
                f"max_retries={self.max_retries})")

    def name(self) -> str:
        """``"openai-compatible:<model>@<base_url>"``."""
        return f"openai-compatible:{self.model}@{self.base_url}"

    def query(self, prompt: str, system: str = "", *, max_tokens: int = 256) -> str:
        """ArrowEngine's interface: one user prompt (and an optional system prompt) -> reply text."""
        return self.complete(_as_messages(prompt, system), max_tokens=max_tokens).text

    def close(self) -> None:
        """Close the HTTP connection pool (also done when the provider is garbage-collected)."""
        client = getattr(self, "_client", None)
        if client is not None:
            client.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing left to clean up
            pass

    def __enter__(self) -> "OpenAICompatibleProvider":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---------------------------------------------------------------- one call, many attempts
    def complete(self, messages: list[dict], *, max_tokens: int = 256, temperature: float = 0.2,
                 json_schema: dict | None = None) -> TeacherReply:
        """Ask the teacher; returns its reply (text still untrusted).

        ``json_schema`` (a JSON Schema dict) asks for structured output where the server supports
        it; a server that rejects the format is asked again without it (and not again with it).

        Raises :class:`BudgetExceeded` before any request once the budget is spent, and
        :class:`TeacherError` when the server is unreachable, times out or fails after
        ``max_retries`` retries, answers a non-retryable HTTP error, or returns a malformed
        completion.
        """
        import openai

        messages = _validate_messages(messages)
        _validate_generation(max_tokens, temperature)
        if json_schema is not None and not isinstance(json_schema, dict):
            raise InputError(f"json_schema must be a dict (a JSON Schema) or None, got {type(json_schema).__name__}")
        start = time.monotonic()
        attempts = retries = 0
        while True:
            structured = _FORMAT_LEVELS[self._format_level] if json_schema is not None else None
            kwargs = self._request_kwargs(messages, max_tokens, temperature, json_schema, structured)
            attempts += 1
            t0 = time.monotonic()
            try:
                completion = self._client.chat.completions.create(**kwargs)
            except openai.APIStatusError as exc:
                self._spent(t0)
                status = exc.status_code
                # 400/422 is the usual "unsupported response_format"; llama-cpp-python's server answers
                # a 500 whose message names the field: retrying that unchanged cannot help
                format_rejected = status in (400, 422) or "response_format" in str(exc.message)
                if structured is not None and format_rejected and self._format_level < 2:
                    # the server does not support this response_format: step down, remember it
                    with self._lock:
                        self._format_level = max(self._format_level, _FORMAT_LEVELS.index(structured) + 1)
                        self.stats["format_fallbacks"] += 1
                    log.info("%s rejected response_format %s (HTTP %s); falling back", self.name(),
                             structured, status)
                    continue
                if status == 429 or status == 408 or status >= 500:
                    wait = _retry_after(exc.response.headers if exc.response is not None else None)
                    retries = self._before_retry(retries, f"HTTP {status}", wait)
                    continue
                self._fail()
                raise TeacherError(f"{self.name()} answered HTTP {status}: {_short(exc.message)}") from None
            except openai.APITimeoutError:
                self._spent(t0)
                retries = self._before_retry(retries, f"timed out after {kwargs['timeout']:.1f} s", None)
                continue
            except openai.APIConnectionError as exc:
                self._spent(t0)
                cause = exc.__cause__ or exc
                retries = self._before_retry(retries, f"connection failed ({type(cause).__name__}: "
                                                      f"{_short(str(cause))})", None)
                continue
            except openai.APIResponseValidationError as exc:
                self._spent(t0)
                self._fail()
                raise TeacherError(f"{self.name()} returned a malformed reply: {_short(str(exc))}") from None
            except openai.OpenAIError as exc:  # anything else the client raises is still a teacher failure
                self._spent(t0)
                self._fail()
                raise TeacherError(f"{self.name()} failed: {type(exc).__name__}: {_short(str(exc))}") from None
            self._spent(t0)
            reply = self._reply(completion, messages, time.monotonic() - start, attempts, structured)
            with self._lock:
                self.stats["prompt_tokens"] += reply.prompt_tokens
                self.stats["completion_tokens"] += reply.completion_tokens
            if self.budget is not None:
                self.budget.charge(tokens=reply.total_tokens)
            return reply

    def _request_kwargs(self, messages, max_tokens, temperature, json_schema, structured) -> dict:
        timeout = self.timeout
        if self.budget is not None:
            self.budget.check()
            left = self.budget.remaining()
            if left["tokens"] is not None:
                max_tokens = max(1, min(max_tokens, int(left["tokens"])))
            if left["seconds"] is not None:
                timeout = max(0.05, min(timeout, left["seconds"]))
            self.budget.charge(requests=1)
        with self._lock:
            self.stats["requests"] += 1
        kwargs: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                                  "temperature": float(temperature), "timeout": timeout}
        if structured == "json_schema":
            kwargs["response_format"] = {"type": "json_schema", "json_schema": {
                "name": str(json_schema.get("title") or "reply")[:64].replace(" ", "_"),
                "schema": json_schema}}
        elif structured == "json_object":
            # llama.cpp-family servers also read a "schema" here and constrain decoding by it
            kwargs["response_format"] = {"type": "json_object", "schema": json_schema}
        return kwargs

    def _spent(self, t0: float) -> None:
        if self.budget is not None:
            self.budget.charge(seconds=time.monotonic() - t0)

    def _fail(self) -> None:
        with self._lock:
            self.stats["failures"] += 1

    def _before_retry(self, retries: int, what: str, wait: float | None) -> int:
        """Sleep before the next attempt, or raise when retries, patience or budget are spent."""
        if retries >= self.max_retries:
            self._fail()
            raise TeacherError(f"{self.name()} failed after {retries + 1} attempt(s): {what}")
        if wait is not None and wait > self.max_retry_after:
            self._fail()
            raise TeacherError(f"{self.name()}: {what} with Retry-After {wait:.0f} s, longer than "
                               f"max_retry_after={self.max_retry_after:.0f} s; giving up")
        if wait is None:
            wait = random.uniform(0.0, min(8.0, self.backoff * 2.0 ** retries))
        if self.budget is not None:
            left = self.budget.remaining()["seconds"]
            if left is not None and wait >= left:
                self._fail()
                raise BudgetExceeded(f"{self.name()}: {what}; waiting {wait:.1f} s to retry would exceed "
                                     f"the teacher budget's remaining {left:.1f} s")
        log.info("%s: %s; retry %d of %d in %.2f s", self.name(), what, retries + 1, self.max_retries, wait)
        with self._lock:
            self.stats["retries"] += 1
        if wait > 0:
            time.sleep(wait)
            if self.budget is not None:
                self.budget.charge(seconds=wait)
        return retries + 1

    def _reply(self, completion: Any, messages, seconds: float, attempts: int,
               structured: str | None) -> TeacherReply:
        if not hasattr(completion, "choices"):  # the client hands back a non-JSON body as is
            self._fail()
            raise TeacherError(f"{self.name()} returned a malformed reply, not a chat completion: "
                               f"{_short(repr(completion))}")
        choices = completion.choices
        if not choices:
            self._fail()
            raise TeacherError(f"{self.name()} returned a completion without choices")
        message = getattr(choices[0], "message", None)
        text = getattr(message, "content", None)
        if not isinstance(text, str):
            self._fail()
            refusal = getattr(message, "refusal", None)
            raise TeacherError(f"{self.name()} returned no text content"
                               + (f" (refusal: {_short(refusal)})" if refusal else ""))
        usage = getattr(completion, "usage", None)
        pt = getattr(usage, "prompt_tokens", None)
        ct = getattr(usage, "completion_tokens", None)
        if not isinstance(pt, int) or pt < 0:
            pt = _estimate_tokens("".join(m["content"] for m in messages))
        if not isinstance(ct, int) or ct < 0:
            ct = _estimate_tokens(text)
        return TeacherReply(text=text, prompt_tokens=pt, completion_tokens=ct, seconds=seconds,
                            attempts=attempts, structured=structured,
                            finish_reason=getattr(choices[0], "finish_reason", None))


def _short(text: Any, n: int = 200) -> str:
    s = " ".join(str(text).split())
    return s if len(s) <= n else s[: n - 1] + "…"


# ------------------------------------------------------------------------------ local teacher
class LocalTeacher:
    """The bundled SmolLM2-135M-Instruct (or another GGUF / :class:`~aios_fast.engines.causal.CausalLM`)
    as a teacher, in process and offline: the default teacher.

    Args:
        model: ``None`` for the bundled SmolLM2 (loaded on first use), a ``CausalLM``, or a
            path to a ``.gguf`` file.
        budget: a :class:`TeacherBudget` charged per generation (``None`` = unlimited).
        seed: makes sampling (``temperature > 0``) reproducible; each call uses ``seed + n``.
        backend: ``"llama_cpp"`` runs the GGUF with llama.cpp in process
            (:class:`~aios_fast.evolve.local_llama.LlamaCppEngine`, several times faster per
            question on a CPU); ``"transformers"`` dequantises it into a ``CausalLM``; ``"auto"``
            (default) takes llama.cpp when ``llama-cpp-python`` is installed and ``model`` is a GGUF
            (or ``None``), else transformers. A ``CausalLM`` passed as ``model`` is transformers.
        n_threads: llama.cpp's CPU threads (``None``: torch's thread count).

    ``json_schema`` constrains decoding on the llama.cpp backend (its grammar for the schema) and is
    accepted but not enforced on transformers; either way the reply goes through the same robust
    parsing as any other. Calls are serialised by a lock (one model, one generation at a time).
    """

    BACKENDS = ("auto", "llama_cpp", "transformers")

    def __init__(self, model: "CausalLM | str | Path | None" = None, *, budget: TeacherBudget | None = None,
                 seed: int | None = 0, backend: str = "auto", n_threads: int | None = None) -> None:
        if budget is not None and not isinstance(budget, TeacherBudget):
            raise InputError(f"budget must be a TeacherBudget or None, got {type(budget).__name__}")
        if model is not None and not isinstance(model, (str, Path)) and not hasattr(model, "generate"):
            raise InputError(f"model must be None, a CausalLM or a .gguf path, got {type(model).__name__}")
        if backend not in self.BACKENDS:
            raise InputError(f"backend: expected one of {', '.join(self.BACKENDS)}, got {backend!r}")
        given_lm = model is not None and not isinstance(model, (str, Path))
        if given_lm and backend == "llama_cpp":
            raise InputError("backend='llama_cpp' needs a GGUF path (or None for the bundled one), "
                             "not a loaded CausalLM")
        if backend == "auto":
            from .local_llama import llama_cpp_available

            backend = "transformers" if given_lm or llama_cpp_available() else "llama_cpp"
        self.backend = backend
        self.n_threads = n_threads
        self._model = model if given_lm else None
        self._path = Path(model) if isinstance(model, (str, Path)) else None
        self.budget = budget
        self.seed = seed
        self._calls = 0
        self._lock = threading.Lock()
        self.stats = {"requests": 0, "prompt_tokens": 0, "completion_tokens": 0}

    @property
    def model(self) -> Any:
        """The loaded engine (on first access): a ``CausalLM`` (transformers) or a
        :class:`~aios_fast.evolve.local_llama.LlamaCppEngine`."""
        with self._lock:
            return self._load()

    def _load(self) -> Any:
        if self._model is None:
            if self.backend == "llama_cpp":
                from ..bundled import smollm2_gguf
                from .local_llama import LlamaCppEngine

                self._model = LlamaCppEngine(self._path or smollm2_gguf(), n_threads=self.n_threads)
            else:
                from ..engines.causal import CausalLM

                self._model = CausalLM(self._path)
        return self._model

    def __repr__(self) -> str:
        what = self._path or (getattr(self._model, "gguf_path", None) if self._model is not None else "bundled SmolLM2")
        return f"LocalTeacher(model={str(what)!r}, backend={self.backend!r})"

    def name(self) -> str:
        """``"local:<gguf file stem>"``, e.g. ``local:SmolLM2-135M-Instruct.Q4_1``."""
        if self._path is not None:
            return f"local:{self._path.stem}"
        if self._model is not None and getattr(self._model, "gguf_path", None) is not None:
            return f"local:{Path(self._model.gguf_path).stem}"
        from ..bundled import smollm2_gguf

        return f"local:{smollm2_gguf().stem}"

    def query(self, prompt: str, system: str = "", *, max_tokens: int = 256) -> str:
        """ArrowEngine's interface: one user prompt (and an optional system prompt) -> reply text."""
        return self.complete(_as_messages(prompt, system), max_tokens=max_tokens).text

    def complete(self, messages: list[dict], *, max_tokens: int = 256, temperature: float = 0.2,
                 json_schema: dict | None = None) -> TeacherReply:
        """Generate a reply with the chat template. Raises :class:`BudgetExceeded` once the
        budget is spent, :class:`TeacherError` if generation fails."""
        messages = _validate_messages(messages)
        _validate_generation(max_tokens, temperature)
        if json_schema is not None and not isinstance(json_schema, dict):
            raise InputError(f"json_schema must be a dict (a JSON Schema) or None, got {type(json_schema).__name__}")
        with self._lock:
            if self.budget is not None:
                self.budget.check()
                left = self.budget.remaining()["tokens"]
                if left is not None:
                    max_tokens = max(1, min(max_tokens, int(left)))
                self.budget.charge(requests=1)
            model = self._load()
            t0 = time.monotonic()
            seed = None if self.seed is None else self.seed + self._calls
            self._calls += 1
            try:
                if self.backend == "llama_cpp":
                    out = model.complete(messages, max_tokens=max_tokens, temperature=float(temperature),
                                         seed=seed, json_schema=json_schema)
                else:
                    out = self._transformers(model, messages, max_tokens, float(temperature), seed)
            except AiosError:
                raise
            except Exception as exc:  # a runtime failure inside the engine
                raise TeacherError(f"{self.name()} failed to generate: {type(exc).__name__}: {_short(exc)}") from exc
            finally:
                if self.budget is not None:
                    self.budget.charge(seconds=time.monotonic() - t0)
            seconds = time.monotonic() - t0
            pt, ct = out["prompt_tokens"], out["completion_tokens"]
            self.stats["requests"] += 1
            self.stats["prompt_tokens"] += pt
            self.stats["completion_tokens"] += ct
            if self.budget is not None:
                self.budget.charge(tokens=pt + ct)
        return TeacherReply(text=out["text"], prompt_tokens=pt, completion_tokens=ct, seconds=seconds,
                            attempts=1, structured=out["structured"], finish_reason=out["finish_reason"])

    @staticmethod
    def _transformers(model: "CausalLM", messages: list[dict], max_tokens: int, temperature: float,
                      seed: int | None) -> dict[str, Any]:
        prompt = model.chat_prompt(messages)
        text = model.generate(prompt, max_new_tokens=max_tokens, temperature=temperature, raw=True, seed=seed)
        tok = model.tokenizer
        pt = len(tok(prompt, add_special_tokens=False)["input_ids"])
        ct = len(tok(text, add_special_tokens=False)["input_ids"]) if text else 0
        return {"text": text, "prompt_tokens": pt, "completion_tokens": ct, "finish_reason": None,
                "structured": None}


def default_teacher(budget: TeacherBudget | None = None) -> LocalTeacher:
    """The node's default teacher: the bundled SmolLM2 in process."""
    return LocalTeacher(budget=budget)

