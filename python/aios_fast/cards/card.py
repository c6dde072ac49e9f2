"""``LoRACard``: one skill as a set of LoRA factors, in PEFT orientation.

A card holds, per module key, ``A`` of shape ``(r_m, in)`` and ``B`` of shape ``(out, r_m)``;
the update it stands for is ``ΔW = (alpha_m / r_m) · B @ A`` (Hu et al., 2021, "LoRA: Low-Rank
Adaptation of Large Language Models"). ``rank``/``alpha`` are the card's defaults, and
``rank_pattern``/``alpha_pattern`` override them per module, as PEFT's ``LoraConfig`` does
(except that here the keys are exact module keys, not regular expressions).

The card validates itself on construction (and again with :meth:`LoRACard.validate`): every
problem raises :class:`aios_fast.CardFormatError` naming the field, module and value.
"""

from __future__ import annotations

import contextvars
import math
import warnings
from dataclasses import dataclass, field
from itertools import repeat

import numpy as np
import torch

from ..errors import CardFormatError
from . import naming as _naming

__all__ = ["LoRACard", "ALLOWED_DTYPES", "RESERVED_METADATA_PREFIXES", "RESERVED_METADATA_KEYS"]

#: dtypes a card may store; name (as written in files) -> torch dtype
ALLOWED_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
_DTYPE_NAMES = {v: k for k, v in ALLOWED_DTYPES.items()}

#: metadata keys the file format uses itself; free metadata may not shadow them
RESERVED_METADATA_KEYS = frozenset({"lora_name", "lora_rank", "lora_alpha", "target_modules"})
RESERVED_METADATA_PREFIXES = ("aios_",)

# Set by LoRAFormat.load(verify=False): structure is still checked, the O(n) scan for
# non-finite values is skipped (the trusted hot path).
_SKIP_VALUE_SCAN: contextvars.ContextVar[bool] = contextvars.ContextVar("skip_value_scan", default=False)
# Set by the reader while it builds a card from rows it has already checked (two dicts of torch
# tensors over the same distinct, non-empty str keys; allowed dtypes, 2-D positive shapes, A/B
# ranks against rank/rank_pattern): the card then only checks what the reader does not (names,
# targets, patterns, and the value scan). Per-tensor Python checks were most of the load time
# of a small card.
_TRUSTED_LAYOUT: contextvars.ContextVar[bool] = contextvars.ContextVar("trusted_layout", default=False)


def dtype_name(dtype: torch.dtype) -> str:
    """File name of an allowed torch dtype (``torch.float16`` -> ``"float16"``)."""
    try:
        return _DTYPE_NAMES[dtype]
    except KeyError:
        raise CardFormatError(
            f"dtype {dtype} is not allowed in a card; use one of {sorted(ALLOWED_DTYPES)}") from None


@dataclass(eq=False)
class LoRACard:
    """A LoRA skill card (see the module docstring for the maths).

    Args:
        name: the skill's name (non-empty).
        rank: default rank ``r`` (> 0); modules whose A has another row count list it in
            ``rank_pattern``.
        alpha: default ``lora_alpha`` (> 0, finite).
        target_modules: what the card adapts, with PEFT's matching rule: each weight key must
            equal some target or end with ``"." + target``, and each target must match a key
            (full keys, or ArrowEngine-style short names such as ``"attention.query"``).
        weights_A: module key -> A, shape ``(r_m, in_features)``: a torch tensor or a NumPy
            array (ArrowEngine builds cards from NumPy), which is wrapped with
            ``torch.from_numpy`` without copying.
        weights_B: module key -> B, shape ``(out_features, r_m)``, likewise.
        metadata: free string -> string metadata (``description``, ``source``, ...). Keys
            ``lora_name``, ``lora_rank``, ``lora_alpha``, ``target_modules`` and ``aios_*`` are
            reserved for the file format.
        rank_pattern: module key -> rank where it differs from ``rank``.
        alpha_pattern: module key -> alpha where it differs from ``alpha``.
        naming: the scheme of the keys, one of ``aios_fast.cards.naming.SCHEMES``.
        base_fingerprint: ``fingerprint_model()`` of the base model the card was made for.

    Pattern entries equal to the default are dropped, so equal cards compare equal with
    :meth:`equal` however they were built. Tensors are kept as given (no copy); they may be
    read-only views of a mapped file (see ``LoRAFormat.load``).
    """

    name: str
    rank: int
    alpha: float
    target_modules: list[str]
    weights_A: dict[str, torch.Tensor]
    weights_B: dict[str, torch.Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    naming: str = "hf"
    base_fingerprint: str | None = None

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Check every invariant; raise :class:`CardFormatError` naming what is wrong."""
        trusted = _TRUSTED_LAYOUT.get()
        self._validate_header()
        self._validate_keys(trusted)
        self._validate_patterns()
        if trusted:
            if not _SKIP_VALUE_SCAN.get():
                for d in (self.weights_A, self.weights_B):
                    for key, t in d.items():
                        if not _all_finite(t):
                            raise CardFormatError(f"card {self.name!r}, module {key!r}, "
                                                  f"{'A' if d is self.weights_A else 'B'}: contains NaN "
                                                  f"or infinite values")
            return
        for key in self.modules:
            self._validate_module(key)

    def _validate_header(self) -> None:
        if not isinstance(self.name, str) or not self.name:
            raise CardFormatError(f"card name must be a non-empty string, got {self.name!r}")
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank <= 0:
            raise CardFormatError(f"card {self.name!r}: rank must be an int > 0, got {self.rank!r}")
        if (isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float))
                or not math.isfinite(self.alpha) or self.alpha <= 0):
            raise CardFormatError(
                f"card {self.name!r}: alpha must be a finite number > 0, got {self.alpha!r}")
        self.alpha = float(self.alpha)
        if self.naming not in _naming.SCHEMES:
            raise CardFormatError(
                f"card {self.name!r}: naming {self.naming!r} is unknown; use one of {_naming.SCHEMES}")
        if self.base_fingerprint is not None and (
                not isinstance(self.base_fingerprint, str) or not self.base_fingerprint):
            raise CardFormatError(
                f"card {self.name!r}: base_fingerprint must be a non-empty string or None, "
                f"got {self.base_fingerprint!r}")
        if not isinstance(self.metadata, dict):
            raise CardFormatError(f"card {self.name!r}: metadata must be a dict of str -> str")
        for k, v in self.metadata.items():
            if not isinstance(k, str) or not isinstance(v, str):
                raise CardFormatError(
                    f"card {self.name!r}: metadata must map str -> str, got {k!r}: {v!r} "
                    f"({type(k).__name__} -> {type(v).__name__})")
            if k in RESERVED_METADATA_KEYS or k.startswith(RESERVED_METADATA_PREFIXES) or not k:
                raise CardFormatError(
                    f"card {self.name!r}: metadata key {k!r} is reserved for the file format "
                    f"(reserved: {sorted(RESERVED_METADATA_KEYS)} and 'aios_*')")

    def _validate_keys(self, trusted: bool = False) -> None:
        for fld in () if trusted else ("weights_A", "weights_B"):
            d = getattr(self, fld)
            if not isinstance(d, dict):
                raise CardFormatError(f"card {self.name!r}: {fld} must be a dict of str -> Tensor")
            if any(map(isinstance, d.values(), repeat(np.ndarray))):
                # a new dict: the caller's stays as it was
                setattr(self, fld, {k: _from_numpy(v, f"card {self.name!r}, module {k!r}, {fld[-1]}")
                                    if isinstance(v, np.ndarray) else v for k, v in d.items()})
        if not isinstance(self.target_modules, (list, tuple)):
            raise CardFormatError(f"card {self.name!r}: target_modules must be a list of str")
        self.target_modules = list(self.target_modules)
        a = set(self.weights_A)
        b = a if trusted else set(self.weights_B)
        if a != b:
            raise CardFormatError(
                f"card {self.name!r}: A and B keys are not paired: only in weights_A "
                f"{sorted(a - b)}, only in weights_B {sorted(b - a)}")
        if not a:
            raise CardFormatError(f"card {self.name!r}: has no modules")
        # builtins over all keys at once (the loop runs in C); the slow loop only names a bad key
        if ((not trusted and (not all(map(isinstance, a, repeat(str))) or "" in a))
                or any(map(str.endswith, a, repeat(".weight")))):
            for k in a:
                if not isinstance(k, str) or not k or k.endswith(".weight"):
                    raise CardFormatError(
                        f"card {self.name!r}: module key {k!r} must be a non-empty module name "
                        f"without '.weight'")
        t = self.target_modules
        if not t or not all(map(isinstance, t, repeat(str))) or "" in t or len(set(t)) != len(t):
            raise CardFormatError(
                f"card {self.name!r}: target_modules must be distinct non-empty strings, got {t!r}")
        # PEFT's rule: a target names a module key exactly or is a '.'-suffix of it.
        # Checked through each key's suffixes: O(keys x depth), not O(keys x targets).
        targets, used = set(t), set()
        if targets == a:
            return  # every key is its own target (what this package writes): all matched
        unmatched = []
        for k in a:
            parts = k.split(".")
            found = {s for s in (".".join(parts[i:]) for i in range(len(parts))) if s in targets}
            used |= found
            if not found:
                unmatched.append(k)
        unmatched.sort()
        unused = sorted(targets - used)
        if unmatched or unused:
            raise CardFormatError(
                f"card {self.name!r}: target_modules do not match the weight keys: keys no "
                f"target names {unmatched[:5]}, targets naming no key {unused[:5]}")

    def _validate_patterns(self) -> None:
        for fld, default in (("rank_pattern", self.rank), ("alpha_pattern", self.alpha)):
            pattern = getattr(self, fld)
            if not isinstance(pattern, dict):
                raise CardFormatError(f"card {self.name!r}: {fld} must be a dict")
            clean = {}
            for k, v in pattern.items():
                if k not in self.weights_A:
                    raise CardFormatError(
                        f"card {self.name!r}: {fld} names module {k!r}, which has no weights")
                if fld == "rank_pattern":
                    ok = not isinstance(v, bool) and isinstance(v, int) and v > 0
                else:
                    ok = (not isinstance(v, bool) and isinstance(v, (int, float))
                          and math.isfinite(v) and v > 0)
                    v = float(v) if ok else v
                if not ok:
                    raise CardFormatError(
                        f"card {self.name!r}: {fld}[{k!r}] must be "
                        f"{'an int' if fld == 'rank_pattern' else 'a finite number'} > 0, got {v!r}")
                if v != default:
                    clean[k] = v
            setattr(self, fld, clean)

    def _validate_module(self, key: str) -> None:
        a, b = self.weights_A[key], self.weights_B[key]
        r = self.module_rank(key)
        for which, t in (("A", a), ("B", b)):
            where = f"card {self.name!r}, module {key!r}, {which}"
            if not isinstance(t, torch.Tensor):
                raise CardFormatError(f"{where}: expected a torch.Tensor, got {type(t).__name__}")
            if t.dtype not in _DTYPE_NAMES:
                raise CardFormatError(
                    f"{where}: dtype {t.dtype} is not allowed; use one of {sorted(ALLOWED_DTYPES)}")
            if t.dim() != 2 or min(t.shape) <= 0:
                raise CardFormatError(f"{where}: expected a non-empty 2-D tensor, got shape {tuple(t.shape)}")
            if not _SKIP_VALUE_SCAN.get() and not _all_finite(t):
                raise CardFormatError(f"{where}: contains NaN or infinite values")
        if a.shape[0] != r:
            raise CardFormatError(
                f"card {self.name!r}, module {key!r}: A has shape {tuple(a.shape)}, expected "
                f"({r}, in) for rank {r}" + ("" if key in self.rank_pattern else
                                            " (set rank_pattern for a per-module rank)"))
        if b.shape[1] != r:
            raise CardFormatError(
                f"card {self.name!r}, module {key!r}: B has shape {tuple(b.shape)}, expected "
                f"(out, {r}) for rank {r}")

    # ------------------------------------------------------------------ accessors
    @property
    def modules(self) -> list[str]:
        """The module keys, sorted (the row order of a saved card)."""
        return sorted(self.weights_A)

    def module_rank(self, key: str) -> int:
        """Rank of module ``key``: ``rank_pattern[key]`` or the default ``rank``."""
        self._check_key(key)
        return self.rank_pattern.get(key, self.rank)

    def module_alpha(self, key: str) -> float:
        """Alpha of module ``key``: ``alpha_pattern[key]`` or the default ``alpha``."""
        self._check_key(key)
        return self.alpha_pattern.get(key, self.alpha)

    def scaling(self, key: str) -> float:
        """PEFT's ``scaling``: ``module_alpha(key) / module_rank(key)``."""
        return self.module_alpha(key) / self.module_rank(key)

    def delta(self, key: str, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """``ΔW = scaling · B @ A`` for module ``key``, shape ``(out, in)``, computed in ``dtype``."""
        a = self.weights_A[key].to(dtype)
        b = self.weights_B[key].to(dtype)
        return (b @ a) * self.scaling(key)

    def _check_key(self, key: str) -> None:
        if key not in self.weights_A:
            raise KeyError(f"card {self.name!r} has no module {key!r}; it has {self.modules[:5]}"
                           + (" ..." if len(self.weights_A) > 5 else ""))

    @property
    def nbytes(self) -> int:
        """Total bytes of all A and B tensors."""
        return sum(t.numel() * t.element_size()
                   for d in (self.weights_A, self.weights_B) for t in d.values())

    def tensor_checksum(self) -> str:
        """``"sha256:<hex>"`` over what decides the card's effect: for each module in sorted
        order its key, rank, alpha, and A's and B's dtype, shape and bytes (not the name or
        metadata). Equal for a card and its saved-and-loaded copy; the validation gate binds
        its report to it so that a report cannot be carried over to other tensors."""
        import hashlib
        import struct

        h = hashlib.sha256(b"aios-lora-tensors-v1")
        for k in self.modules:
            kb = k.encode()
            h.update(struct.pack("<Q", len(kb)) + kb)
            h.update(struct.pack("<qd", self.module_rank(k), self.module_alpha(k)))
            for t in (self.weights_A[k], self.weights_B[k]):
                dt = dtype_name(t.dtype).encode()
                h.update(struct.pack("<Q", len(dt)) + dt + struct.pack(f"<I{t.dim()}q", t.dim(), *t.shape))
                h.update(t.detach().to("cpu").contiguous().view(torch.uint8).reshape(-1).numpy().data)
        return f"sha256:{h.hexdigest()}"

    def dtypes(self) -> set[str]:
        """The dtype names used by the card's tensors."""
        return {dtype_name(t.dtype) for d in (self.weights_A, self.weights_B) for t in d.values()}

    # ------------------------------------------------------------------ transforms
    def with_naming(self, scheme: str) -> LoRACard:
        """The same card with keys translated to ``scheme`` (``hf`` or ``arrowengine``).

        Tensors are shared, not copied. Raises :class:`CardFormatError` if two keys would
        translate to the same name."""
        if scheme not in _naming.SCHEMES:
            raise CardFormatError(f"naming scheme {scheme!r} is unknown; use one of {_naming.SCHEMES}")
        if scheme == self.naming:
            return self
        conv = {k: _naming.convert(k, self.naming, scheme) for k in self.weights_A}
        if len(set(conv.values())) != len(conv):
            raise CardFormatError(f"card {self.name!r}: keys collide when renamed to {scheme!r}")
        targets = [conv.get(t, t) for t in self.target_modules]
        if any(t not in conv for t in self.target_modules):
            # short (suffix) targets do not translate by name: list the renamed keys instead
            targets = sorted(conv.values())
        return LoRACard(
            name=self.name, rank=self.rank, alpha=self.alpha, target_modules=targets,
            weights_A={conv[k]: v for k, v in self.weights_A.items()},
            weights_B={conv[k]: v for k, v in self.weights_B.items()},
            metadata=dict(self.metadata),
            rank_pattern={conv[k]: v for k, v in self.rank_pattern.items()},
            alpha_pattern={conv[k]: v for k, v in self.alpha_pattern.items()},
            naming=scheme, base_fingerprint=self.base_fingerprint)

    def equal(self, other: LoRACard) -> bool:
        """True if ``other`` holds exactly the same card: header, metadata, patterns, naming,
        fingerprint, and bit-identical tensors of the same dtypes (target order ignored)."""
        if not isinstance(other, LoRACard):
            return False
        head = ("name", "rank", "alpha", "metadata", "rank_pattern", "alpha_pattern",
                "naming", "base_fingerprint")
        if any(getattr(self, f) != getattr(other, f) for f in head):
            return False
        if sorted(self.target_modules) != sorted(other.target_modules):
            return False
        for mine, theirs in ((self.weights_A, other.weights_A), (self.weights_B, other.weights_B)):
            if set(mine) != set(theirs):
                return False
            for k, t in mine.items():
                u = theirs[k]
                if t.dtype != u.dtype or t.shape != u.shape or not torch.equal(t.cpu(), u.cpu()):
                    return False
        return True

    def __repr__(self) -> str:
        ranks = sorted({self.module_rank(k) for k in self.weights_A})
        return (f"LoRACard(name={self.name!r}, modules={len(self.weights_A)}, rank={self.rank}"
                f"{' ' + str(ranks) if len(ranks) > 1 else ''}, alpha={self.alpha}, "
                f"dtypes={sorted(self.dtypes())}, naming={self.naming!r}, nbytes={self.nbytes})")


def _from_numpy(a: np.ndarray, where: str) -> torch.Tensor:
    """``torch.from_numpy(a)`` (shares memory), for the dtypes a card allows."""
    if a.dtype not in (np.float32, np.float16) or not a.dtype.isnative:
        raise CardFormatError(f"{where}: NumPy dtype {a.dtype} is not allowed; use float32 or float16 "
                              f"(native byte order), or a torch tensor for bfloat16")
    if not a.flags.writeable:
        # torch warns that writing to the tensor would be undefined; cards are never written
        # through, and a copy would defeat zero-copy loading of mapped files.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            return torch.from_numpy(a)
    return torch.from_numpy(a)


def _all_finite(t: torch.Tensor) -> bool:
    """True when ``t`` has no NaN or infinity.

    One float32 reduction instead of an elementwise ``isfinite`` (which allocates a bool
    tensor per call): NaN and inf propagate through a sum, so a finite sum proves every value
    finite. Only when the sum is not finite (a real NaN/inf, or finite values that overflow
    float32 when added) is the exact elementwise check run.
    """
    if bool(torch.isfinite(torch.sum(t, dtype=torch.float32))):
        return True
    return bool(torch.isfinite(t).all())

