"""A LoRA wrapper around one linear-like layer, holding several named adapters.

Follows the vocabulary of PEFT's ``tuners/lora`` (Hu et al., 2021, "LoRA: Low-Rank Adaptation
of Large Language Models", arXiv:2106.09685): ``lora_A`` has shape ``(r, in_features)``,
``lora_B`` ``(out_features, r)``, ``scaling = alpha / r`` and ``ΔW = scaling · B @ A``.

The wrapper computes ``base(x) + Σ weight · scaling · ((x @ Aᵀ) @ Bᵀ)`` without ever forming
``ΔW`` (two thin matmuls cost ``r·(in+out)`` per token instead of ``in·out``).

Which layers can be wrapped is decided by a chain of ``dispatch_<kind>`` functions tried in
order (first match wins), as in PEFT: :func:`dispatch_linear` (``nn.Linear`` and subclasses),
then :func:`dispatch_conv1d` (transformers' GPT-2 ``Conv1D``, whose weight is stored
``(in, out)``: the transpose is handled at merge time, the forward formula is unchanged).

One wrapper for serving and training (as PEFT's ``LoraLayer``): besides the served cards
(frozen factors in the base weight's dtype, global or scoped), a layer can hold *trainable*
adapters (:meth:`LoRALayer.add_trainable_adapter`): ``lora_A`` / ``lora_B`` ``nn.Parameter``s
registered on the layer (so ``model.parameters()``, optimisers and ``model.to()`` see them),
kept in float32 and cast to the input's dtype in the forward, with optional dropout on the
adapter's input. They go through the same forward, the same table, the same refusal rules
(:func:`geometry_of`) and the same :func:`base_only` scope as served cards (a trainable adapter
counts like a global one). The trainer (:mod:`aios_fast.learn._inject`) injects them with
:func:`wrap_module` / :func:`unwrap_if_empty`, the manager's own wrapping code. While a layer
holds a trainable adapter nothing can be merged into it: its base weight may hold a PiSSA
residual the trainer swaps back at the end (a merge would be lost or corrupt the restore),
and a merged trainable adapter would stop receiving gradients. Served cards can still be
applied on top (globally or scoped); they are added on the fly.

Thread safety: the adapter table is copy-on-write (every change builds a new dict and swaps
it in one assignment), so a forward running in another thread always iterates one consistent
snapshot. Which *scoped* adapters a forward uses comes from a :class:`contextvars.ContextVar`
(:data:`ACTIVE_SCOPED`), so each thread (or asyncio task) sees only the cards it entered. Its
keys are ``(owner, name)``: the owner is the :class:`LoRAManager` scope that registered the
adapter, so two managers on two models (or one) never apply each other's same-named cards.
:func:`base_only` hides every card (global, merged or scoped) from forwards run in the current
context only: the validation gate measures the base model with it while other threads keep
serving their cards.

No tensor created under ``torch.inference_mode()`` is kept: factors (and the pre-scaled B of
global adapters) are made ordinary tensors when registered, so an ``encode()`` under inference
mode followed by a forward with gradients (training, attribution) works.
Merging changes the shared base weight in place and is therefore *not* safe while other
threads run the model; do it between requests.
"""

from __future__ import annotations

import contextvars
import threading
import weakref
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Hashable, Iterator, Mapping

import torch
from torch import nn

from ..errors import CardMismatchError, InputError

__all__ = [
    "ACTIVE_SCOPED",
    "Adapter",
    "base_only",
    "base_state_dict",
    "model_lock",
    "unwrap_if_empty",
    "wrap_module",
    "LayerGeometry",
    "LoRALayer",
    "DISPATCHERS",
    "dispatch_linear",
    "dispatch_conv1d",
    "geometry_of",
    "supported_types",
]

#: Scoped adapters active in the current thread / task: ``(owner, adapter name) -> weight``.
#: Read by :meth:`LoRALayer.forward`; set by :meth:`aios_fast.lora.LoRAManager.applied`.
ACTIVE_SCOPED: contextvars.ContextVar[Mapping[tuple[Hashable, str], float]] = contextvars.ContextVar(
    "aios_fast_lora_active_scoped", default={})

#: True inside :func:`base_only`: forwards in this context ignore global and merged adapters.
_BASE_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("aios_fast_lora_base_only",
                                                                  default=False)


@contextmanager
def base_only() -> Iterator[None]:
    """Inside the block, forwards run *in this thread / asyncio task* see the base model: global
    adapters are skipped, merged ones are subtracted on the fly (exact up to round-off) and the
    scoped cards entered so far are hidden. Cards entered with ``LoRAManager.applied`` inside
    the block do count, so ``with base_only(): ...; with mgr.applied(card): ...`` measures the
    base and the base plus ``card`` without touching what other threads see. Used by
    :func:`aios_fast.learn.validate`."""
    t1 = _BASE_ONLY.set(True)
    t2 = ACTIVE_SCOPED.set({})
    try:
        yield
    finally:
        ACTIVE_SCOPED.reset(t2)
        _BASE_ONLY.reset(t1)


def _ordinary(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself, or a normal copy when it was created under ``torch.inference_mode``
    (inference tensors cannot be saved for backward outside that mode)."""
    if t.is_inference():
        with torch.inference_mode(False):
            return t.clone()
    return t


@dataclass(frozen=True)
class LayerGeometry:
    """How to adapt one layer: its feature sizes and whether its weight is stored (in, out)."""

    in_features: int
    out_features: int
    fan_in_fan_out: bool = False  # True for GPT-2 Conv1D: weight is (in, out)
    kind: str = "linear"


def _refuse_quantised(module: nn.Module, name: str) -> None:
    """Quantised linears (bitsandbytes ``Linear8bitLt``/``Linear4bit`` and the like subclass
    ``nn.Linear`` but store int8 / packed weights): casting A and B to that dtype would wipe
    the adapter, and merging into packed weights is meaningless. Refuse them by name."""
    w = getattr(module, "weight", None)
    if not isinstance(w, torch.Tensor):
        return
    if not w.dtype.is_floating_point or type(w) not in (torch.Tensor, nn.Parameter):
        raise CardMismatchError(
            f"module {name or '<root>'!r} is a {type(module).__module__}.{type(module).__qualname__} "
            f"with a {type(w).__name__} weight of dtype {w.dtype}: quantised layers cannot hold a LoRA "
            f"adapter here (their weight is not a plain floating-point tensor); adapt an unquantised "
            f"copy of the model, or leave this module out of the card")


def dispatch_linear(module: nn.Module) -> LayerGeometry | None:
    """``nn.Linear`` (and subclasses with a plain floating-point weight): weight ``(out, in)``."""
    if isinstance(module, nn.Linear):
        return LayerGeometry(module.in_features, module.out_features, False, "linear")
    return None


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # transformers is optional for plain torch models
        return None
    return Conv1D


def dispatch_conv1d(module: nn.Module) -> LayerGeometry | None:
    """transformers' GPT-2 ``Conv1D``: weight ``(in, out)`` = ``(nx, nf)``."""
    conv1d = _conv1d_type()
    if conv1d is not None and isinstance(module, conv1d):
        nx, nf = module.weight.shape
        return LayerGeometry(int(nx), int(nf), True, "conv1d")
    return None


#: The dispatch chain, tried in order; the first function returning a geometry wins.
DISPATCHERS: list[Callable[[nn.Module], LayerGeometry | None]] = [dispatch_linear, dispatch_conv1d]


def supported_types() -> list[str]:
    """Names of the layer types the dispatch chain accepts (for error messages)."""
    names = ["torch.nn.Linear"]
    if _conv1d_type() is not None:
        names.append("transformers.pytorch_utils.Conv1D")
    return names


def geometry_of(module: nn.Module, name: str = "", parent: nn.Module | None = None) -> LayerGeometry:
    """Run the dispatch chain on ``module``; raise :class:`CardMismatchError` listing the
    supported types when no dispatcher accepts it, and for layers that look adaptable but are
    not: quantised linears, and ``nn.MultiheadAttention.out_proj`` (pass ``parent``), which
    MHA reads by weight instead of calling, so a wrapper would be silently bypassed."""
    if isinstance(module, LoRALayer):
        return module.geometry
    if isinstance(parent, nn.MultiheadAttention) and module is getattr(parent, "out_proj", None):
        raise CardMismatchError(
            f"module {name or '<root>'!r} is the out_proj of a torch.nn.MultiheadAttention, which reads "
            f"its weight directly instead of calling it: a LoRA wrapper there would be bypassed; "
            f"leave it out of the card (or merge the delta into the weight yourself)")
    _refuse_quantised(module, name)
    for dispatch in DISPATCHERS:
        geo = dispatch(module)
        if geo is not None:
            return geo
    raise CardMismatchError(
        f"module {name or '<root>'!r} is a {type(module).__module__}.{type(module).__qualname__}, "
        f"which LoRA cannot adapt; supported types: {', '.join(supported_types())}")


@dataclass
class Adapter:
    """One named adapter in a layer. ``A`` (r, in) and ``B`` (out, r) live on the base layer's
    device and dtype. ``weight`` is the global mixing weight; ``None`` marks a scoped adapter,
    whose weight comes from :data:`ACTIVE_SCOPED` at forward time under key ``(owner, name)``."""

    name: str
    A: torch.Tensor
    B: torch.Tensor
    scaling: float
    weight: float | None = 1.0
    merged: bool = False
    owner: Hashable = None
    # Trainable adapters: A and B are the layer's registered nn.Parameters (float32 master
    # weights, cast to the input's dtype in the forward), ``dropout`` acts on the adapter's input.
    trainable: bool = False
    dropout: nn.Module | None = field(default=None, repr=False)
    # B pre-multiplied by weight·scaling for global adapters (saves one op per forward). Made
    # here, eagerly and outside inference mode: a lazily cached product made during an
    # inference-mode forward would be an inference tensor and break later autograd forwards.
    _B_scaled: torch.Tensor | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.A, self.B = _ordinary(self.A), _ordinary(self.B)
        # a trainable B changes every step: nothing may be pre-multiplied from it
        if self.weight is not None and self._B_scaled is None and not self.trainable:
            with torch.inference_mode(False), torch.no_grad():
                self._B_scaled = (self.B * (self.weight * self.scaling)).contiguous()

    @property
    def scoped(self) -> bool:
        return self.weight is None

    def b_scaled(self) -> torch.Tensor:
        return self._B_scaled

    def delta_weight(self, weight: float) -> torch.Tensor:
        """``weight · scaling · B @ A`` in float32, shape (out, in)."""
        return (self.B.float() @ self.A.float()) * (weight * self.scaling)

    def moved(self, device: torch.device, dtype: torch.dtype) -> "Adapter":
        with torch.inference_mode(False):
            return Adapter(self.name, self.A.to(device=device, dtype=dtype).contiguous(),
                           self.B.to(device=device, dtype=dtype).contiguous(),
                           self.scaling, self.weight, self.merged, self.owner)

    def with_merged(self, merged: bool) -> "Adapter":
        return Adapter(self.name, self.A, self.B, self.scaling, self.weight, merged, self.owner,
                       self.trainable, self.dropout, self._B_scaled)


def _add_lora(out: torch.Tensor, x: torch.Tensor, A: torch.Tensor, B: torch.Tensor,
              s: float) -> torch.Tensor:
    """``out + s · (x @ Aᵀ) @ Bᵀ`` without forming ``B @ A``."""
    if x.dtype != A.dtype:
        x = x.to(A.dtype)
    h = nn.functional.linear(x, A)  # (..., r): the cheap place to apply the scale
    if s != 1.0:
        h = h * s
    if (out.dtype == B.dtype and out.is_contiguous()
            and not (torch.is_grad_enabled() and (out.requires_grad or h.requires_grad))):
        # Inference: accumulate into the base output (a fresh tensor from Linear/Conv1D), one
        # fused addmm instead of a matmul, an allocation and an add.
        out.view(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), B.t())
        return out
    return out + nn.functional.linear(h, B).to(out.dtype)


class LoRALayer(nn.Module):
    """Wraps ``base_layer`` (kept as a child, so its parameters move with the model) and adds
    the active adapters' low-rank updates to its output.

    Args:
        base_layer: the module being adapted (``nn.Linear`` or ``Conv1D``).
        geometry: what :func:`geometry_of` returned for it.
        exact_unmerge: keep an exact copy of the base weight while any adapter is merged, so
            that unmerging restores it bit for bit (one extra weight-sized tensor per merged
            layer). With ``False`` unmerge subtracts the delta again (float round-off remains:
            about 1e-7 relative in float32, more in half precision).
    """

    def __init__(self, base_layer: nn.Module, geometry: LayerGeometry, exact_unmerge: bool = True):
        super().__init__()
        self.base_layer = base_layer
        self.geometry = geometry
        self.exact_unmerge = exact_unmerge
        self._adapters = {}
        self._base_copy: torch.Tensor | None = None

    # ------------------------------------------------------------------ table
    @property
    def _adapters(self) -> dict[str, Adapter]:
        return self._table[0]

    @_adapters.setter
    def _adapters(self, table: dict[str, Adapter]) -> None:
        # Copy-on-write: the table and the forward's pre-sorted views are swapped in together
        # (one attribute assignment), so a concurrent forward sees either all old or all new.
        live = [a for a in table.values() if a.weight is not None and not a.merged]
        glob = tuple(a for a in live if not a.trainable)
        trainable = tuple(a for a in live if a.trainable)
        scoped = tuple(a for a in table.values() if a.weight is None)
        merged = tuple(a for a in table.values() if a.merged)
        object.__setattr__(self, "_table", (table, glob, trainable, scoped, merged))

    @property
    def adapters(self) -> Mapping[str, Adapter]:
        """The current adapter table (a snapshot; do not mutate)."""
        return self._adapters

    @property
    def weight(self) -> torch.Tensor:
        return self.base_layer.weight

    def _target(self) -> tuple[torch.device, torch.dtype]:
        w = self.base_layer.weight
        return w.device, w.dtype

    def _check_new(self, name: str, A: torch.Tensor, B: torch.Tensor) -> None:
        geo = self.geometry
        r = A.shape[0] if A.ndim else 0
        if A.ndim != 2 or B.ndim != 2 or A.shape[1] != geo.in_features or B.shape != (geo.out_features, r):
            raise CardMismatchError(
                f"adapter {name!r}: A {tuple(A.shape)} and B {tuple(B.shape)} do not fit a layer with "
                f"in_features={geo.in_features}, out_features={geo.out_features}; expected "
                f"A (r, {geo.in_features}) and B ({geo.out_features}, r)")
        if name in self._adapters:
            raise CardMismatchError(f"adapter {name!r} is already present in this layer")

    def add_adapter(self, name: str, A: torch.Tensor, B: torch.Tensor, scaling: float,
                    weight: float | None = 1.0, owner: Hashable = None) -> None:
        """Register adapter ``name``; ``A`` and ``B`` are converted to the base weight's device
        and dtype (no copy when they already match). ``weight=None`` makes it scoped: it then
        counts where :data:`ACTIVE_SCOPED` holds ``(owner, name)``."""
        self._check_new(name, A, B)
        device, dtype = self._target()
        ad = Adapter(name, A, B, float(scaling), None if weight is None else float(weight),
                     owner=owner).moved(device, dtype)
        table = dict(self._adapters)
        table[name] = ad
        self._adapters = table  # one assignment: readers see the old or the new table

    def add_trainable_adapter(self, name: str, A: torch.Tensor, B: torch.Tensor, scaling: float, *,
                              dropout: float = 0.0, dtype: torch.dtype = torch.float32) -> None:
        """Register a trainable adapter ``name``: ``A`` and ``B`` become ``nn.Parameter``s
        (``requires_grad=True``) ``self.lora_A[name]`` / ``self.lora_B[name]`` on the base
        weight's device in ``dtype`` (float32 master weights whatever the model's dtype; the
        forward casts them to the input's dtype). No copy when they already match, so the
        parameters may share memory with ``A`` and ``B``. ``dropout`` is applied to the
        adapter's input in training mode (``0``: none, and no random numbers drawn). The
        adapter counts in every forward like a global one of weight 1 (and is hidden by
        :func:`base_only`); while it is present nothing can be merged into this layer."""
        self._check_new(name, A, B)
        if not name or "." in name:  # it names parameters: lora_A.<name>
            raise InputError(f"trainable adapter name must be non-empty without '.', got {name!r}")
        if not (isinstance(dropout, (int, float)) and 0.0 <= dropout < 1.0):
            raise InputError(f"adapter {name!r}: dropout must be a number in [0, 1), got {dropout!r}")
        if self.merged_names:
            raise InputError(f"adapter {name!r}: this layer has merged adapters {self.merged_names}; "
                             f"unmerge them before adding a trainable adapter")
        device = self._target()[0]
        with torch.inference_mode(False):  # parameters must be ordinary tensors (autograd)
            pa = nn.Parameter(_ordinary(A.detach()).to(device=device, dtype=dtype), requires_grad=True)
            pb = nn.Parameter(_ordinary(B.detach()).to(device=device, dtype=dtype), requires_grad=True)
        drop = nn.Dropout(float(dropout)) if dropout > 0 else nn.Identity()
        if "lora_A" not in self._modules:  # created on first use: served-only layers stay lean
            self.lora_A, self.lora_B = nn.ParameterDict(), nn.ParameterDict()
            self.lora_dropout = nn.ModuleDict()
        self.lora_A[name], self.lora_B[name] = pa, pb
        self.lora_dropout[name] = drop
        drop.train(self.training)
        table = dict(self._adapters)
        table[name] = Adapter(name, pa, pb, float(scaling), 1.0, trainable=True, dropout=drop)
        self._adapters = table

    def remove_adapter(self, name: str) -> Adapter:
        """Unregister adapter ``name`` (unmerging it first if merged) and return it."""
        if name not in self._adapters:
            raise KeyError(name)
        if self._adapters[name].merged:
            self.unmerge(name)
        table = dict(self._adapters)
        ad = table.pop(name)
        self._adapters = table
        if ad.trainable:
            del self.lora_A[name], self.lora_B[name], self.lora_dropout[name]
            if not len(self.lora_A):
                del self.lora_A, self.lora_B, self.lora_dropout
        return ad

    @property
    def trainable_names(self) -> list[str]:
        return [n for n, a in self._adapters.items() if a.trainable]

    # ------------------------------------------------------------------ forward
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        out = self.base_layer(x, *args, **kwargs)
        _, glob, trainable, scoped, merged = self._table  # one snapshot: safe against concurrent add/remove
        if _BASE_ONLY.get():
            # base_only(): this context measures the base model; cancel what is merged in.
            for ad in merged:
                out = _add_lora(out, x, ad.A, ad.B, -ad.weight * ad.scaling)
        else:
            for ad in glob:  # global, unmerged: B already carries weight·scaling
                out = _add_lora(out, x, ad.A, ad.b_scaled(), 1.0)
            for ad in trainable:  # float32 parameters, cast (with autograd) to the input's dtype
                out = _add_lora(out, ad.dropout(x), ad.A.to(x.dtype), ad.B.to(x.dtype),
                                ad.weight * ad.scaling)
        if scoped:
            active = ACTIVE_SCOPED.get()
            if active:  # scoped adapters count only where the current context entered them
                for ad in scoped:
                    w = active.get((ad.owner, ad.name))
                    if w is not None:
                        out = _add_lora(out, x, ad.A, ad.B, w * ad.scaling)
        return out

    # ------------------------------------------------------------------ merge
    def _delta_in_weight_layout(self, ad: Adapter) -> torch.Tensor:
        d = ad.delta_weight(ad.weight)
        return d.T if self.geometry.fan_in_fan_out else d

    def merge(self, name: str) -> None:
        """Add adapter ``name``'s delta (times its weight) into the base weight."""
        ad = self._adapters[name]
        if ad.scoped:
            raise CardMismatchError(f"adapter {name!r} is scoped to a request and cannot be merged")
        self.check_mergeable(name)
        if ad.merged:
            return
        w = self.base_layer.weight
        with torch.no_grad():
            if self.exact_unmerge and self._base_copy is None:
                self._base_copy = w.detach().clone()
            w.copy_((w.float() + self._delta_in_weight_layout(ad)).to(w.dtype))
        table = dict(self._adapters)
        table[name] = ad.with_merged(True)
        self._adapters = table

    def unmerge(self, name: str) -> None:
        """Take adapter ``name``'s delta out of the base weight again."""
        ad = self._adapters[name]
        if not ad.merged:
            return
        table = dict(self._adapters)
        table[name] = ad.with_merged(False)
        w = self.base_layer.weight
        with torch.no_grad():
            if self._base_copy is not None:
                # Rebuild from the exact copy: bit-exact when nothing else stays merged.
                still = [a for a in table.values() if a.merged]
                acc = self._base_copy.float()
                for a in still:
                    acc = acc + self._delta_in_weight_layout(a)
                w.copy_(self._base_copy if not still else acc.to(w.dtype))
                if not still:
                    self._base_copy = None
            else:
                w.copy_((w.float() - self._delta_in_weight_layout(ad)).to(w.dtype))
        self._adapters = table

    def check_mergeable(self, name: str) -> None:
        """Raise :class:`InputError` when ``name`` cannot be merged because this layer holds a
        trainable adapter (see the module docstring: the base weight is the trainer's)."""
        if self.trainable_names:
            raise InputError(
                f"cannot merge adapter {name!r}: the layer holds trainable adapter(s) "
                f"{self.trainable_names}; its base weight belongs to the training run (it may hold "
                f"a PiSSA residual that is restored afterwards, and a merged trainable adapter gets "
                f"no gradient). Merge after training, from the exported card")

    @property
    def merged_names(self) -> list[str]:
        return [n for n, a in self._adapters.items() if a.merged]

    # ------------------------------------------------------------------ device / dtype
    def _apply(self, fn, *args, **kwargs):
        # model.to()/half()/cuda() reach here: move the base first, then make the factors
        # (and the exact copy) follow the base weight's device and dtype.
        super()._apply(fn, *args, **kwargs)
        device, dtype = self._target()
        table = {}
        for n, a in self._adapters.items():
            if a.trainable:  # moved by nn.Module itself; follow it if it swapped the objects
                pa, pb = self.lora_A[n], self.lora_B[n]
                table[n] = a if (a.A is pa and a.B is pb) else Adapter(
                    n, pa, pb, a.scaling, a.weight, trainable=True, dropout=a.dropout)
            elif a.A.device == device and a.A.dtype == dtype:
                table[n] = a
            else:
                table[n] = a.moved(device, dtype)
        self._adapters = table
        if self._base_copy is not None:
            self._base_copy = self._base_copy.to(device=device, dtype=dtype)
        return self

    def extra_repr(self) -> str:
        names = ", ".join(f"{n}{'*' if a.merged else ''}{'(scoped)' if a.scoped else ''}"
                          f"{'(trainable)' if a.trainable else ''}" for n, a in self._adapters.items())
        return f"kind={self.geometry.kind}, adapters=[{names}]"


# ---------------------------------------------------------------------- wrapping a model's layers
_MODEL_LOCKS: "weakref.WeakKeyDictionary[nn.Module, threading.RLock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model: nn.Module) -> threading.RLock:
    """One lock per model, shared by everything that wraps or unwraps its layers (every
    :class:`LoRAManager` on it, the validation gate's own manager, the trainer's injection)."""
    with _LOCKS_GUARD:
        lock = _MODEL_LOCKS.get(model)
        if lock is None:
            lock = _MODEL_LOCKS[model] = threading.RLock()
        return lock


def wrap_module(model: nn.Module, mod_name: str, *, exact_unmerge: bool = True) -> LoRALayer:
    """The :class:`LoRALayer` at ``mod_name``: the existing one, or a new one put in the
    parent's place (the refusal rules of :func:`geometry_of` apply). Call under
    :func:`model_lock`."""
    mod = model.get_submodule(mod_name)
    if isinstance(mod, LoRALayer):
        return mod
    if not mod_name:
        raise CardMismatchError("the root module cannot be wrapped; wrap it in a container to adapt it")
    parent_name, _, child = mod_name.rpartition(".")
    parent = model.get_submodule(parent_name)
    layer = LoRALayer(mod, geometry_of(mod, mod_name, parent), exact_unmerge=exact_unmerge)
    layer.train(mod.training)
    setattr(parent, child, layer)
    return layer


def unwrap_if_empty(model: nn.Module, mod_name: str) -> None:
    """Put the original module object back at ``mod_name`` when its wrapper holds no adapter
    any more (of any kind). Call under :func:`model_lock`."""
    layer = model.get_submodule(mod_name)
    if isinstance(layer, LoRALayer) and not layer.adapters:
        parent_name, _, child = mod_name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, layer.base_layer)


def base_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` as it would be with no adapter: wrapper names
    (``...base_layer.weight``) mapped back, trainable factors left out, merged layers'
    original weights (raises :class:`InputError` for merged layers without an exact copy).
    Equal to ``model.state_dict()`` for a model without wrappers."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, LoRALayer)}
    own = tuple(f"{n}.{d}." if n else f"{d}." for n in layers for d in ("lora_A", "lora_B"))
    sd = {}
    for k, v in model.state_dict().items():
        if own and k.startswith(own):
            continue
        sd[k.replace(".base_layer.", ".")] = v
    for mod_name, layer in layers.items():
        if layer._base_copy is not None:
            sd[f"{mod_name}.weight" if mod_name else "weight"] = layer._base_copy
        elif layer.merged_names:
            raise InputError("base weights of merged layers are not kept "
                             "(exact_unmerge=False); unmerge first")
    return sd
