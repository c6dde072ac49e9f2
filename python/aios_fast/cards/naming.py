"""Translates module keys between Hugging Face ``named_modules()`` names and ArrowEngine's
internal names. Cards record which scheme their keys use (``naming``: ``hf`` or ``arrowengine``)."""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

from ..errors import InputError

__all__ = ["SCHEMES", "to_hf", "to_arrowengine", "convert", "select_modules", "matches"]

SCHEMES = ("hf", "arrowengine")

# (ArrowEngine pattern, Hugging Face BERT pattern); {i} is the layer index.
_PAIRS = [
    ("encoder_layers.{i}.attention.query", "encoder.layer.{i}.attention.self.query"),
    ("encoder_layers.{i}.attention.key", "encoder.layer.{i}.attention.self.key"),
    ("encoder_layers.{i}.attention.value", "encoder.layer.{i}.attention.self.value"),
    ("encoder_layers.{i}.attention_output", "encoder.layer.{i}.attention.output.dense"),
    ("encoder_layers.{i}.intermediate", "encoder.layer.{i}.intermediate.dense"),
    ("encoder_layers.{i}.output_dense", "encoder.layer.{i}.output.dense"),
]


def _compile(pattern: str) -> re.Pattern[str]:
    return re.compile("^" + re.escape(pattern).replace(r"\{i\}", r"(\d+)") + "$")


_AE_TO_HF = [(_compile(ae), hf) for ae, hf in _PAIRS]
_HF_TO_AE = [(_compile(hf), ae) for ae, hf in _PAIRS]


def _translate(name: str, table: list[tuple[re.Pattern[str], str]]) -> str | None:
    # Keys may carry a prefix such as "0.auto_model." (sentence-transformers) or "bert."
    for pat, target in table:
        for start in [0] + [m.end() for m in re.finditer(r"\.", name)]:
            m = pat.match(name[start:])
            if m:
                return name[:start] + target.replace("{i}", m.group(1))
    return None


def to_hf(name: str) -> str:
    """ArrowEngine name -> Hugging Face name; names with no ArrowEngine form pass through."""
    return _translate(name, _AE_TO_HF) or name


def to_arrowengine(name: str) -> str:
    """Hugging Face name -> ArrowEngine name; names with no ArrowEngine form pass through."""
    return _translate(name, _HF_TO_AE) or name


def convert(name: str, source: str, target: str) -> str:
    """Translate ``name`` from scheme ``source`` to scheme ``target``."""
    for s in (source, target):
        if s not in SCHEMES:
            raise InputError(f"naming scheme {s!r} is unknown; use one of {SCHEMES}")
    if source == target:
        return name
    return to_hf(name) if target == "hf" else to_arrowengine(name)


# ---------------------------------------------------------------------- module selection
def matches(name: str, entry: str) -> bool:
    """PEFT's list rule: ``entry`` names module ``name`` exactly or is a ``.``-suffix of it
    (``"query"`` matches ``encoder.layer.0.attention.self.query``, not ``...self.query_x``)."""
    return name == entry or name.endswith("." + entry)


def select_modules(names: Iterable[str], pattern: str | Sequence[str] | None, *, what: str = "modules",
                   error: type[Exception] = InputError) -> list[str]:
    """The package's one rule for choosing modules by name (trainer ``target_modules``, probe
    ``modules``, extractor ``include``/``exclude``, ``linear_shapes``; card keys use the list
    rule too):

    * ``None``: every name;
    * a string: a regular expression *searched* in the full name (``re.search``; anchor it with
      ``^...$`` to match whole names);
    * a sequence of strings: each entry names a module exactly or is a ``.``-suffix of its name
      (PEFT's ``target_modules`` list rule), and every entry must select at least one name.

    Args:
        names: candidate module names, in the order to return them.
        pattern: see above.
        what: the argument's name, for error messages.
        error: the exception class raised when nothing (or an entry) selects nothing.
    Returns:
        the selected names, in the order of ``names``.
    """
    names = list(names)
    if pattern is None:
        return names
    if isinstance(pattern, str):
        try:
            rx = re.compile(pattern)
        except re.error as exc:
            raise InputError(f"{what}={pattern!r} is not a valid regular expression: {exc}") from None
        out = [n for n in names if rx.search(n)]
        if not out:
            raise error(f"{what}={pattern!r} (a regex, searched) matches none of the {len(names)} "
                        f"candidate modules; some available: {names[:6]}")
        return out
    entries = list(pattern)
    if not entries or not all(isinstance(e, str) and e for e in entries):
        raise InputError(f"{what} must be a regex string or a non-empty list of module names or "
                         f"'.'-suffixes, got {pattern!r}")
    hit = {e: False for e in entries}
    out = []
    for n in names:
        parts = n.split(".")
        sel = [s for s in (".".join(parts[i:]) for i in range(len(parts))) if s in hit]
        if sel:
            out.append(n)
            for s in sel:
                hit[s] = True
    missing = [e for e, ok in hit.items() if not ok]
    if missing:
        raise error(f"{what} {missing[:5]} match no candidate module (an entry names a module or a "
                    f"'.'-suffix of its name); some available: {names[:6]}")
    return out
