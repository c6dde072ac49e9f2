"""The dispatch table: every registered implementation of every operation against the
operation's reference on the operation's own cases, plus the selection rules."""

from __future__ import annotations

import pytest
import torch

from aios_fast import backends
from aios_fast.errors import BackendUnavailableError, InputError


def _conformance_params():
    params = []
    for op in backends.operations():
        if op.cases is None:
            continue
        for impl in op.impls:
            if impl.reference:
                continue
            for dev in sorted(impl.devices - {"*"}) or ["cpu"]:
                marks = [pytest.mark.cuda] if dev == "cuda" else []
                for case_id, args, kwargs in op.cases():
                    params.append(pytest.param(op.name, impl.name, dev, case_id, args, kwargs,
                                               id=f"{op.name}-{impl.name}-{dev}-{case_id}",
                                               marks=marks))
    return params


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: _to(v, device) for k, v in obj.items()}
    return obj


@pytest.mark.parametrize("op_name,impl_name,dev,case_id,args,kwargs", _conformance_params())
def test_implementation_matches_reference(op_name, impl_name, dev, case_id, args, kwargs):
    op = next(o for o in backends.operations() if o.name == op_name)
    impl = next(i for i in op.impls if i.name == impl_name)
    ok, why = impl.available()
    if not ok:
        pytest.skip(f"{impl_name} unavailable: {why}")
    expected = op.reference.fn(*_to(args, "cpu"), **kwargs)
    got = impl.fn(*_to(args, dev), **kwargs)
    op.compare(_to(got, "cpu"), expected, case_id)


def test_every_operation_has_one_reference_serving_every_device():
    ops = backends.operations()
    assert ops, "no operation registered"
    for op in ops:
        ref = op.reference
        assert ref.serves("cpu") and ref.serves("cuda"), f"{op.name}: reference must serve any device"
        assert op.cases is not None and op.compare is not None, f"{op.name}: no conformance cases"


def test_env_override_forces_reference_and_unknown_name_is_refused():
    for op in backends.operations():
        ref = op.reference
        impl, why = backends.choose(op.name, "cpu", env={f"AIOS_FAST_IMPL_{op.name.upper()}": ref.name})
        assert impl is ref and "forced" in why
        with pytest.raises(BackendUnavailableError, match="does not serve"):
            backends.choose(op.name, "cpu", env={f"AIOS_FAST_IMPL_{op.name.upper()}": "nope"})


def test_unknown_operation_is_an_input_error():
    with pytest.raises(InputError, match="unknown operation"):
        backends.choose("no_such_op", "cpu")


def test_table_names_a_choice_for_cpu_for_every_operation():
    rows = [r for r in backends.table(("cpu",))]
    assert {r["operation"] for r in rows} == {o.name for o in backends.operations()}
    assert all(r["chosen"] for r in rows)


def test_compiled_core_is_built_and_every_cpp_kernel_is_available():
    """The conformance tests skip an unavailable implementation; this makes sure that a broken
    or missing _C build fails the suite instead of silently skipping the compiled kernels."""
    from aios_fast import _native

    info = _native.build_info()
    assert info["compiled"], info.get("reason")
    for op in backends.operations():
        for impl in op.impls:
            if impl.name == "cpp":
                ok, why = impl.available()
                assert ok, f"{op.name}: cpp implementation unavailable: {why}"


def test_numba_implementations_are_listed_by_info_behind_the_compiled_ones():
    """Issue 13.12: numba registers token_norms and delta_sketch on the CPU, shown by
    ``aios-fast info``, ordered after the compiled cpp kernels and before the torch reference."""
    from aios_fast.cli.info import collect

    rows = {(r["operation"], r["device"]): r for r in collect()["kernels"]}
    for op in ("token_norms", "delta_sketch"):
        names = [i["name"] for i in rows[(op, "cpu")]["implementations"]]
        assert "numba" in names, names
        assert names.index("cpp") < names.index("numba") < names.index("torch"), names
    numba_ok = backends.choose("token_norms", "cpu", force="numba") if _has_numba() else None
    assert numba_ok is None or numba_ok[0].name == "numba"


def _has_numba() -> bool:
    import importlib.util

    return importlib.util.find_spec("numba") is not None
