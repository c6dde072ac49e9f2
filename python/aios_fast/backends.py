"""One dispatch table for the hot operations.

Each operation declares its contract once; implementations (``cuda``, ``cpp``, ``numba``,
``torch``...) register for the devices they serve, with a priority and a line saying why
they are (or are not) the default. The torch/NumPy reference registers last: it is both the
fallback and the test oracle. ``AIOS_FAST_IMPL_<OP>`` (e.g. ``AIOS_FAST_IMPL_TOKEN_NORMS=torch``)
forces one implementation for one operation, ``AIOS_FAST_IMPL`` for every operation that has it.
"""

from __future__ import annotations

import importlib
import os
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from .errors import BackendUnavailableError, InputError

__all__ = [
    "Implementation",
    "Operation",
    "define",
    "register",
    "operations",
    "implementations",
    "choose",
    "call",
    "table",
]

# Modules that register implementations; imported on first use of the table.
_KERNEL_MODULES = (
    "aios_fast.kernels.norms",
    "aios_fast.kernels.svd",
    "aios_fast.kernels.svd_scipy",
    "aios_fast.kernels.numba_kernels",
    "aios_fast.kernels.route",
)

Availability = Callable[[], "tuple[bool, str]"]


def _always() -> tuple[bool, str]:
    return True, "pure Python/torch, always available"


@dataclass(frozen=True)
class Implementation:
    """One registered implementation of an operation."""

    op: str
    name: str
    devices: frozenset[str]  # device types ("cpu", "cuda", ...) or {"*"} for any
    fn: Callable[..., Any]
    priority: int  # lower is tried first
    why: str  # why this is (or is not) the default, shown by `aios-fast info`
    default: bool = True  # False: registered and tested, but only used when forced
    reference: bool = False
    availability: Availability = _always

    def serves(self, device_type: str) -> bool:
        return "*" in self.devices or device_type in self.devices

    def available(self) -> tuple[bool, str]:
        return self.availability()


Case = "tuple[str, tuple[Any, ...], dict[str, Any]]"  # (readable id, args, kwargs)


@dataclass
class Operation:
    """A hot operation's contract and its implementations.

    ``cases()`` yields ``(id, args, kwargs)`` inputs (args may hold CPU tensors; the test moves
    them to each implementation's device) and ``compare(got, expected, case_id)`` asserts that
    an implementation's result matches the reference's within the operation's tolerance. The
    test suite runs every implementation on every case against the reference this way.
    """

    name: str
    doc: str
    impls: list[Implementation] = field(default_factory=list)
    cases: Callable[[], Any] | None = None
    compare: Callable[[Any, Any, str], None] | None = None

    @property
    def reference(self) -> Implementation:
        refs = [i for i in self.impls if i.reference]
        if len(refs) != 1:
            raise RuntimeError(f"operation {self.name!r} must have exactly one reference, has {len(refs)}")
        return refs[0]


_OPS: dict[str, Operation] = {}
_loaded = False


def _ensure_loaded() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for mod in _KERNEL_MODULES:
        importlib.import_module(mod)


def define(name: str, doc: str, *, cases: Callable[[], Any] | None = None,
           compare: Callable[[Any, Any, str], None] | None = None) -> Operation:
    """Declare an operation's contract (idempotent), with its conformance cases."""
    op = _OPS.get(name)
    if op is None:
        op = _OPS[name] = Operation(name, doc, cases=cases, compare=compare)
    return op


def register(
    op: str,
    name: str,
    *,
    devices: tuple[str, ...] | frozenset[str],
    priority: int,
    why: str,
    default: bool = True,
    reference: bool = False,
    available: Availability | None = None,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorator registering ``fn`` as implementation ``name`` of operation ``op``."""
    if op not in _OPS:
        raise KeyError(f"operation {op!r} must be declared with backends.define() first")

    def deco(fn: Callable[..., Any]) -> Callable[..., Any]:
        impl = Implementation(op, name, frozenset(devices), fn, priority, why, default,
                              reference, available or _always)
        impls = [i for i in _OPS[op].impls if i.name != name] + [impl]
        _OPS[op].impls = sorted(impls, key=lambda i: i.priority)
        return fn

    return deco


def operations() -> list[Operation]:
    """Every declared operation, with its implementations sorted by priority."""
    _ensure_loaded()
    return list(_OPS.values())


def _op(name: str) -> Operation:
    _ensure_loaded()
    try:
        return _OPS[name]
    except KeyError:
        raise InputError(f"unknown operation {name!r}; known: {sorted(_OPS)}") from None


def implementations(op: str, device_type: str | None = None, *, only_available: bool = True
                    ) -> list[Implementation]:
    """Implementations of ``op`` (for ``device_type`` if given), best first."""
    out = []
    for impl in _op(op).impls:
        if device_type is not None and not impl.serves(device_type):
            continue
        if only_available and not impl.available()[0]:
            continue
        out.append(impl)
    return out


def _override(op: str, env: Mapping[str, str]) -> tuple[str | None, str]:
    key = f"AIOS_FAST_IMPL_{op.upper()}"
    if env.get(key):
        return env[key].strip().lower(), key
    if env.get("AIOS_FAST_IMPL"):
        return env["AIOS_FAST_IMPL"].strip().lower(), "AIOS_FAST_IMPL"
    return None, ""


def choose(op: str, device_type: str, *, force: str | None = None,
           env: Mapping[str, str] | None = None) -> tuple[Implementation, str]:
    """Pick the implementation of ``op`` for ``device_type`` and say why.

    ``force`` (or the environment override) names an implementation; forcing one that is
    not built or cannot serve this device raises BackendUnavailableError.
    """
    env = os.environ if env is None else env
    operation = _op(op)
    wanted, source = (force, "argument") if force else _override(op, env)
    candidates = [i for i in operation.impls if i.serves(device_type)]
    if wanted:
        for impl in candidates:
            if impl.name == wanted:
                ok, reason = impl.available()
                if not ok:
                    raise BackendUnavailableError(
                        f"{op}: implementation {wanted!r} forced by {source} is unavailable: {reason}")
                return impl, f"forced by {source}"
        if source == "AIOS_FAST_IMPL" and not any(i.name == wanted for i in operation.impls):
            pass  # a global override only applies to operations that have that implementation
        else:
            names = sorted({i.name for i in candidates})
            raise BackendUnavailableError(
                f"{op}: implementation {wanted!r} forced by {source} does not serve device "
                f"{device_type!r}; choose one of {names}")
    skipped = []
    for impl in candidates:
        ok, reason = impl.available()
        if not ok:
            skipped.append(f"{impl.name}: {reason}")
            continue
        if not impl.default:
            skipped.append(f"{impl.name}: {impl.why}")
            continue
        why = impl.why if not skipped else f"{impl.why} (skipped {'; '.join(skipped)})"
        return impl, why
    raise BackendUnavailableError(
        f"{op}: no implementation serves device {device_type!r}; "
        f"registered: {[i.name for i in operation.impls]}")


def call(op: str, device_type: str, *args: Any, force: str | None = None, **kwargs: Any) -> Any:
    """Run ``op`` with the implementation chosen for ``device_type``."""
    impl, _ = choose(op, device_type, force=force)
    return impl.fn(*args, **kwargs)


def table(device_types: tuple[str, ...] = ("cpu", "cuda")) -> list[dict[str, Any]]:
    """Rows for `aios-fast info`: per operation and device, every implementation and the choice."""
    rows = []
    for operation in operations():
        for dev in device_types:
            impls = [i for i in operation.impls if i.serves(dev)]
            if not impls:
                continue
            try:
                chosen, why = choose(operation.name, dev)
                chosen_name = chosen.name
            except BackendUnavailableError as exc:
                chosen_name, why = None, str(exc)
            rows.append({
                "operation": operation.name,
                "device": dev,
                "chosen": chosen_name,
                "why": why,
                "implementations": [
                    {"name": i.name, "available": i.available()[0], "reason": i.available()[1],
                     "default": i.default, "reference": i.reference}
                    for i in impls
                ],
            })
    return rows
