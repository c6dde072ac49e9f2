"""Turn a teacher's reply (untrusted text) into ``(question, answer)`` pairs.

Teachers, small ones above all, rarely return exactly the JSON they were asked for. The parser
accepts what a reasonable reader would and drops everything else *with a reason*:

* JSON anywhere in the text: inside code fences, after or before prose, several values in a
  row (JSON lines), a truncated list (the complete objects before the cut are kept), Python
  literals with single quotes;
* shapes: a list of objects, a single object, an object wrapping the list (``{"pairs": [...]}``,
  ``{"questions": [...]}``...), a ``{question: answer}`` mapping, ``[question, answer]`` lists;
* field names: ``question``/``q``/``query``/``prompt``/``input``/``instruction`` and
  ``answer``/``a``/``response``/``output``/``completion``/``reply``, any case;
* plain ``Q: ... A: ...`` (or ``Question:``/``Answer:``) lines when there is no JSON at all.

Each dropped item yields one reason string ``"<kind>: <detail>"`` where ``kind`` is one of
:data:`REJECTION_KINDS`; :func:`count_reasons` tallies them for reports. A bad reply never
becomes data: every kept pair has a non-placeholder question and answer of sane length, the
answer does not just repeat the question, and no question appears twice.
"""

from __future__ import annotations

import ast
import json
import re
from collections import Counter
from typing import Any, Iterable

__all__ = ["parse_qa_pairs", "parse_questions", "count_reasons", "QA_SCHEMA", "QUESTIONS_SCHEMA",
           "REJECTION_KINDS"]

#: JSON Schema to request with ``Teacher.complete(..., json_schema=QA_SCHEMA)`` (an object at the
#: root: OpenAI's structured outputs require one)
QA_SCHEMA: dict = {
    "title": "qa_pairs",
    "type": "object",
    "properties": {
        "pairs": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {"question": {"type": "string"}, "answer": {"type": "string"}},
                "required": ["question", "answer"],
            },
        }
    },
    "required": ["pairs"],
}

#: JSON Schema for :func:`parse_questions` replies (questions about a passage; the passage answers them)
QUESTIONS_SCHEMA: dict = {
    "title": "questions",
    "type": "object",
    "properties": {"questions": {"type": "array", "items": {"type": "string"}}},
    "required": ["questions"],
}

#: every ``kind`` a reason string can start with
REJECTION_KINDS = (
    "empty_reply",       # nothing but whitespace (or not a string)
    "reply_too_long",    # more than max_reply_chars; not parsed at all
    "no_pairs_found",    # neither JSON nor Q/A lines in the reply
    "no_questions_found",  # parse_questions: no JSON and no line ending in "?"
    "invalid_json",      # something JSON-like that does not parse and yielded nothing
    "not_a_pair",        # an item that is neither an object nor a [question, answer] list
    "missing_question",  # no question-like field
    "missing_answer",    # no answer-like field
    "not_text",          # the field holds a list/object/bool instead of text
    "empty",             # the field is empty after trimming
    "placeholder",       # "...", "N/A", "<answer>", "string", "TODO"...
    "json_residue",      # the text holds JSON punctuation ('}, {', '":') from a mangled reply
    "too_short",         # question shorter than min_question_chars
    "too_long",          # question or answer longer than its limit
    "answer_repeats_question",
    "duplicate",         # the same question (normalised) was already kept
    "over_limit",        # more pairs than max_pairs
)

_Q_KEYS = ("question", "q", "query", "prompt", "input", "instruction", "user", "ask", "user_question",
           "question_text")
_A_KEYS = ("answer", "a", "response", "output", "completion", "reply", "assistant", "ans", "solution",
           "answer_text", "target")
_WRAPPER_KEYS = ("pairs", "qa_pairs", "qa", "qas", "questions", "question_answer_pairs", "items", "data",
                 "results", "examples", "faq", "faqs", "output", "response", "answers")
_PLACEHOLDERS = {
    "", "...", "…", "n/a", "na", "none", "null", "nil", "undefined", "answer", "question", "string", "text",
    "todo", "tbd", "unknown", "?", "-", "your answer here", "your question here", "answer here",
    "question here", "insert answer", "insert question", "i don't know", "i do not know", "example",
}
_PLACEHOLDER_RE = re.compile(r"^(<[^<>]{0,40}>|\[[^\[\]]{0,40}\]|\{[^{}]{0,40}\}|[.…_\-*]+|x+)$", re.I)
_PREFIX_RE = re.compile(r"^\s*(?:\*\*)?(?:q|question|a|answer)\s*\d*\s*[:.)\-]\s*(?:\*\*)?\s*", re.I)
_QA_LINE_RE = re.compile(
    r"^\s*(?:[-*•]\s*)?(?:\d+\s*[.)]\s*)?(?:\*\*|__)?(?P<tag>q|question|a|answer)(?:\s*\d+)?\s*(?:\*\*|__)?"
    r"\s*[:.)\-]\s*(?:\*\*|__)?\s*(?P<rest>.*)$", re.I)
_OPEN_RE = re.compile(r"[\[{]")
# '}, {', '", "', '":' or a brace at either end: pieces of JSON a small model spilled into a string
_RESIDUE_RE = re.compile(r"[}\]]\s*,\s*[{\[]|\"\s*[:,]\s*\"|\"\s*:\s*[\[{]|^[{\[]|[}\]]$")
_NUMBERING_RE = re.compile(r"^\s*(?:[-*•]\s*|\d+\s*[.)]\s*)(?:\*\*)?")
_LITERAL_MAX = 20_000  # ast.literal_eval only on small spans (its cost grows with nesting)
_MAX_DEPTH = 32  # real replies nest 3 deep; deeper is garbage (and json/ast recursion risk)
_MAX_FAILED_ATTEMPTS = 500
_MAX_LITERAL_ATTEMPTS = 20


def _max_depth(text: str) -> int:
    """Deepest bracket nesting outside double-quoted strings (cheap, O(n))."""
    depth = best = 0
    quote = False
    escape = False
    for c in text:
        if quote:
            if escape:
                escape = False
            elif c == "\\":
                escape = True
            elif c == '"':
                quote = False
        elif c == '"':
            quote = True
        elif c in "[{":
            depth += 1
            best = max(best, depth)
        elif c in "]}":
            depth = max(0, depth - 1)
    return best


def _norm_key(k: Any) -> str:
    return re.sub(r"[\s\-]+", "_", str(k).strip().lower())


def _clean(text: str) -> str:
    text = " ".join(text.split())
    text = _PREFIX_RE.sub("", text, count=1) if _PREFIX_RE.match(text) else text
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'`":
        text = text[1:-1].strip()
    return text


def _fingerprint(text: str) -> str:
    return " ".join(re.sub(r"[^\w\s]", " ", text.casefold()).split())



def _question_length_ok(q: str, idx: str, lo: int, hi: int, reasons: list[str]) -> bool:
    """One length rule for questions in both parsers; a refusal is recorded in ``reasons``."""
    if len(q) < lo:
        reasons.append(f"too_short: {idx} question {_short(q)} has fewer than {lo} characters")
        return False
    if len(q) > hi:
        reasons.append(f"too_long: {idx} question has {len(q)} characters (max {hi})")
        return False
    return True

def _short(value: Any, n: int = 60) -> str:
    s = value if isinstance(value, str) else repr(value)
    s = " ".join(s.split())
    return repr(s if len(s) <= n else s[: n - 1] + "…")


# ------------------------------------------------------------------------- finding JSON values
def _balanced_end(text: str, start: int) -> int | None:
    """Index after the bracket that closes ``text[start]``, skipping quoted strings; ``None``."""
    pairs = {"[": "]", "{": "}"}
    stack = [pairs[text[start]]]
    i, quote = start + 1, None
    while i < len(text) and i - start <= _LITERAL_MAX:
        c = text[i]
        if quote:
            if c == "\\":
                i += 1
            elif c == quote:
                quote = None
        elif c in "\"'":
            quote = c
        elif c in pairs:
            stack.append(pairs[c])
        elif c in "]}":
            if c != stack.pop():
                return None
            if not stack:
                return i + 1
        i += 1
    return None


def _json_values(text: str) -> tuple[list[Any], bool]:
    """All top-level JSON (or Python-literal) values in ``text``, left to right, and whether any
    JSON-looking span failed to parse."""
    decoder = json.JSONDecoder()
    values: list[Any] = []
    failed = False
    attempts = 0  # failed parse attempts: bounds the cost on bracket-heavy garbage
    i = 0
    n = len(text)
    while i < n and attempts < _MAX_FAILED_ATTEMPTS:
        m = _OPEN_RE.search(text, i)
        if m is None:
            break
        i = m.start()
        try:
            value, end = decoder.raw_decode(text, i)
        except (ValueError, RecursionError):
            attempts += 1
            value, end = None, None
            close = _balanced_end(text, i) if attempts <= _MAX_LITERAL_ATTEMPTS else None
            if close is not None:
                try:  # single quotes, trailing commas: Python literal syntax
                    value = ast.literal_eval(text[i:close])
                    end = close
                except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                    value = None
            if end is None:
                failed = True
                i += 1  # look inside: a truncated list still holds complete objects
                continue
        # a list of bare numbers is prose ("see [1]"), not a reply
        if isinstance(value, dict) or (isinstance(value, list)
                                       and any(isinstance(v, (dict, list, str)) for v in value)):
            values.append(value)
        i = end
    return values, failed


def _qa_lines(text: str) -> list[tuple[Any, Any]]:
    """``Q: ... / A: ...`` lines (answers may continue over following lines)."""
    out: list[list[Any]] = []
    current: list[Any] | None = None
    field = None
    asked: str | None = None  # an untagged line ending in "?" ("1. What is X?") awaiting its "A:"
    for line in text.splitlines():
        m = _QA_LINE_RE.match(line)
        if m:
            tag = m.group("tag").lower()
            if tag in ("q", "question"):
                current = [m.group("rest"), None]
                out.append(current)
                field = 0
            elif current is not None and current[1] is None:
                current[1] = m.group("rest")
                field = 1
            elif asked is not None:
                current = [asked, m.group("rest")]
                out.append(current)
                field = 1
            else:  # an answer without a question
                out.append([None, m.group("rest")])
                current, field = None, None
            asked = None
            continue
        stripped = _NUMBERING_RE.sub("", line).strip().strip("*_").strip()
        if stripped.endswith("?") and (current is None or current[1] is not None):
            asked, current, field = stripped, None, None
            continue
        if current is not None and field is not None and line.strip():
            current[field] = (current[field] or "") + " " + line.strip()
        elif not line.strip() and field == 1:
            field = None  # a blank line ends a multi-line answer
    return [(q, a) for q, a in out]


# ------------------------------------------------------------------------------ item handling
def _items(value: Any) -> Iterable[Any]:
    """Flatten a decoded value into candidate items (objects or 2-lists)."""
    if isinstance(value, list):
        if len(value) == 2 and all(isinstance(v, str) for v in value):
            yield value
            return
        for v in value:
            if isinstance(v, list) and v and all(isinstance(x, (dict, list)) for x in v):
                yield from _items(v)
            else:
                yield v
        return
    if isinstance(value, dict):
        keys = {_norm_key(k): k for k in value}
        if any(k in keys for k in _Q_KEYS + _A_KEYS) and not any(
                isinstance(value[keys[k]], list) and value[keys[k]] and isinstance(value[keys[k]][0], dict)
                for k in keys if k in _WRAPPER_KEYS):
            yield value
            return
        lists = [keys[k] for k in keys if isinstance(value[keys[k]], list)]
        wrapped = [k for k in lists if _norm_key(k) in _WRAPPER_KEYS] or (lists if len(lists) == 1 else [])
        if wrapped:
            for k in wrapped:
                yield from _items(value[k])
            return
        if value and all(isinstance(k, str) and isinstance(v, str) for k, v in value.items()) \
                and sum(k.rstrip().endswith("?") for k in value) >= max(1, len(value) // 2):
            # {"What is X?": "Y", ...}: a question -> answer mapping
            for k, v in value.items():
                yield [k, v]
            return
        yield value
        return
    yield value


def _field(item: dict, aliases: tuple[str, ...]) -> tuple[bool, Any]:
    keys = {_norm_key(k): k for k in item}
    for alias in aliases:
        if alias in keys:
            return True, item[keys[alias]]
    return False, None


def _text_field(value: Any, what: str, idx: str, reasons: list[str]) -> str | None:
    if isinstance(value, (int, float)) and not isinstance(value, bool) and what == "answer":
        value = str(value)
    if not isinstance(value, str):
        reasons.append(f"not_text: {idx} {what} is {type(value).__name__}, expected text: {_short(value)}")
        return None
    text = _clean(value)
    if not text:
        reasons.append(f"empty: {idx} has an empty {what}")
        return None
    if text.casefold().strip(" .!?:") in _PLACEHOLDERS or _PLACEHOLDER_RE.match(text):
        reasons.append(f"placeholder: {idx} {what} is a placeholder {_short(text)}")
        return None
    if _RESIDUE_RE.search(text):
        reasons.append(f"json_residue: {idx} {what} holds JSON punctuation {_short(text)}")
        return None
    return text


def _reply_rejected(text: Any, max_reply_chars: int) -> str | None:
    """Why a whole reply is refused before any parsing (``empty_reply``, ``reply_too_long``),
    or None when it may be parsed."""
    if not isinstance(text, str) or not text.strip():
        return f"empty_reply: the reply is {'empty' if isinstance(text, str) else type(text).__name__}"
    if len(text) > max_reply_chars:
        return f"reply_too_long: {len(text)} characters, more than max_reply_chars={max_reply_chars}"
    return None


def _admit(q: str, fq: str, idx: str, seen: set[str], kept: int, limit: int | None, limit_name: str,
           reasons: list[str]) -> bool:
    """Whether the valid question ``q`` (fingerprint ``fq``) is kept: not a repeat of a kept
    question and within ``limit`` (``kept`` are kept so far). Adds ``fq`` to ``seen`` when kept,
    else records a ``duplicate`` or ``over_limit`` reason."""
    if fq in seen:
        reasons.append(f"duplicate: {idx} repeats the question {_short(q)}")
        return False
    if limit is not None and kept >= limit:
        reasons.append(f"over_limit: {idx} beyond {limit_name}={limit}")
        return False
    seen.add(fq)
    return True


def parse_qa_pairs(text: Any, *, max_pairs: int | None = None, min_question_chars: int = 5,
                   max_question_chars: int = 400, max_answer_chars: int = 2000,
                   max_reply_chars: int = 200_000) -> tuple[list[tuple[str, str]], list[str]]:
    """Parse a teacher's reply into validated, de-duplicated ``(question, answer)`` pairs.

    Args:
        text: the reply (anything; non-strings are rejected as ``empty_reply``).
        max_pairs: keep at most this many (the rest are ``over_limit``); ``None`` = all.
        min_question_chars / max_question_chars / max_answer_chars: length limits after
            whitespace is collapsed.
        max_reply_chars: longer replies are rejected whole (bounded parsing cost).

    Returns:
        ``(pairs, reasons)``: the kept pairs in reply order, and one ``"<kind>: <detail>"`` string
        per dropped item (``kind`` from :data:`REJECTION_KINDS`).
    """
    if rejected := _reply_rejected(text, max_reply_chars):
        return [], [rejected]
    reasons: list[str] = []

    depth = _max_depth(text)
    if depth > _MAX_DEPTH:
        return [], [f"invalid_json: brackets nest {depth} deep (more than {_MAX_DEPTH}); not a reply"]
    values, failed = _json_values(text)
    candidates: list[tuple[str, Any]] = []
    for v in values:
        for item in _items(v):
            candidates.append((f"item {len(candidates) + 1}", item))
    if not candidates:
        for q, a in _qa_lines(text):
            candidates.append((f"line pair {len(candidates) + 1}", [q, a]))
    if not candidates:
        if failed:
            return [], [f"invalid_json: the reply's JSON does not parse: {_short(text.strip(), 80)}"]
        return [], [f"no_pairs_found: no JSON and no Q:/A: lines in {_short(text.strip(), 80)}"]

    if failed and values:
        # e.g. a list cut off by max_tokens: the complete objects before the cut are kept
        reasons.append("invalid_json: part of the reply does not parse (cut off or malformed); "
                       "only its complete objects were read")
    pairs: list[tuple[str, str]] = []
    seen: set[str] = set()
    for idx, item in candidates:
        if isinstance(item, (list, tuple)) and len(item) == 2:
            has_q, q_raw, has_a, a_raw = item[0] is not None, item[0], item[1] is not None, item[1]
        elif isinstance(item, dict):
            has_q, q_raw = _field(item, _Q_KEYS)
            has_a, a_raw = _field(item, _A_KEYS)
        else:
            reasons.append(f"not_a_pair: {idx} is {type(item).__name__} {_short(item)}, expected an object "
                           f"with question and answer")
            continue
        fields = f" (fields: {sorted(map(str, item))})" if isinstance(item, dict) else ""
        if not has_q:
            reasons.append(f"missing_question: {idx} has no question field{fields}")
            continue
        if not has_a:
            reasons.append(f"missing_answer: {idx} has no answer field{fields}")
            continue
        q = _text_field(q_raw, "question", idx, reasons)
        if q is None:
            continue
        a = _text_field(a_raw, "answer", idx, reasons)
        if a is None:
            continue
        if not _question_length_ok(q, idx, min_question_chars, max_question_chars, reasons):
            continue
        if len(a) > max_answer_chars:
            reasons.append(f"too_long: {idx} answer has {len(a)} characters (max {max_answer_chars})")
            continue
        fq = _fingerprint(q)
        if _fingerprint(a) == fq:
            reasons.append(f"answer_repeats_question: {idx} answer is the question {_short(q)}")
            continue
        if _admit(q, fq, idx, seen, len(pairs), max_pairs, "max_pairs", reasons):
            pairs.append((q, a))
    return pairs, reasons


def parse_questions(text: Any, *, max_questions: int | None = None, min_chars: int = 5, max_chars: int = 400,
                    max_reply_chars: int = 200_000) -> tuple[list[str], list[str]]:
    """Parse a reply that lists questions (for a small teacher asked "write questions this passage
    answers": the passage is then the answer, Lee et al. 2019's inverse-cloze idea with a model
    writing the query).

    Reads JSON (a list of strings, ``{"questions": [...]}``, objects with a question field) or,
    without JSON, every line ending in ``?`` (numbering, bullets, ``Q:`` prefixes and Markdown
    emphasis removed; other prose lines are ignored). Validation as in :func:`parse_qa_pairs`
    (placeholders, JSON residue, length, duplicates).

    Returns ``(questions, reasons)``.
    """
    if rejected := _reply_rejected(text, max_reply_chars):
        return [], [rejected]
    reasons: list[str] = []
    candidates: list[tuple[str, Any]] = []
    depth = _max_depth(text)
    values, failed = _json_values(text) if depth <= _MAX_DEPTH else ([], True)
    for v in values:
        if isinstance(v, dict):
            keys = {_norm_key(k): k for k in v}
            listed = [v[keys[k]] for k in ("questions", "items", "data", "results", "pairs", "qa_pairs") if k in keys
                      and isinstance(v[keys[k]], list)]
            v = listed[0] if listed else [v]
        for item in v:
            candidates.append((f"item {len(candidates) + 1}", item))
    if not candidates:
        for line in text.splitlines():
            m = _QA_LINE_RE.match(line)
            if m and m.group("tag").lower() in ("a", "answer"):
                continue
            q = (m.group("rest") if m else _NUMBERING_RE.sub("", line)).strip().strip("*_").strip()
            if q.endswith("?"):
                candidates.append((f"line {len(candidates) + 1}", q))
    if not candidates:
        kind = "invalid_json" if failed else "no_questions_found"
        return [], [f"{kind}: no questions in {_short(text.strip(), 80)}"]
    out: list[str] = []
    seen: set[str] = set()
    for idx, item in candidates:
        if isinstance(item, dict):
            has_q, item = _field(item, _Q_KEYS)
            if not has_q:
                reasons.append(f"missing_question: {idx} has no question field")
                continue
        q = _text_field(item, "question", idx, reasons)
        if q is None:
            continue
        if not _question_length_ok(q, idx, min_chars, max_chars, reasons):
            continue
        if _admit(q, _fingerprint(q), idx, seen, len(out), max_questions, "max_questions", reasons):
            out.append(q)
    return out, reasons


def count_reasons(reasons: Iterable[str]) -> dict[str, int]:
    """``{kind: count}`` of reason strings from :func:`parse_qa_pairs` (for reports)."""
    return dict(Counter(r.split(":", 1)[0] for r in reasons))
