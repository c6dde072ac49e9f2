"""The token_norms kernel: every implementation against a float64 NumPy oracle and the torch
reference, odd shapes, empty input, masks, accumulation across calls, and input validation."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from aios_fast import backends
from aios_fast.errors import InputError
from aios_fast.kernels.norms import TOLERANCE, NormState, token_norm_stats

DTYPES = [pytest.param(torch.float32, id="float32"), pytest.param(torch.float16, id="float16"),
          pytest.param(torch.bfloat16, id="bfloat16")]
SHAPES = [pytest.param(s, id=f"{s[0]}x{s[1]}") for s in
          [(1, 1), (7, 13), (257, 384), (0, 384), (3, 0), (100, 1536), (31, 1000), (2, 4099)]]
IMPLS = [pytest.param("cpp", "cpu", id="cpp-cpu"), pytest.param("torch", "cpu", id="torch-cpu"),
         pytest.param("cuda", "cuda", id="cuda-cuda", marks=pytest.mark.cuda),
         pytest.param("torch", "cuda", id="torch-cuda", marks=pytest.mark.cuda)]


def oracle(x: torch.Tensor, mask: torch.Tensor | None = None) -> tuple[dict[str, float], np.ndarray]:
    """Float64 NumPy computation of the contract, independent of every implementation."""
    a = x.detach().cpu().float().numpy().astype(np.float64)
    if mask is not None:
        a = a[mask.cpu().numpy()]
    tok = (a * a).sum(axis=1)
    norms = np.sqrt(tok)
    stats = {"count": float(a.shape[0]), "sum": float(norms.sum()), "sumsq": float(tok.sum()),
             "max": float(norms.max()) if norms.size else 0.0}
    return stats, (a * a).sum(axis=0)


def assert_matches(state: NormState, stats: dict[str, float], channel: np.ndarray, dtype: torch.dtype) -> None:
    tol = TOLERANCE[dtype]
    got = state.to_dict()
    for k, v in stats.items():
        assert math.isclose(got[k], v, rel_tol=tol["rtol"], abs_tol=tol["atol"]), (k, got[k], v)
    assert got["raw_l2"] == pytest.approx(math.sqrt(stats["sumsq"]), rel=tol["rtol"], abs=tol["atol"])
    np.testing.assert_allclose(state.channel_numpy(), channel, **tol)


def _available(impl: str) -> None:
    i = next(i for i in backends.implementations("token_norms", only_available=False) if i.name == impl)
    ok, why = i.available()
    if not ok:
        pytest.skip(f"{impl} unavailable: {why}")


@pytest.mark.parametrize("impl,dev", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_matches_float64_oracle(impl, dev, dtype, shape):
    _available(impl)
    g = torch.Generator().manual_seed(shape[0] * 7919 + shape[1])
    x = (torch.randn(*shape, generator=g) * 3).to(dtype).to(dev)
    state = token_norm_stats(x, force=impl)
    assert state.device.type == dev
    assert_matches(state, *oracle(x), dtype)


@pytest.mark.parametrize("impl,dev", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_accumulates_across_calls_with_masks(impl, dev, dtype):
    _available(impl)
    g = torch.Generator().manual_seed(7)
    chunks = [(torch.randn(n, 385, generator=g) * 2).to(dtype).to(dev) for n in (5, 64, 1, 300)]
    masks = [(torch.rand(c.shape[0], generator=g) > 0.4).to(dev) for c in chunks]
    masks[2] = torch.zeros(1, dtype=torch.bool, device=dev)  # a fully masked call adds nothing
    state = NormState.empty(385, dev)
    for c, m in zip(chunks, masks):
        assert token_norm_stats(c, state, mask=m, force=impl) is state
    x, mask = torch.cat(chunks), torch.cat(masks)
    assert_matches(state, *oracle(x, mask), dtype)
    assert state.to_dict()["count"] == float(mask.sum())


@pytest.mark.parametrize("impl,dev", IMPLS)
def test_half_special_values(impl, dev):
    """Subnormals, zeros, the largest finite half and negative values convert exactly."""
    _available(impl)
    vals = [0.0, -0.0, 6.0e-8, -6.0e-8, 1.0e-5, 65504.0, -65504.0, 1.5, -2.25, 3.0e-6, 1e-7]
    x = torch.tensor([vals * 3], dtype=torch.float16).repeat(4, 1).to(dev)
    assert_matches(token_norm_stats(x, force=impl), *oracle(x), torch.float16)


def test_large_input_takes_the_threaded_path():
    """Inputs above 2 x 8M elements split over OpenMP threads (per-thread partials, merged once)."""
    g = torch.Generator().manual_seed(11)
    x = torch.randn(4100, 4099, generator=g).to(torch.bfloat16)
    mask = torch.rand(4100, generator=g) > 0.2
    assert_matches(token_norm_stats(x, mask=mask, force="cpp"), *oracle(x, mask), torch.bfloat16)


def test_cpp_is_the_cpu_default():
    impl, why = backends.choose("token_norms", "cpu")
    assert impl.name == "cpp", why


def test_dispatched_default_matches_reference_on_model_sized_input():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(8 * 128, 1536, generator=g)
    a = token_norm_stats(x)
    b = token_norm_stats(x, force="torch")
    assert_matches(a, {k: b.to_dict()[k] for k in ("count", "sum", "sumsq", "max")}, b.channel_numpy(),
                   torch.float32)


# ---------------------------------------------------------------- validation

@pytest.mark.parametrize("dtype", [torch.float64, torch.int32, torch.uint8], ids=str)
def test_wrong_dtype_is_refused(dtype):
    with pytest.raises(InputError, match="float32, float16, bfloat16"):
        token_norm_stats(torch.zeros(4, 8, dtype=dtype))


def test_non_contiguous_is_refused_with_fix():
    with pytest.raises(InputError, match=r"call \.contiguous\(\)"):
        token_norm_stats(torch.randn(8, 16).t())


@pytest.mark.parametrize("shape", [(16,), (2, 3, 4), ()], ids=["1d", "3d", "0d"])
def test_wrong_ndim_is_refused(shape):
    with pytest.raises(InputError, match=r"2-D \(tokens, features\)"):
        token_norm_stats(torch.zeros(shape))


def test_state_on_another_device_is_refused():
    state = NormState.empty(16, "meta")
    with pytest.raises(InputError, match="state buffers are on meta but x is on cpu"):
        token_norm_stats(torch.randn(4, 16), state)


@pytest.mark.cuda
def test_cuda_input_with_cpu_state_is_refused():
    with pytest.raises(InputError, match="state buffers are on cpu"):
        token_norm_stats(torch.randn(4, 16, device="cuda"), NormState.empty(16, "cpu"))


def test_feature_mismatch_and_bad_mask_are_refused():
    x = torch.randn(4, 16)
    with pytest.raises(InputError, match="state has 8 features but x has 16"):
        token_norm_stats(x, NormState.empty(8))
    with pytest.raises(InputError, match="mask must be a bool tensor"):
        token_norm_stats(x, mask=torch.ones(4, dtype=torch.int64))
    with pytest.raises(InputError, match=r"expected \(4,\)"):
        token_norm_stats(x, mask=torch.ones(5, dtype=torch.bool))
    with pytest.raises(InputError, match="must be a torch.Tensor"):
        token_norm_stats(np.zeros((4, 16), np.float32))


@pytest.mark.cuda
def test_cuda_launch_is_asynchronous_on_current_stream():
    """Work goes on the caller's stream: results appear after that stream is synchronised."""
    x = torch.randn(4096, 1024, device="cuda")
    s = torch.cuda.Stream()
    state = NormState.empty(1024, "cuda")
    s.wait_stream(torch.cuda.current_stream())  # x and state were made on the default stream
    with torch.cuda.stream(s):
        for _ in range(3):
            token_norm_stats(x, state, force="cuda")
    s.synchronize()
    stats, ch = oracle(x)
    assert state.to_dict()["count"] == 3 * 4096
    np.testing.assert_allclose(state.channel_numpy(), 3 * ch, rtol=1e-4)


def test_portable_cpp_path_without_avx2():
    """AIOS_FAST_NO_AVX2=1 makes the C++ kernel take its portable path (scalar half conversion
    by bits); it must agree with the oracle too, run in a fresh process since the choice is cached."""
    import os
    import subprocess
    import sys

    code = (
        "import torch, numpy as np\n"
        "from tests.test_norms import oracle, assert_matches\n"
        "from aios_fast.kernels.norms import token_norm_stats\n"
        "g = torch.Generator().manual_seed(0)\n"
        "vals = [0.0, -0.0, 6.0e-8, 1.0e-5, 65504.0, -1.5, 3.0e-6]\n"
        "cases = [torch.tensor([vals * 5], dtype=torch.float16).repeat(3, 1)]\n"
        "for dt in (torch.float32, torch.float16, torch.bfloat16):\n"
        "    for shape in ((1, 1), (7, 13), (257, 384), (31, 1000)):\n"
        "        cases.append((torch.randn(*shape, generator=g) * 3).to(dt))\n"
        "for x in cases:\n"
        "    m = torch.rand(x.shape[0], generator=g) > 0.3\n"
        "    assert_matches(token_norm_stats(x, mask=m, force='cpp'), *oracle(x, m), x.dtype)\n"
        "print('ok', len(cases))\n")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, AIOS_FAST_NO_AVX2="1")
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == "ok 13"
