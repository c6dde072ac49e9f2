"""``LoRAManager``: applies skill cards to a live torch model, with ArrowEngine's method names.

Every change is *validate all, then apply all*: the card's keys are resolved to modules, the
layer types and shapes checked, the fingerprint compared and the factors converted to each
layer's device and dtype before the first module is touched, so a card that does not fit
raises :class:`aios_fast.CardMismatchError` and leaves the model exactly as it was.

Two ways to apply a card:

* ``apply_card(card, weight)`` — *global*: every forward, in every thread, uses it (until
  ``remove_card``). It may be merged into the weights (``merge``) so that it costs nothing.
* ``with mgr.applied(card, weight):`` — *scoped* to one request. The card's factors are
  registered in the layers once (reference counted across threads that use the same card);
  which scoped cards a forward uses is read from a :class:`contextvars.ContextVar`, so
  several threads serving requests on one model each see only their own card (plus the
  global ones). The context holds ``(manager, card name)`` pairs, so a card entered on one
  manager never applies to another manager's model, even when both cards share a name.
  Registration changes are copy-on-write and serialised by a lock, so a forward in one thread
  never sees a half-updated adapter table.

Layers the manager refuses with a clear :class:`CardMismatchError`: quantised linears (their
weight is not a plain floating-point tensor) and ``nn.MultiheadAttention.out_proj`` (read by
weight, never called).

Merging and unmerging write the shared base weights in place: do them between requests, not
while other threads run the model. A layer can also hold a trainer's *trainable* adapter (one
wrapper class, :class:`LoRALayer`, for both): cards apply on top of it, added on the fly, but
merging into such a layer is refused until training ends.
"""

from __future__ import annotations

import itertools
from contextlib import contextmanager
from dataclasses import dataclass, field
from os import PathLike
from typing import TYPE_CHECKING, Iterator

import torch
from torch import nn

from ..cards import naming as _naming
from ..errors import CardMismatchError, InputError
from .layer import (ACTIVE_SCOPED, DISPATCHERS, LayerGeometry, LoRALayer, base_state_dict, geometry_of,
                    model_lock, unwrap_if_empty, wrap_module)

if TYPE_CHECKING:  # pragma: no cover
    from ..cards import LoRACard

__all__ = ["LoRAManager"]

_BASE = ".base_layer"
_SERIAL = itertools.count(1)


class _Owner:
    """Identity of one manager in :data:`ACTIVE_SCOPED` keys (hashable by identity; holds no
    reference to the manager, so a context that outlives it keeps nothing alive)."""

    __slots__ = ("serial",)

    def __init__(self) -> None:
        self.serial = next(_SERIAL)

    def __repr__(self) -> str:
        return f"<LoRAManager scope #{self.serial}>"


@dataclass
class _Entry:
    """What the manager knows about one registered card."""

    card: "LoRACard"
    weight: float | None          # None: scoped
    targets: dict[str, str]       # card key -> module name in the model
    refcount: int = 0             # scoped only: contexts currently inside applied()
    merged: bool = False


@dataclass
class _Plan:
    """A fully validated card, ready to apply without further checks."""

    card: "LoRACard"
    targets: dict[str, str]
    factors: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)


class LoRAManager:
    """Applies, removes, merges and scopes LoRA cards on ``model``.

    Args:
        model: any ``torch.nn.Module`` whose adapted layers are ``nn.Linear`` or transformers'
            ``Conv1D`` (a sentence-transformers wrapper, a BERT, a Llama, a GPT-2, ...).
        exact_unmerge: keep an exact copy of each merged layer's base weight so that
            :meth:`unmerge` restores it bit for bit (costs one weight copy per merged layer
            while merged). With ``False``, unmerge subtracts the delta (round-off ~1e-7).

    Use one manager per model.
    """

    def __init__(self, model: nn.Module, *, exact_unmerge: bool = True):
        if not isinstance(model, nn.Module):
            raise InputError(f"LoRAManager needs a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.exact_unmerge = exact_unmerge
        self._entries: dict[str, _Entry] = {}
        self._loaded: dict[str, "LoRACard"] = {}
        self._lock = model_lock(model)
        self._owner = _Owner()

    # ================================================================== public API
    def load_card(self, path: str | PathLike, *, verify: bool = True) -> "LoRACard":
        """Load a ``.lora.arrow`` card (``LoRAFormat.load``, memory-mapped) and record it under
        its name; return it. Does not apply it."""
        from ..cards import LoRAFormat

        card = LoRAFormat.load(path, verify=verify)
        with self._lock:
            self._loaded[card.name] = card
        return card

    @property
    def loaded_cards(self) -> dict[str, "LoRACard"]:
        """Cards recorded by :meth:`load_card`, by name."""
        return dict(self._loaded)

    def apply_card(self, card: "LoRACard | str", weight: float = 1.0, *,
                   check_fingerprint: bool = True) -> None:
        """Apply ``card`` (or the name of a card recorded by :meth:`load_card`) to every forward,
        scaled by ``weight``. Raises :class:`CardMismatchError` (model unchanged) if any key
        matches no module, matches several, or has shapes that do not fit, or if the card's
        ``base_fingerprint`` differs from the model's (unless ``check_fingerprint=False``)."""
        card = self._resolve_card(card)
        weight = self._check_weight(weight)
        with self._lock:
            if card.name in self._entries:
                raise InputError(f"a card named {card.name!r} is already applied; "
                                 f"remove_card({card.name!r}) first")
            plan = self._plan(card, check_fingerprint)
            self._execute(plan, weight)
            self._entries[card.name] = _Entry(card, weight, plan.targets)

    def remove_card(self, name: str) -> None:
        """Remove the globally applied card ``name`` (unmerging it first if merged). Layers left
        with no adapter get their original module object back in their parent."""
        with self._lock:
            entry = self._entries.get(name)
            if entry is None or entry.weight is None:
                raise InputError(f"no card named {name!r} is applied; applied: {self.list_cards()}")
            self._unregister(name, entry)
            del self._entries[name]

    def list_cards(self) -> list[str]:
        """Names of the globally applied cards, in the order they were applied."""
        return [n for n, e in self._entries.items() if e.weight is not None]

    def merge(self, name: str | None = None) -> None:
        """Merge applied card ``name`` (or every applied card) into the base weights; merged
        inference then costs nothing extra. Not safe while other threads run the model.
        Refused (nothing merged) while a target layer holds a trainable adapter."""
        with self._lock:
            names = self._names(name)
            for n in names:  # validate all, then merge all
                for mod_name in self._entries[n].targets.values():
                    self._layer(mod_name).check_mergeable(n)
            for n in names:
                entry = self._entries[n]
                for mod_name in entry.targets.values():
                    self._layer(mod_name).merge(n)
                entry.merged = True

    def unmerge(self, name: str | None = None) -> None:
        """Undo :meth:`merge` for ``name`` (or every merged card); the adapters stay applied,
        computed on the fly again."""
        with self._lock:
            for n in self._names(name):
                entry = self._entries[n]
                for mod_name in entry.targets.values():
                    self._layer(mod_name).unmerge(n)
                entry.merged = False

    def merged_cards(self) -> list[str]:
        """Names of the applied cards currently merged into the weights."""
        return [n for n, e in self._entries.items() if e.merged]

    @contextmanager
    def applied(self, card: "LoRACard | str", weight: float = 1.0, *,
                check_fingerprint: bool = True) -> Iterator["LoRACard"]:
        """Use ``card`` (times ``weight``) for forwards run in this thread / asyncio task inside
        the ``with`` block only. Safe with several threads serving requests on one model: each
        sees only the cards it entered (plus globally applied ones). The card's factors are
        registered on first entry and removed when the last concurrent user leaves. Nested
        blocks add up. A card with the same name as a globally applied one is refused."""
        card = self._resolve_card(card)
        weight = self._check_weight(weight)
        current = ACTIVE_SCOPED.get()
        key = (self._owner, card.name)
        if key in current:
            raise InputError(f"card {card.name!r} is already applied in this scope")
        with self._lock:
            entry = self._entries.get(card.name)
            if entry is None:
                plan = self._plan(card, check_fingerprint)
                self._execute(plan, None)
                entry = self._entries[card.name] = _Entry(card, None, plan.targets)
            elif entry.weight is not None:
                raise InputError(f"card {card.name!r} is applied globally; remove_card it before "
                                 f"using it in a scoped block")
            elif entry.card is not card and not entry.card.equal(card):
                raise InputError(f"another card named {card.name!r} is in use by a scoped block; "
                                 f"cards need distinct names")
            entry.refcount += 1
        token = ACTIVE_SCOPED.set({**current, key: weight})
        try:
            yield card
        finally:
            ACTIVE_SCOPED.reset(token)
            with self._lock:
                entry.refcount -= 1
                if entry.refcount == 0:
                    self._unregister(card.name, entry)
                    del self._entries[card.name]

    def base_state_dict(self) -> dict[str, torch.Tensor]:
        """The model's state dict as it would be with no card applied: wrapper names
        (``...base_layer.weight``) mapped back, trainable factors left out and merged layers'
        original weights (of every wrapped layer, not only this manager's: a layer merged by
        another manager must still report its original weight)."""
        with self._lock:
            return base_state_dict(self.model)

    def fingerprint(self) -> str:
        """``fingerprint_model`` of the base model, as if no card were applied (recomputed on
        each call: it samples a few values per tensor, and the model may have changed dtype)."""
        from ..cards import fingerprint_model

        return fingerprint_model(self.base_state_dict())

    # ================================================================== internals
    def _resolve_card(self, card: "LoRACard | str") -> "LoRACard":
        if isinstance(card, str):
            try:
                return self._loaded[card]
            except KeyError:
                raise InputError(f"no card named {card!r} was loaded; loaded: {sorted(self._loaded)}") from None
        from ..cards import LoRACard

        if not isinstance(card, LoRACard):
            raise InputError(f"expected a LoRACard or the name of a loaded card, got {type(card).__name__}")
        return card

    @staticmethod
    def _check_weight(weight: float) -> float:
        try:
            w = float(weight)
        except (TypeError, ValueError):
            raise InputError(f"weight must be a number, got {weight!r}") from None
        if w != w or w in (float("inf"), float("-inf")):
            raise InputError(f"weight must be finite, got {weight!r}")
        return w

    def _names(self, name: str | None) -> list[str]:
        if name is None:
            return self.list_cards()
        if name not in self._entries or self._entries[name].weight is None:
            raise InputError(f"no card named {name!r} is applied; applied: {self.list_cards()}")
        return [name]

    def _layer(self, mod_name: str) -> LoRALayer:
        layer = self.model.get_submodule(mod_name)
        assert isinstance(layer, LoRALayer), mod_name  # the manager put it there
        return layer

    def _adaptable(self) -> tuple[dict[str, LayerGeometry], dict[str, str]]:
        """Module name -> geometry for every layer the dispatch chain accepts (wrapped layers
        are listed under their own name, their inner ``base_layer`` is skipped), and module
        name -> reason for the layers that look adaptable but are refused (quantised linears,
        MultiheadAttention's out_proj)."""
        out: dict[str, LayerGeometry] = {}
        refused: dict[str, str] = {}
        skip: set[str] = set()
        mods = dict(self.model.named_modules())
        for name, mod in mods.items():  # parents come before children
            if name in skip:
                continue
            if isinstance(mod, LoRALayer):
                out[name] = mod.geometry
                skip.add(f"{name}{_BASE}" if name else _BASE[1:])
                continue
            parent = mods.get(name.rpartition(".")[0]) if name else None
            try:
                out[name] = geometry_of(mod, name, parent)
            except CardMismatchError as exc:
                if any(d(mod) is not None for d in DISPATCHERS):
                    refused[name] = str(exc)
        return out, refused

    def _match(self, key: str, naming: str, modules: dict[str, LayerGeometry],
               suffixes: dict[str, list[str]]) -> str:
        """Module name for card key ``key``: exact, then the model has a wrapper prefix
        (``0.auto_model.`` + key), then the card has one (key = prefix + module name).
        ArrowEngine names are translated first."""
        tried = []
        for k in dict.fromkeys([_naming.convert(key, naming, "hf"), _naming.to_hf(key), key]):
            if k in modules:
                return k
            tried.append(k)
            hits = suffixes.get(k, [])
            if len(hits) == 1:
                return hits[0]
            if len(hits) > 1:
                raise CardMismatchError(
                    f"card key {key!r} is ambiguous: it matches several modules ({', '.join(sorted(hits)[:4])}...); "
                    f"use the full module name")
            parts = k.split(".")
            for i in range(1, len(parts)):
                tail = ".".join(parts[i:])
                if tail in modules:
                    return tail
        raise CardMismatchError(
            f"card key {key!r} matches no adaptable module of the model (tried {tried}); "
            f"adaptable modules look like {sorted(modules)[:3]}")

    @staticmethod
    def _suffixes(modules) -> dict[str, list[str]]:
        suffixes: dict[str, list[str]] = {}
        for name in modules:
            parts = name.split(".")
            for i in range(1, len(parts)):
                suffixes.setdefault(".".join(parts[i:]), []).append(name)
        return suffixes

    def _plan(self, card: "LoRACard", check_fingerprint: bool) -> _Plan:
        """Validate everything and prepare the converted factors; changes nothing."""
        if check_fingerprint and card.base_fingerprint is not None:
            fp = self.fingerprint()
            if fp != card.base_fingerprint:
                raise CardMismatchError(
                    f"card {card.name!r} was made for base model {card.base_fingerprint}, but this "
                    f"model's fingerprint is {fp}; pass check_fingerprint=False to apply it anyway")
        modules, refused = self._adaptable()
        for key in (card.modules if refused else ()):
            # a key naming a refused layer gets the reason, not "matches no module"
            try:
                hit = self._match(key, card.naming, refused, self._suffixes(refused))
            except CardMismatchError:
                continue
            raise CardMismatchError(f"card {card.name!r}, module {key!r}: {refused[hit]}")
        if not modules:
            raise CardMismatchError(f"card {card.name!r}: the model has no layer LoRA can adapt")
        suffixes = self._suffixes(modules)
        plan = _Plan(card, {})
        seen: dict[str, str] = {}
        for key in card.modules:
            mod_name = self._match(key, card.naming, modules, suffixes)
            if mod_name in seen:
                raise CardMismatchError(f"card {card.name!r}: keys {seen[mod_name]!r} and {key!r} "
                                        f"both resolve to module {mod_name!r}")
            if mod_name == "":
                raise CardMismatchError(f"card {card.name!r}: key {key!r} names the root module; "
                                        f"wrap it in a container to adapt it")
            seen[mod_name] = key
            geo = modules[mod_name]
            A, B = card.weights_A[key], card.weights_B[key]
            r = A.shape[0]
            if A.shape[1] != geo.in_features or tuple(B.shape) != (geo.out_features, r):
                raise CardMismatchError(
                    f"card {card.name!r}, module {key!r} -> {mod_name!r}: A {tuple(A.shape)} and B "
                    f"{tuple(B.shape)} do not fit a layer of in_features={geo.in_features}, "
                    f"out_features={geo.out_features}; expected A ({r}, {geo.in_features}) and "
                    f"B ({geo.out_features}, {r})")
            mod = self.model.get_submodule(mod_name)
            if isinstance(mod, LoRALayer):
                if card.name in mod.adapters:
                    raise CardMismatchError(f"module {mod_name!r} already holds an adapter named {card.name!r}")
                w = mod.base_layer.weight
            else:
                w = mod.weight
            # Convert now (may copy or allocate): a failure here leaves the model untouched.
            plan.factors[mod_name] = (A.to(device=w.device, dtype=w.dtype).contiguous(),
                                      B.to(device=w.device, dtype=w.dtype).contiguous(),
                                      card.scaling(key))
            plan.targets[key] = mod_name
        return plan

    def _execute(self, plan: _Plan, weight: float | None) -> None:
        """Apply a validated plan; on any unexpected failure roll back what was done."""
        done: list[str] = []
        try:
            for mod_name, (A, B, scaling) in plan.factors.items():
                layer = self._wrap(mod_name)
                layer.add_adapter(plan.card.name, A, B, scaling, weight, owner=self._owner)
                done.append(mod_name)
        except BaseException:
            for mod_name in done:
                self._remove_from(mod_name, plan.card.name)
            raise

    def _wrap(self, mod_name: str) -> LoRALayer:
        return wrap_module(self.model, mod_name, exact_unmerge=self.exact_unmerge)

    def _remove_from(self, mod_name: str, adapter: str) -> None:
        self._layer(mod_name).remove_adapter(adapter)
        # last adapter gone (a trainer's trainable one counts too): the original module returns
        unwrap_if_empty(self.model, mod_name)

    def _unregister(self, name: str, entry: _Entry) -> None:
        for mod_name in entry.targets.values():
            self._remove_from(mod_name, name)
        entry.merged = False
