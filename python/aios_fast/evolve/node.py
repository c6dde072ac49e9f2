"""``SkillNode``: the object ArrowEngine delegates to — route, apply, encode, and learn in the
background what could not be served.

``encode_with_lora(sentences, intent_query)``:

1. embed the routing query (by default the first sentence) once;
2. route it (:class:`LoRARouter`, calibrated confidence);
3. confident: encode the sentences with the chosen card applied *for this call only*
   (``LoRAManager.applied``: a per-thread scope, so concurrent calls with different skills each
   get their own result); unsure: the plain embeddings are the answer — and when the routing
   query is one of the sentences, they were all computed in step 1, so the call costs exactly
   one encoder forward;
4. hand unsure queries to the :class:`CognitiveTrigger`; a fired request goes to a bounded
   queue served by one background worker thread (one job per topic). The encode path never
   waits for learning.

The learner plugs in through ``learn(request)`` (:class:`aios_fast.evolve.jobs.Learner`);
without one, requests wait in the queue and are visible in :meth:`SkillNode.status`.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import OrderedDict, deque
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..errors import AiosError, CardFormatError, CardMismatchError, InputError
from .jobs import LearningRequest, LearnOutcome
from .trigger import CognitiveTrigger

__all__ = ["SkillNode"]

log = logging.getLogger(__name__)

_CARD_CACHE = 32       # loaded cards kept in memory (LRU)
_HISTORY = 50          # finished jobs kept for status()


def _default_library_dir() -> Path:
    return Path.home() / ".aios_fast" / "skills"


def _positive_int(name: str, value: Any, also: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InputError(f"{name} must be {also}an int >= 1, got {value!r}")


class SkillNode:
    """A self-evolving node around one sentence encoder (ArrowEngine's method names).

    Args:
        encoder: a :class:`SentenceEncoder` (default: the bundled MiniLM).
        library_dir: the :class:`SkillLibrary` directory (default ``~/.aios_fast/skills``).
        learner: anything with ``learn(request)`` (see :class:`Learner`); may be set later with
            :meth:`set_learner`.
        threshold: routing confidence at which a skill is applied (router and trigger).
        trigger: a ready :class:`CognitiveTrigger`; default one keeps its state in
            ``library_dir/trigger``; ``trigger_options`` are passed to it.
        queue_size: pending learning requests kept at most (further ones are refused and the
            topic backs off).
        start_worker: start the background worker thread now.
        learner_threads: torch (OpenMP) threads the worker trains with (``None``: what the
            thread inherits). A caller that keeps its own threads at one while the worker
            learns (as ``aios-fast evolve`` does) gives the worker the whole machine: libgomp
            stops spin-waiting once more of its threads exist than cores, so a second thread
            with its own OpenMP team made training 1.5-2x slower on 2 cores (BENCHMARKS.md).
    """

    def __init__(self, encoder: Any = None, library_dir: str | Path | None = None,
                 learner: Any = None, *, threshold: float = 0.5, trigger: CognitiveTrigger | None = None,
                 trigger_options: dict[str, Any] | None = None, queue_size: int = 16,
                 start_worker: bool = True, learner_threads: int | None = None) -> None:
        from ..lora import LoRAManager
        from ..route.library import SkillLibrary
        from ..route.router import LoRARouter

        if encoder is None:
            from ..engines import SentenceEncoder

            encoder = SentenceEncoder()
        _positive_int("queue_size", queue_size)
        if learner_threads is not None:
            _positive_int("learner_threads", learner_threads, "None or ")
        self.learner_threads = learner_threads
        self.encoder = encoder
        self.library = SkillLibrary(library_dir if library_dir is not None else _default_library_dir(),
                                    encoder=encoder)
        self.router = LoRARouter(encoder, self.library, threshold=threshold)
        if trigger is None:
            opts = {"threshold": threshold, "state_dir": self.library.directory / "trigger"}
            opts.update(trigger_options or {})
            trigger = CognitiveTrigger(**opts)
        self.trigger = trigger
        self.manager = LoRAManager(encoder.model)
        self.publish_hooks: list[Callable[[Any], None]] = []
        self.problems: list[str] = []
        self._learner = None
        self._cards: OrderedDict[str, Any] = OrderedDict()
        self._cards_lock = threading.Lock()
        self._cv = threading.Condition()
        self._queue: deque[LearningRequest] = deque()
        self._queue_size = queue_size
        self._pending: dict[str, LearningRequest] = {}     # topic -> queued request
        self._running: dict[str, dict[str, Any]] = {}      # topic -> {request, started}
        self._history: deque[dict[str, Any]] = deque(maxlen=_HISTORY)
        self._closed = False
        self._base_fp: str | None = None
        self.refresh_interval = 2.0
        self._refreshed_at = time.monotonic()
        self._worker: threading.Thread | None = None
        if learner is not None:
            self.set_learner(learner)
        if start_worker:
            self._start_worker()

    # ------------------------------------------------------------------ encoding
    def encode_with_lora(self, sentences: str | Sequence[str], intent_query: str | None = None,
                         *, normalize: bool = True, batch_size: int = 32, return_route: bool = False,
                         **kwargs: Any):
        """Embed ``sentences`` with the skill their intent routes to.

        Args:
            sentences: one text or a list of texts.
            intent_query: the text to route on (default: the first sentence).
            normalize, batch_size: passed to :meth:`SentenceEncoder.encode`.
            return_route: also return the :class:`RouteResult`.
        Returns:
            ``(n, dim)`` float32 tensor (and the route when ``return_route``).
        """
        if kwargs:
            raise InputError(f"encode_with_lora: unexpected options {sorted(kwargs)}")
        texts = [sentences] if isinstance(sentences, str) else list(sentences)
        if not texts:
            raise InputError("encode_with_lora: give at least one sentence")
        if any(not isinstance(t, str) for t in texts):
            raise InputError("encode_with_lora: sentences must be strings")
        intent = texts[0] if intent_query is None else intent_query
        if not isinstance(intent, str) or not intent.strip():
            raise InputError("encode_with_lora: intent_query must be a non-empty string")
        self._maybe_refresh()
        plain = None
        reuse = normalize and intent in texts
        if reuse:
            # the routing embedding is computed with no card: it is the answer if none applies
            plain = self.encoder.encode(texts, normalize=True, batch_size=batch_size)
            q = plain[texts.index(intent)].unsqueeze(0)
        else:
            q = self.encoder.encode([intent])
        if self.router.needs_token_states:
            route = self.router.route(intent)          # Arrow skills need token states
        else:
            route = self.router.route_embeddings(q)[0]
        self._observe(intent, route, q)
        out = None
        if route.skill is not None:
            card = self._card(route.skill)
            if card is not None:
                try:
                    with self.manager.applied(card, check_fingerprint=False):  # checked at load
                        out = self.encoder.encode(texts, normalize=normalize, batch_size=batch_size)
                except (CardMismatchError, InputError) as exc:
                    self._problem(f"skill {route.skill!r} could not be applied: {exc}")
        if out is None:
            out = plain if plain is not None else self.encoder.encode(texts, normalize=normalize,
                                                                     batch_size=batch_size)
        return (out, route) if return_route else out

    def encode(self, sentences: str | Sequence[str], **kw: Any) -> torch.Tensor:
        """Plain embeddings, no routing and no skill (ArrowEngine's ``encode``)."""
        return self.encoder.encode(sentences, **kw)

    # ------------------------------------------------------------------ skills
    def register_lora(self, path: str | Path, examples: Sequence[str] = (), description: str | None = None,
                      *, origin: str = "trained", **kw: Any):
        """Add a card file to the library (bytes copied verbatim, checked) and route to it.
        Returns its :class:`SkillEntry`."""
        entry = self.library.add(path, examples, description, origin=origin, **kw)
        self.router.refresh()
        return entry

    def list_skills(self) -> list[dict[str, Any]]:
        """The routable skills (resolved versions) as dicts: name, version, description, origin,
        number of examples, passed, content hash."""
        return [{"name": e.name, "version": e.version, "description": e.description,
                 "origin": e.origin, "examples": len(e.examples), "passed": e.passed,
                 "content_hash": e.content_hash} for e in self.library.list()]

    def status(self) -> dict[str, Any]:
        """Skills, pending and running learning jobs, finished jobs, the trigger's topics and
        last decisions, the router's calibration, and problems (JSON-able)."""
        with self._cv:
            pending = [r.to_dict() for r in self._queue]
            running = [{"request": j["request"].to_dict(), "started": j["started"]}
                       for j in self._running.values()]
            history = list(self._history)
        return {"skills": self.list_skills(), "pending": pending, "running": running,
                "finished": history, "learner": None if self._learner is None else type(self._learner).__name__,
                "topics": self.trigger.topics(), "decisions": self.trigger.recent(20),
                "router": self.router.status(),
                "problems": list(self.problems) + self.library.problems + self.trigger.problems}

    # ------------------------------------------------------------------ learning
    def set_learner(self, learner: Any) -> None:
        """Plug in a learner (``learn(request)``); queued requests start being served."""
        if learner is not None and not callable(getattr(learner, "learn", None)):
            raise InputError(f"a learner needs a learn(request) method; {type(learner).__name__} has none")
        with self._cv:
            self._learner = learner
            self._cv.notify_all()

    @property
    def learner(self) -> Any:
        return self._learner

    def submit(self, request: LearningRequest) -> bool:
        """Queue a learning request without waiting. Returns False (and tells the trigger) when
        its topic already has a job or the queue is full."""
        if not isinstance(request, LearningRequest):
            raise InputError(f"submit takes a LearningRequest, got {type(request).__name__}")
        with self._cv:
            if self._closed:
                raise InputError("the node is closed")
            if request.topic_id in self._pending or request.topic_id in self._running:
                return False
            if len(self._queue) >= self._queue_size:
                full = True
            else:
                full = False
                self._queue.append(request)
                self._pending[request.topic_id] = request
                self._cv.notify_all()
        if full:
            self._problem(f"learning queue full ({self._queue_size}); request for topic "
                          f"{request.topic_id} dropped and backed off")
            self._safe(self.trigger.job_failed, request.topic_id, "queue full")
            return False
        return True

    def wait_idle(self, timeout: float | None = None) -> bool:
        """Block until no learning job is queued or running (True), or ``timeout`` seconds pass
        (False). With no learner, queued requests stay queued: this then waits only for running
        jobs."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cv:
            while self._running or (self._queue and self._learner is not None):
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    return False
                self._cv.wait(left)
            return True

    def close(self, timeout: float = 30.0) -> None:
        """Stop the worker (a running job finishes first, up to ``timeout``); idempotent."""
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        w = self._worker
        if w is not None and w is not threading.current_thread():
            w.join(timeout)
        self._safe(self.trigger.flush)

    def __enter__(self) -> "SkillNode":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # hooks filled in by other workstreams' modules -----------------------
    def enable_evolution(self, **kw: Any) -> Any:
        """Plug in the distillation learner (``aios_fast.evolve.distiller.enable_evolution``)."""
        from .distiller import enable_evolution

        return enable_evolution(self, **kw)

    def start_federation(self, port: int = 0, node_name: str | None = None, **kw: Any) -> Any:
        """Serve and fetch skills over the federation (``aios_fast.federation.node``)."""
        from ..federation.node import start_federation

        return start_federation(self, port=port, node_name=node_name, **kw)

    def sync_remote_skills(self) -> Any:
        """Fetch the peers' skills this node lacks (``aios_fast.federation.node``)."""
        from ..federation.node import sync_remote_skills

        return sync_remote_skills(self)

    # ------------------------------------------------------------------ internals
    def _maybe_refresh(self) -> None:
        """Pick up skills another process added (e.g. `aios-fast skills add`): a stat of the
        index at most every ``refresh_interval`` seconds, a rebuild only when it changed."""
        now = time.monotonic()
        if now - self._refreshed_at < self.refresh_interval:
            return
        self._refreshed_at = now
        try:
            self.router.refresh()
        except (AiosError, OSError) as exc:
            self._problem(f"router refresh failed: {exc}")

    def _observe(self, intent: str, route: Any, q: torch.Tensor) -> None:
        try:
            decision = self.trigger.observe(intent, route, embedding=q[0])
        except (AiosError, OSError) as exc:  # the trigger must never break serving
            self._problem(f"trigger failed on a query: {exc}")
            return
        if decision.fired and decision.request is not None:
            self.submit(decision.request)

    def _card(self, name: str):
        try:
            entry = self.library.get(name)
        except InputError as exc:
            self._problem(str(exc))
            return None
        with self._cards_lock:
            card = self._cards.get(entry.key)
            if card is not None:
                self._cards.move_to_end(entry.key)
                return card
        try:
            card = self.library.load_card(entry, verify=True)
        except (CardFormatError, OSError) as exc:
            self._problem(f"skill {entry.key} skipped: {exc}")
            return None
        if card.base_fingerprint is not None and card.base_fingerprint != self.base_fingerprint:
            self._problem(f"skill {entry.key} skipped: made for base model {card.base_fingerprint}, "
                          f"this node's encoder is {self.base_fingerprint}")
            return None
        with self._cards_lock:
            card = self._cards.setdefault(entry.key, card)   # one object per key: applied() needs it
            while len(self._cards) > _CARD_CACHE:
                self._cards.popitem(last=False)
        return card

    @property
    def base_fingerprint(self) -> str:
        """``fingerprint_model`` of the encoder's base weights (computed once: the encode path
        checks cards against it at load instead of on every call)."""
        if self._base_fp is None:
            self._base_fp = self.manager.fingerprint()
        return self._base_fp

    def _problem(self, msg: str) -> None:
        if msg not in self.problems:  # once per distinct problem: the encode path may repeat it
            log.warning(msg)
            self.problems.append(msg)
            del self.problems[:-100]

    @staticmethod
    def _safe(fn: Callable, *args: Any) -> None:
        try:
            fn(*args)
        except (AiosError, OSError) as exc:
            log.warning("%s failed: %s", getattr(fn, "__name__", fn), exc)

    def _start_worker(self) -> None:
        self._worker = threading.Thread(target=self._work, name="aios-skill-worker", daemon=True)
        self._worker.start()

    def _work(self) -> None:
        if self.learner_threads is not None:
            torch.set_num_threads(self.learner_threads)   # this thread's OpenMP team only
        while True:
            with self._cv:
                while not self._closed and (not self._queue or self._learner is None):
                    self._cv.wait()
                if self._closed:
                    return
                request = self._queue.popleft()
                self._pending.pop(request.topic_id, None)
                learner = self._learner
                self._running[request.topic_id] = {"request": request, "started": time.time()}
            record = self._run(learner, request)
            with self._cv:
                self._running.pop(request.topic_id, None)
                self._history.append(record)
                self._cv.notify_all()

    def _run(self, learner: Any, request: LearningRequest) -> dict[str, Any]:
        from ..cards import LoRACard
        from ..route.library import SkillEntry

        t0 = time.time()
        record: dict[str, Any] = {"request": request.to_dict(), "started": t0, "ok": False}
        try:
            out = learner.learn(request)
            entry, tier, report = None, None, {}
            if isinstance(out, LearnOutcome):
                entry, tier, report = out.entry, out.tier, dict(out.report)
            elif isinstance(out, SkillEntry):
                entry = out
            elif isinstance(out, LoRACard):
                entry = self.library.add(out, request.queries)
            elif out is not None:
                raise InputError(f"learner returned {type(out).__name__}; expected a LearnOutcome, "
                                 f"SkillEntry, LoRACard or None")
            record.update(tier=tier, report=report)
            if entry is None:
                record["reason"] = report.get("reason", "the learner produced no skill") if report else \
                    "the learner produced no skill"
                self._safe(self.trigger.job_failed, request.topic_id, record["reason"])
            else:
                self.router.refresh()
                self._safe(self.trigger.job_succeeded, request.topic_id)
                record.update(ok=True, skill=entry.key)
                for hook in list(self.publish_hooks):
                    try:
                        hook(entry)
                    except Exception as exc:  # a publisher's failure must not undo learning
                        self._problem(f"publish hook {getattr(hook, '__name__', hook)!r} failed "
                                      f"for {entry.key}: {exc}")
        except Exception as exc:  # any learner failure is a failed job, never a dead worker
            record["reason"] = f"{type(exc).__name__}: {exc}"
            record["traceback"] = traceback.format_exc(limit=5)
            self._safe(self.trigger.job_failed, request.topic_id, record["reason"])
        record["seconds"] = time.time() - t0
        return record

    def __repr__(self) -> str:
        return (f"SkillNode(library={str(self.library.directory)!r}, skills={len(self.library.list())}, "
                f"pending={len(self._queue)}, running={len(self._running)})")
