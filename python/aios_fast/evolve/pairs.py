"""Training pairs from passages: teacher questions judged against their passage, plus pairs the
documents give without any teacher.

A skill for an encoder is trained on (query, passage) pairs with in-batch negatives. Three
sources, all of which keep the ids of the passages they came from:

* **Teacher questions** (:func:`teacher_questions`): the teacher is shown three worked examples
  (:data:`QUESTION_SHOTS`, facts of unrelated fictional topics turned into users' questions), then
  one sentence of a passage and its topic words, and asked for the question a customer would ask
  to get that fact; the *passage* is the answer.
  The bundled teacher has 135M parameters, so it is never asked for facts, only to rephrase what
  it is shown, and every question is judged against its passage (:func:`judge_question`): form
  (length, a question, no "the passage says" meta talk, not a copy of a sentence), lexical
  overlap with the passage, encoder similarity to it, and answerability (the passage must be
  among the ``answerable_k`` nearest passages of the question). Rejections are counted by reason.
* **Inverse cloze task** (:func:`inverse_cloze_pairs`, Lee, Chang & Toutanova 2019, "Latent
  Retrieval for Weakly Supervised Open Domain Question Answering"): a sentence is the query and
  its passage *without that sentence* the answer (kept in with probability ``keep_prob``, 0.1 as
  in the paper, so the model also learns lexical matching).
* **Independent cropping** (:func:`crop_pairs`, Izacard et al. 2022, "Unsupervised Dense
  Information Retrieval with Contrastive Learning", Contriever): two spans of one passage
  sampled independently form a positive pair. The paper samples both spans with a length ratio
  in [0.1, 0.5]; here the query span is short (ratio [0.1, 0.3]) and the answer span long
  ([0.5, 1.0]), because a node's queries are short and its answers are passages.

:func:`build_pairs` runs all three, removes near-duplicates by embedding (cosine of the queries
above ``dedup_threshold``) and returns a :class:`PairSet` with a report of what was asked,
received, kept and rejected (by reason).
"""

from __future__ import annotations

import math
import random
import re
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Sequence

from ..errors import InputError

__all__ = ["Pair", "PairSet", "build_pairs", "teacher_questions", "judge_question",
           "inverse_cloze_pairs", "crop_pairs", "dedup_pairs", "split_sentences", "QUESTION_PROMPT",
           "QUESTION_SHOTS", "question_messages"]

#: origins of a pair
ORIGINS = ("teacher", "ict", "crop")

QUESTION_SYSTEM = "You write short questions that customers ask a support desk."
# Only the focus sentence (and the passage's topic words), not the whole passage: prompt
# prefill dominates a small CPU teacher's time, and a 135M model stays on the fact it is shown.
QUESTION_PROMPT = (
    "Topic: {topic}\n"
    "Fact: {sentence}\n\n"
    "Turn this fact into the question a customer would ask to get it. Reply with the question only.")

#: worked examples shown before each question prompt, about a ferry, a gym and a printer (no fact
#: of a real topic, so none can leak into a question; a copied one fails the judge's overlap and
#: answerability checks). Shown these, the 135M teacher writes short questions in a user's words
#: instead of restating the fact or asking "What's the answer to that?": 72-82 of 120 questions
#: passed the judge on both domains against 23-37 without them, and the cards trained on them
#: helped users at least as much (BENCHMARKS.md, "Distillation"). They are the same turns in
#: every prompt, so llama.cpp evaluates them once (``local_llama``).
QUESTION_SHOTS = (
    ("ferry, tickets, luggage, terminal, passengers, bags",
     "Each passenger may bring one suitcase up to 20 kg; extra bags cost 8 euro each at the terminal.",
     "How much does it cost to take an extra bag on the ferry?"),
    ("membership, gym, freeze, months, travel, charge",
     "A membership can be frozen for up to three months a year, for example during travel or illness, at no charge.",
     "can I pause my gym membership while I'm away?"),
    ("printer, display, tray, paper, button, error",
     "If the display shows P-04, open the rear tray, remove any torn paper and press the green button for three seconds.",
     "my printer says P-04, what do I do?"),
)


def question_messages(topic: str, sentence: str) -> list[dict[str, str]]:
    """The chat a teacher is asked one question in: the system prompt, the worked examples of
    :data:`QUESTION_SHOTS` and the fact."""
    msgs = [{"role": "system", "content": QUESTION_SYSTEM}]
    for t, fact, question in QUESTION_SHOTS:
        msgs += [{"role": "user", "content": QUESTION_PROMPT.format(topic=t, sentence=fact)},
                 {"role": "assistant", "content": question}]
    return msgs + [{"role": "user", "content": QUESTION_PROMPT.format(topic=topic, sentence=sentence)}]


_SENT_SPLIT = re.compile(r"(?<=[.!?])\s+(?=[A-Z0-9\"'(])|\n+")
_WORD = re.compile(r"[A-Za-z0-9][A-Za-z0-9'\-]*")
_MD_PREFIX = re.compile(r"^\s*(?:#{1,6}\s+|[-*+]\s+|\d+[.)]\s+|>\s*)")
_QUESTION_START = re.compile(
    r"^(what|how|why|when|where|which|who|whom|whose|can|could|do|does|did|is|are|was|were|will|"
    r"would|should|shall|may|might|must|has|have|had|if|i|my|am)\b", re.I)
_LEAD_IN = re.compile(r"^\s*(?:\*\*)?(?:q(?:uestion)?\s*\d*\s*[:.)-]|\d+[.)]|[-*])\s*(?:\*\*)?\s*", re.I)
_QUOTED = re.compile(r"[\"“]([^\"“”]{8,}?\?)")
_ACCORDING = re.compile(r"^(?:according to|based on|in) (?:the|this) (?:passage|text|fact|document)s?,?\s*", re.I)
_META = re.compile(r"\b(?:the|this|given) (?:passage|text|fact|document|paragraph|article)\b|\bas an ai\b|"
                   r"\blanguage model\b|\bquestion:|\banswer:", re.I)
_STOP = frozenset("""a an the and or but if of to in on at by for with from as is are was were be been being it
its this that these those there here i you he she we they me my your our their what which who whom whose
when where why how do does did can could will would should shall may might must not no yes so than then
too very just about into over under up down out off again once all any both each few more most other some
such only own same s t don isn aren wasn weren have has had having am get got""".split())


@dataclass(frozen=True)
class Pair:
    """One training pair: the query, the answer text, the ids of the passages it came from, its
    origin (``teacher``, ``ict`` or ``crop``) and the judge's encoder similarity (NaN if not judged)."""

    query: str
    answer: str
    passage_ids: tuple[str, ...]
    origin: str
    score: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {"query": self.query, "answer": self.answer, "passage_ids": list(self.passage_ids),
                "origin": self.origin, "score": None if math.isnan(self.score) else round(self.score, 4)}


@dataclass
class PairSet:
    """Pairs plus the report of how they were made (JSON-able, see :meth:`report_dict`)."""

    pairs: list[Pair] = field(default_factory=list)
    asked: int = 0                   # teacher requests sent
    received: int = 0                # teacher replies that came back (any content)
    teacher_errors: list[str] = field(default_factory=list)
    rejected: Counter = field(default_factory=Counter)   # reason -> count
    rejected_examples: list[dict[str, str]] = field(default_factory=list)
    generated: Counter = field(default_factory=Counter)  # origin -> candidates before dedup
    seconds: dict[str, float] = field(default_factory=dict)

    def by_origin(self) -> dict[str, int]:
        return dict(Counter(p.origin for p in self.pairs))

    def reject(self, reason: str, text: str, passage_id: str, max_examples: int = 12) -> None:
        self.rejected[reason] += 1
        if len(self.rejected_examples) < max_examples:
            self.rejected_examples.append({"reason": reason, "text": text[:160], "passage": passage_id})

    def report_dict(self) -> dict[str, Any]:
        return {
            "teacher": {"asked": self.asked, "received": self.received,
                        "kept": self.by_origin().get("teacher", 0),
                        "errors": self.teacher_errors[:5], "n_errors": len(self.teacher_errors)},
            "generated": dict(self.generated), "kept": self.by_origin(), "total": len(self.pairs),
            "rejected": dict(self.rejected), "rejected_examples": self.rejected_examples,
            "seconds": {k: round(v, 3) for k, v in self.seconds.items()},
        }


# ---------------------------------------------------------------------------------------- text
def split_sentences(text: str) -> list[str]:
    """Sentences of a passage, Markdown heading and list markers removed, empty ones dropped."""
    out = []
    for piece in _SENT_SPLIT.split(text):
        s = _MD_PREFIX.sub("", piece).strip()
        if s:
            out.append(s)
    return out


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def _content(text: str) -> set[str]:
    return {w for w in _words(text) if w not in _STOP and len(w) > 1}


def _topic(text: str, n: int = 6) -> str:
    """The passage's most frequent content words (a cheap title for the teacher's prompt)."""
    counts = Counter(w for w in _words(text) if w not in _STOP and len(w) > 2 and not w.isdigit())
    return ", ".join(w for w, _ in counts.most_common(n))


def _passage_fields(p: Any) -> tuple[str, str]:
    pid, text = getattr(p, "id", None), getattr(p, "text", None)
    if not isinstance(pid, str) or not isinstance(text, str):
        raise InputError(f"passages must have string .id and .text (a retrieval.Passage), got {type(p).__name__}")
    return pid, text


# ---------------------------------------------------------------------------------------- teacher-free
def inverse_cloze_pairs(passages: Sequence[Any], per_passage: int = 2, *, keep_prob: float = 0.1,
                        min_words: int = 6, seed: int = 0, pool: Sequence[Any] | None = None) -> list[Pair]:
    """Inverse cloze task pairs (Lee et al. 2019): queries = ``per_passage`` sentences of a
    passage, answer = the passage without them (with them, with probability ``keep_prob``).

    All pairs of one passage share ONE answer text, the passage minus *all* its query sentences.
    With the paper's one-sentence-removed answers, two pairs of the same passage in a batch of
    in-batch negatives make each other's query sentence appear verbatim in a *negative*, which
    trains the encoder away from its own passage; identical answers only tie, harmlessly.
    Sentences shorter than ``min_words`` (headings, fragments) are not used as queries; passages
    with fewer than two sentences give no pair. Nor is a sentence that another passage of
    ``passages`` or ``pool`` also holds (the overlap of consecutive chunks): as a query it is
    verbatim in that passage, which is a negative in training and a distractor in the gate, so
    the pair would teach and measure the opposite of what it claims.
    """
    rng = random.Random(seed)
    elsewhere = _Elsewhere(list(passages) + list(pool or ()))
    out = []
    for p in passages:
        pid, text = _passage_fields(p)
        sents = split_sentences(text)
        if len(sents) < 2:
            continue
        usable = [i for i, s in enumerate(sents) if len(_words(s)) >= min_words and not elsewhere(pid, s)]
        chosen = set(rng.sample(usable, min(per_passage, len(usable), len(sents) - 1)))
        if not chosen:
            continue
        keep = rng.random() < keep_prob
        rest = " ".join(s for j, s in enumerate(sents) if keep or j not in chosen)
        out.extend(Pair(sents[i], rest, (pid,), "ict") for i in sorted(chosen))
    return out


def _norm_sentence(s: str) -> str:
    return " ".join(_words(s))


class _Elsewhere:
    """Is a sentence of passage ``pid`` also held, word for word, by another passage? (Chunks
    overlap, and Markdown lists can join or split sentences differently, so this checks the
    normalised words as a substring of every other passage, not sentence equality.)"""

    def __init__(self, passages: Sequence[Any]) -> None:
        self._texts: dict[str, str] = {}
        self._by_word: dict[str, set[str]] = {}   # word -> passages holding it (a large pool stays cheap)
        for p in passages:
            pid, text = _passage_fields(p)
            norm = _norm_sentence(text)
            self._texts[pid] = f" {norm} "
            for w in set(norm.split()):
                self._by_word.setdefault(w, set()).add(pid)
        self._memo: dict[str, frozenset[str]] = {}

    def owners(self, sentence: str) -> frozenset[str]:
        norm = _norm_sentence(sentence)
        if norm not in self._memo:
            words = set(norm.split())
            # only passages that hold the sentence's rarest word can hold the sentence
            rare = min(words, key=lambda w: len(self._by_word.get(w, ())), default=None)
            cands = self._by_word.get(rare, set()) if rare is not None else set()
            key = f" {norm} "
            self._memo[norm] = frozenset(pid for pid in cands if key in self._texts[pid])
        return self._memo[norm]

    def __call__(self, pid: str, sentence: str) -> bool:
        return bool(self.owners(sentence) - {pid})


def crop_pairs(passages: Sequence[Any], per_passage: int = 1, *, query_ratio=(0.1, 0.3),
               answer_ratio=(0.5, 1.0), min_query_words: int = 6, seed: int = 0) -> list[Pair]:
    """Independent-cropping pairs (Contriever, Izacard et al. 2022): two word spans of the same
    passage, sampled independently (they may overlap), query span ``query_ratio`` and answer span
    ``answer_ratio`` of the passage's length."""
    rng = random.Random(seed)
    out = []
    for p in passages:
        pid, text = _passage_fields(p)
        words = " ".join(split_sentences(text)).split()
        n = len(words)
        if n < 3 * min_query_words:
            continue
        for _ in range(per_passage):
            spans = []
            for lo, hi in (query_ratio, answer_ratio):
                k = max(min_query_words, int(round(n * rng.uniform(lo, hi))))
                k = min(k, n)
                start = rng.randint(0, n - k)
                spans.append(" ".join(words[start:start + k]))
            out.append(Pair(spans[0], spans[1], (pid,), "crop"))
    return out


# ---------------------------------------------------------------------------------------- teacher
def clean_question(reply: str) -> str:
    """The question in a teacher's reply: the first line that reads as a question, lead-ins
    ("Question 1:", "**Q:**", bullets, quotes, "According to the text,") removed. Returns ""
    when nothing is left. JSON replies are parsed with ``parse_qa_pairs`` (the question field)."""
    text = (reply or "").strip()
    if not text:
        return ""
    if text[:1] in "[{" or text.startswith("```"):
        try:
            from .parsing import parse_qa_pairs

            pairs, _ = parse_qa_pairs(text)
            if pairs:
                return _strip_question(pairs[0][0])
        except ImportError:  # pragma: no cover - parsing ships with the package
            pass
    lines = [l for l in (x.strip() for x in text.splitlines()) if l and not l.startswith("```")]
    for line in lines:
        if "?" in line:
            quoted = _QUOTED.search(line)   # 'A customer might ask: "How ...?"' -> the quote
            q = quoted.group(1) if quoted else line[: line.index("?") + 1]
            return _strip_question(q)
    return _strip_question(lines[0]) if lines else ""


def _strip_question(q: str) -> str:
    q = _LEAD_IN.sub("", q.strip())
    q = q.strip().strip("\"'`*“”‘’ ").strip()
    q = _ACCORDING.sub("", q)
    return q[:1].upper() + q[1:] if q else q


def judge_question(question: str, passage_text: str, sentences: Sequence[str] | None = None, *,
                   min_words: int = 4, max_words: int = 32, min_overlap: int = 1,
                   copy_jaccard: float = 0.8) -> str | None:
    """The form and lexical checks of a teacher question against its passage: ``None`` if it
    passes, else the reason (``empty``, ``too_short``, ``too_long``, ``not_a_question``,
    ``repetitive``, ``meta``, ``copied``, ``no_overlap``). Encoder checks (``off_topic``,
    ``unanswerable``) are done in batch by :func:`teacher_questions`."""
    q = question.strip()
    if not q:
        return "empty"
    w = _words(q)
    if len(w) < min_words:
        return "too_short"
    if len(w) > max_words:
        return "too_long"
    if not (q.endswith("?") or _QUESTION_START.match(q)):
        return "not_a_question"
    if len(w) >= 8 and len(set(w)) < 0.5 * len(w):   # a small model's loop ("I'm not a ... I'm not a ...")
        return "repetitive"
    if _META.search(q):
        return "meta"
    cq = _content(q)
    for s in sentences if sentences is not None else split_sentences(passage_text):
        cs = _content(s)
        if cq and cs and len(cq & cs) / len(cq | cs) >= copy_jaccard:
            return "copied"
    if len(cq & _content(passage_text)) < min_overlap:
        return "no_overlap"
    return None


def teacher_questions(passages: Sequence[Any], teacher: Any, encoder: Any, *, per_passage: int = 2,
                      pool: Sequence[Any] | None = None, min_similarity: float = 0.3,
                      answerable_k: int = 3, max_tokens: int = 40, temperature: float = 0.0,
                      seed: int = 0, into: PairSet | None = None, max_requests: int | None = None,
                      on_step: Callable[[int], None] | None = None) -> PairSet:
    """Ask ``teacher`` for ``per_passage`` questions per passage, each about one sentence of it
    (the passage is the answer), and keep those that pass :func:`judge_question`, have encoder
    cosine >= ``min_similarity`` with their passage (else ``off_topic``) and rank their passage
    among the ``answerable_k`` nearest of ``pool`` (default: ``passages``; else ``unanswerable``).

    A :class:`~aios_fast.evolve.teachers.TeacherError` (budget spent, server down after retries)
    stops the asking; what was kept so far stays and the error is recorded. ``on_step(1)`` is
    called after each request (progress bars). At most ``max_requests`` requests are sent.
    """
    out = into if into is not None else PairSet()
    rng = random.Random(seed)
    t0 = time.perf_counter()
    candidates: list[tuple[str, str, str]] = []   # (question, passage id, passage text)
    try:
        from .teachers import TeacherError
    except ImportError:  # pragma: no cover
        TeacherError = RuntimeError  # type: ignore[assignment,misc]
    stop = False
    # a fact another passage also states (chunk overlap) would make a question two passages answer
    elsewhere = _Elsewhere(list(passages) + list(pool or ()))
    for p in passages:
        if stop:
            break
        pid, text = _passage_fields(p)
        long_enough = [s for s in split_sentences(text) if len(_words(s)) >= 6]
        sents = [s for s in long_enough if not elsewhere(pid, s)] or long_enough or [text]
        for sentence in rng.sample(sents, min(per_passage, len(sents))):
            if max_requests is not None and out.asked >= max_requests:
                stop = True
                break
            out.asked += 1
            try:
                reply = teacher.complete(question_messages(_topic(text), sentence),
                                         max_tokens=max_tokens, temperature=temperature)
            except TeacherError as exc:
                out.teacher_errors.append(f"{type(exc).__name__}: {str(exc)[:300]}")
                stop = True
                break
            finally:
                if on_step is not None:
                    on_step(1)
            out.received += 1
            text_reply = getattr(reply, "text", reply)
            if not isinstance(text_reply, str):
                out.reject("bad_reply", repr(text_reply), pid)
                continue
            q = clean_question(text_reply)
            why = judge_question(q, text, sents)
            if why:
                out.reject(why, q or text_reply, pid)
                continue
            candidates.append((q, pid, text))
    out.generated["teacher"] += len(candidates)
    if candidates:
        pool_list = list(pool) if pool is not None else list(passages)
        pool_ids = [_passage_fields(p)[0] for p in pool_list]
        P = encoder.encode([_passage_fields(p)[1] for p in pool_list])
        Q = encoder.encode([c[0] for c in candidates])
        sims = Q @ P.T
        index = {pid: i for i, pid in enumerate(pool_ids)}
        for row, (q, pid, text) in enumerate(candidates):
            j = index.get(pid)
            own = float(sims[row, j]) if j is not None else float(Q[row] @ encoder.encode([text])[0])
            if own < min_similarity:
                out.reject("off_topic", q, pid)
                continue
            if j is not None and len(pool_ids) > answerable_k:
                better = int((sims[row] > own).sum())
                if better >= answerable_k:
                    out.reject("unanswerable", q, pid)
                    continue
            out.pairs.append(Pair(q, text, (pid,), "teacher", own))
    out.seconds["teacher"] = out.seconds.get("teacher", 0.0) + time.perf_counter() - t0
    return out


# ---------------------------------------------------------------------------------------- dedup
def dedup_pairs(pairs: Sequence[Pair], encoder: Any, threshold: float = 0.95,
                into: PairSet | None = None) -> list[Pair]:
    """Drop exact (normalised) and near-duplicate queries (cosine > ``threshold``), first kept.
    Teacher pairs are considered first, so a teacher question wins over an ICT sentence it
    duplicates."""
    order = sorted(range(len(pairs)), key=lambda i: ORIGINS.index(pairs[i].origin) if pairs[i].origin in ORIGINS else 9)
    seen: set[str] = set()
    cand = []
    for i in order:
        key = _norm_sentence(pairs[i].query)
        if key in seen:
            if into is not None:
                into.reject("duplicate", pairs[i].query, pairs[i].passage_ids[0])
            continue
        seen.add(key)
        cand.append(pairs[i])
    if not cand:
        return []
    E = encoder.encode([p.query for p in cand])
    kept_idx: list[int] = []
    for i in range(len(cand)):
        if kept_idx and float((E[kept_idx] @ E[i]).max()) > threshold:
            if into is not None:
                into.reject("near_duplicate", cand[i].query, cand[i].passage_ids[0])
            continue
        kept_idx.append(i)
    return [cand[i] for i in kept_idx]


# ---------------------------------------------------------------------------------------- all
def build_pairs(passages: Sequence[Any], encoder: Any, teacher: Any = None, *,
                questions_per_passage: int = 2, ict_per_passage: int = 2, crops_per_passage: int = 1,
                pool: Sequence[Any] | None = None, min_similarity: float = 0.3, answerable_k: int = 3,
                dedup_threshold: float = 0.95, seed: int = 0, max_teacher_requests: int | None = None,
                on_step: Callable[[int], None] | None = None) -> PairSet:
    """Teacher questions (if ``teacher``), inverse-cloze and cropping pairs for ``passages``,
    de-duplicated. See the module docstring for the methods and papers.

    Args:
        passages: objects with ``.id`` and ``.text`` (``retrieval.Passage``).
        encoder: a ``SentenceEncoder`` (judging and de-duplication).
        teacher: a ``Teacher`` or ``None`` for teacher-free pairs only.
        questions_per_passage / ict_per_passage / crops_per_passage: pairs asked per passage.
        pool: the passages a question must be answerable among (default ``passages``).
        min_similarity, answerable_k: the teacher judge (see :func:`teacher_questions`).
        dedup_threshold: cosine above which two queries are near-duplicates.
        max_teacher_requests: cap on teacher requests (``None``: one per question asked).
    Returns: a :class:`PairSet`.
    """
    passages = list(passages)
    if not passages:
        raise InputError("build_pairs: no passages to build pairs from")
    for name, v in (("questions_per_passage", questions_per_passage), ("ict_per_passage", ict_per_passage),
                    ("crops_per_passage", crops_per_passage)):
        if not isinstance(v, int) or v < 0:
            raise InputError(f"{name}: expected an int >= 0, got {v!r}")
    ps = PairSet()
    if teacher is not None and questions_per_passage:
        teacher_questions(passages, teacher, encoder, per_passage=questions_per_passage, pool=pool,
                          min_similarity=min_similarity, answerable_k=answerable_k, seed=seed,
                          into=ps, max_requests=max_teacher_requests, on_step=on_step)
    t0 = time.perf_counter()
    free = inverse_cloze_pairs(passages, ict_per_passage, seed=seed, pool=pool) + \
        crop_pairs(passages, crops_per_passage, seed=seed + 1)
    for p in free:
        ps.generated[p.origin] += 1
    # one answer text per passage (see inverse_cloze_pairs): teacher questions take their
    # passage's ICT answer too, so no negative in a batch is a near-copy of a positive
    shared = {p.passage_ids[0]: p.answer for p in free if p.origin == "ict"}
    ps.pairs = [Pair(p.query, shared.get(p.passage_ids[0], p.answer), p.passage_ids, p.origin, p.score)
                for p in ps.pairs]
    ps.pairs = dedup_pairs(ps.pairs + free, encoder, dedup_threshold, into=ps)
    ps.seconds["documents"] = time.perf_counter() - t0
    return ps


def passages_by_id(passages: Iterable[Any]) -> dict[str, Any]:
    """``{id: passage}``."""
    return {_passage_fields(p)[0]: p for p in passages}
