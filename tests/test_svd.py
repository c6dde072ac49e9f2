"""truncated_svd against LAPACK (numpy.linalg.svd): the accuracy contract of its docstring,
the fused (tuned, base) path, the fixed-precision mode, and the compiled kernels."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from aios_fast import backends
from aios_fast.errors import InputError
from aios_fast.linalg import truncated_svd


def planted(m, n, spectrum, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = spectrum.numel()
    U = torch.linalg.qr(torch.randn(m, r, generator=g, dtype=torch.float64))[0]
    V = torch.linalg.qr(torch.randn(n, r, generator=g, dtype=torch.float64))[0]
    return ((U * spectrum) @ V.T).to(dtype)


SPECTRA = {
    "decay0.8": lambda r: 0.8 ** torch.arange(r, dtype=torch.float64),
    "flat-sqrt": lambda r: (1 + torch.arange(r, dtype=torch.float64)) ** -0.5,
}
SHAPES = [pytest.param(300, 200, id="tall300x200"), pytest.param(120, 350, id="wide120x350"),
          pytest.param(256, 256, id="square256")]
# Per-dtype tolerance on σ for decaying spectra (relative to the SVD of the *decoded* input).
SIGMA_TOL = {"decay0.8": 1e-3, "flat-sqrt": 5e-2}
RECON_TOL = {"decay0.8": 1e-3, "flat-sqrt": 5e-2}


def lapack(M: torch.Tensor):
    return np.linalg.svd(M.double().numpy(), full_matrices=False)


@pytest.mark.parametrize("method", ["krylov", "subspace"])
@pytest.mark.parametrize("spectrum", list(SPECTRA), ids=list(SPECTRA))
@pytest.mark.parametrize("m,n", SHAPES)
@pytest.mark.parametrize("k", [8, 24], ids=["k8", "k24"])
def test_sigma_and_reconstruction_match_lapack(spectrum, m, n, k, method):
    A = planted(m, n, SPECTRA[spectrum](min(m, n)), dtype=torch.float32)
    U, S, Vh = truncated_svd(A, k, method=method)
    _, s, _ = lapack(A)
    rel = np.abs(S.double().numpy() - s[:k]) / s[:k]
    assert rel.max() <= SIGMA_TOL[spectrum], f"max σ relative error {rel.max():.2e}"
    opt = np.sqrt((s[k:] ** 2).sum())
    err = float(torch.linalg.norm(A.double() - (U * S).double() @ Vh.double()))
    assert err <= (1 + RECON_TOL[spectrum]) * opt, f"reconstruction {err:.4e} vs optimal {opt:.4e}"
    eye = torch.eye(k)
    torch.testing.assert_close(U.T @ U, eye, atol=1e-5, rtol=0)
    torch.testing.assert_close(Vh @ Vh.T, eye, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=["f16", "bf16", "f32"])
@pytest.mark.parametrize("impl", ["cpp", "numpy", "torch"])
def test_pair_of_half_inputs_matches_lapack_on_decoded_delta(dtype, impl):
    g = torch.Generator().manual_seed(1)
    base = (0.05 * torch.randn(320, 192, generator=g)).to(dtype)
    # σ₁₀ ≈ 0.04 stays far above the rounding noise of the half inputs (~1e-4 per element)
    delta = planted(320, 192, 0.7 ** torch.arange(192, dtype=torch.float64), seed=2, dtype=torch.float32)
    tuned = (base.float() + delta).to(dtype)
    decoded = tuned.double() - base.double()
    res = truncated_svd((tuned, base), 10, impl=impl, materialize=False)
    _, s, _ = lapack(decoded)
    assert np.abs(res.S.double().numpy() - s[:10]).max() / s[0] <= 1e-4
    assert np.max(np.abs(res.S.double().numpy() - s[:10]) / s[:10]) <= 1e-3
    assert res.frob_sq == pytest.approx(float((decoded ** 2).sum()), rel=1e-5)
    assert res.energy_fraction == pytest.approx(float((s[:10] ** 2).sum() / (s ** 2).sum()), rel=1e-4)


def test_materialize_streamed_and_cached_agree():
    g = torch.Generator().manual_seed(5)
    base = torch.randn(200, 150, generator=g).bfloat16()
    tuned = (base.float() + 0.1 * torch.randn(200, 150, generator=g)).bfloat16()
    a = truncated_svd((tuned, base), 6, materialize=False)
    b = truncated_svd((tuned, base), 6, materialize=True)
    torch.testing.assert_close(a.S, b.S, rtol=1e-5, atol=1e-6)
    assert a.frob_sq == pytest.approx(b.frob_sq, rel=1e-6)


@pytest.mark.parametrize("q", [1, 2, 3])
@pytest.mark.parametrize("k", [8, 24])
def test_krylov_is_never_less_accurate_than_subspace_iteration_from_the_same_start(k, q):
    """Same seed (Ω), ℓ and q: the Krylov basis contains (MMᵀ)^q MΩ, so every Ritz value is at
    least the subspace one (both are lower bounds of the true σᵢ) and the residual is no larger."""
    A = planted(400, 300, SPECTRA["flat-sqrt"](300), seed=4, dtype=torch.float64)
    s = lapack(A)[1]
    kw = dict(oversample=8, power_iters=q, seed=11)
    kry = truncated_svd(A, k, method="krylov", **kw)
    sub = truncated_svd(A, k, method="subspace", **kw)
    assert np.all(kry.S.numpy() >= sub.S.numpy() * (1 - 1e-12))
    assert np.all(kry.S.numpy() <= s[:k] * (1 + 1e-12))
    res = [float(torch.linalg.norm(A - (r.U * r.S) @ r.Vh)) for r in (kry, sub)]
    assert res[0] <= res[1] * (1 + 1e-12)
    # ... and on a flat spectrum clearly better, the more so the deeper (measured 0.54-0.67×
    # the subspace σ error at q = 1, ≤ 0.11× at q ≥ 2): the gain is the point of the method
    gain = np.abs(kry.S.numpy() - s[:k]).max() / np.abs(sub.S.numpy() - s[:k]).max()
    assert gain < (0.8 if q == 1 else 0.2), f"Krylov σ error {gain:.2f}× subspace"


def test_krylov_space_that_fills_the_column_space_stays_orthonormal():
    # ℓ = 88 and q = 2 would ask for 264 directions of a 120-dimensional column space: the
    # iteration must stop adding directions once the space is invariant, not add noise.
    A = planted(120, 350, SPECTRA["flat-sqrt"](120), dtype=torch.float32)
    res = truncated_svd(A, 64, power_iters=2)
    assert res.sketch_S.numel() == 120
    np.testing.assert_allclose(res.S.double().numpy(), lapack(A)[1][:64], rtol=1e-4)
    torch.testing.assert_close(res.U.T @ res.U, torch.eye(64), atol=1e-5, rtol=0)
    torch.testing.assert_close(res.Vh @ res.Vh.T, torch.eye(64), atol=1e-5, rtol=0)


def test_block_width_is_rounded_up_to_a_multiple_of_8():
    # a flat spectrum, so that no Krylov direction is dropped as float32 noise
    A = planted(300, 200, SPECTRA["flat-sqrt"](200), dtype=torch.float32)
    # k + p = 16 + 10 = 26 → 32 columns per block; one Krylov step keeps two blocks
    assert truncated_svd(A, 16, oversample=10, power_iters=1).sketch_S.numel() == 64
    assert truncated_svd(A, 16, oversample=10, method="subspace").sketch_S.numel() == 32
    assert truncated_svd(A, 16).sketch_S.numel() == 2 * 40  # default p = 24 for krylov
    assert truncated_svd(A, 190, oversample=10, method="subspace").sketch_S.numel() == 200  # capped


@pytest.mark.parametrize("method", ["krylov", "subspace"])
def test_rank_deficient_matrix(method):
    spec = torch.tensor([5.0, 3.0, 2.0, 1.0, 0.5], dtype=torch.float64)
    A = planted(200, 100, spec, dtype=torch.float32)
    res = truncated_svd(A, 12, method=method)
    np.testing.assert_allclose(res.S[:5].double().numpy(), spec.numpy(), rtol=1e-4)
    assert float(res.S[5:].abs().max()) <= 1e-5 * float(spec[0])
    torch.testing.assert_close(res.U.T @ res.U, torch.eye(12), atol=1e-4, rtol=0)
    rec = (res.U * res.S) @ res.Vh
    assert float(torch.linalg.norm(rec - A)) <= 1e-4 * float(torch.linalg.norm(A))


def test_float64_input_is_computed_in_float64():
    A = planted(150, 90, 0.5 ** torch.arange(90, dtype=torch.float64))
    res = truncated_svd(A, 5)
    assert res.S.dtype == torch.float64
    np.testing.assert_allclose(res.S.numpy(), lapack(A)[1][:5], rtol=1e-10)


@pytest.mark.parametrize("energy", [0.5, 0.9, 0.99])
def test_fixed_precision_mode_returns_smallest_rank_reaching_energy(energy):
    A = planted(300, 260, 0.9 ** torch.arange(260, dtype=torch.float64), dtype=torch.float32)
    s = lapack(A)[1]
    frac = np.cumsum(s ** 2) / (s ** 2).sum()
    k_opt = int(np.searchsorted(frac, energy) + 1)
    res = truncated_svd(A, energy=energy, block_size=8)
    assert res.rank == k_opt, f"rank {res.rank} vs optimal {k_opt}"
    assert res.energy_fraction >= energy * (1 - 1e-6)
    assert res.frob_sq == pytest.approx(float((s ** 2).sum()), rel=1e-5)
    # tol is the same thing as a residual bound
    t = truncated_svd(A, tol=float(np.sqrt(1 - energy)), block_size=8)
    assert t.rank == k_opt


def test_fixed_precision_mode_respects_max_rank_and_zero_matrix():
    A = planted(100, 80, torch.ones(80, dtype=torch.float64), dtype=torch.float32)
    assert truncated_svd(A, energy=0.99, max_rank=10).rank == 10
    z = torch.zeros(30, 20)
    assert truncated_svd((z, z.clone()), energy=0.9).rank == 0


@pytest.mark.parametrize("bad,match", [
    (dict(rank=21), r"rank 21 exceeds min\(m, n\) = 20"),
    (dict(rank=0), "positive integer"),
    (dict(rank=3, power_iters=-1), "power_iters"),
    (dict(rank=3, oversample=-2), "oversample"),
    (dict(energy=1.5), r"energy must be in \(0, 1\]"),
    (dict(), "pass rank=k"),
    (dict(rank=3, method="lanczos"), "method must be one of 'krylov', 'subspace', got 'lanczos'"),
    (dict(rank=3, oversample=True), "oversample"),
], ids=["rank-too-big", "rank-zero", "neg-iters", "neg-oversample", "energy>1", "no-rank", "bad-method",
        "bool-oversample"])
def test_bad_arguments_raise_input_error(bad, match):
    with pytest.raises(InputError, match=match):
        truncated_svd(torch.randn(30, 20), **bad)


def test_bad_inputs_raise_input_error():
    with pytest.raises(InputError, match="differ in shape"):
        truncated_svd((torch.randn(4, 5), torch.randn(5, 4)), 2)
    with pytest.raises(InputError, match="2-D"):
        truncated_svd(torch.randn(3, 4, 5), 2)
    with pytest.raises(InputError, match="dtype"):
        truncated_svd(torch.ones(4, 4, dtype=torch.int32), 2)
    x = torch.randn(10, 10)
    x[3, 3] = float("nan")
    with pytest.raises(InputError, match="NaN or Inf"):
        truncated_svd((x, torch.zeros(10, 10)), 2)


def test_seed_makes_results_reproducible_and_numpy_is_accepted():
    A = np.random.default_rng(0).standard_normal((60, 40)).astype(np.float32)
    a = truncated_svd(A, 4, seed=3)
    b = truncated_svd(torch.from_numpy(A), 4, seed=3)
    torch.testing.assert_close(a.U, b.U)


def test_cpp_sketch_is_the_cpu_default_when_built():
    impl, why = backends.choose("delta_sketch", "cpu")
    from aios_fast import _native
    assert impl.name == ("cpp" if _native.has("delta_tile") else "torch"), why


@pytest.mark.cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["f32", "bf16", "f16"])
def test_cuda_matches_cpu(dtype):
    g = torch.Generator().manual_seed(9)
    base = torch.randn(512, 384, generator=g).to(dtype)
    tuned = (base.float() + planted(512, 384, 0.05 * 0.8 ** torch.arange(384, dtype=torch.float64),
                                    dtype=torch.float32)).to(dtype)
    cpu = truncated_svd((tuned, base), 16, materialize=False)
    for mat in (False, True):
        gpu = truncated_svd((tuned.cuda(), base.cuda()), 16, materialize=mat, impl="cuda")
        assert gpu.U.is_cuda
        torch.testing.assert_close(gpu.S.cpu(), cpu.S, rtol=1e-3, atol=1e-6)
        assert gpu.frob_sq == pytest.approx(cpu.frob_sq, rel=1e-5)


@pytest.mark.cuda
def test_cuda_sketch_runs_on_the_operands_device():
    """Issue 13.5: with another GPU current, delta_sketch on the last GPU must launch there
    (the result equals the CPU reference) and operands on different devices are refused."""
    from aios_fast.errors import InputError
    from aios_fast import _native
    from aios_fast.kernels.svd import _sketch_cuda, _sketch_torch

    if not _native.has("delta_tile_cuda"):
        pytest.skip("aios_fast._C was built without CUDA")
    dev = torch.device("cuda", torch.cuda.device_count() - 1)
    g = torch.Generator().manual_seed(3)
    T, B = torch.randn(300, 129, generator=g).half(), torch.randn(300, 129, generator=g).half()
    X, Y = torch.randn(129, 5, generator=g), torch.randn(300, 5, generator=g)
    want = _sketch_torch(T, B, X, Y)
    with torch.cuda.device(0):
        got = _sketch_cuda(T.to(dev), B.to(dev), X.to(dev), Y.to(dev), block_rows=64)
    assert got[0].device == dev
    torch.testing.assert_close(got[0].cpu(), want[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1].cpu(), want[1], rtol=1e-4, atol=1e-4)
    assert got[2] == pytest.approx(want[2], rel=1e-5)
    with pytest.raises(InputError, match="X is on cpu but T is on cuda"):
        _sketch_cuda(T.to(dev), B.to(dev), X, None)


def test_single_float32_matrix_agrees_with_the_pair_path(monkeypatch):
    """A float32 matrix is multiplied where it lies (no delta_sketch pass, no scratch copy); the
    result equals that of the pair (M, 0), which goes through the fused sketch and the copy."""
    from aios_fast import linalg

    seen = []
    call, take = linalg.backends.call, linalg.SCRATCH.take
    monkeypatch.setattr(linalg.backends, "call", lambda op, *a, **kw: (seen.append(op), call(op, *a, **kw))[1])
    monkeypatch.setattr(linalg.SCRATCH, "take", lambda *a, **kw: (seen.append("copy"), take(*a, **kw))[1])
    A = planted(300, 200, 0.8 ** torch.arange(200, dtype=torch.float64), seed=6, dtype=torch.float32)
    one = truncated_svd(A, 12, seed=2)
    assert "delta_sketch" not in seen and "copy" not in seen, seen
    pair = truncated_svd((A, torch.zeros_like(A)), 12, seed=2)
    assert "delta_sketch" in seen and "copy" in seen, seen
    torch.testing.assert_close(one.S, pair.S, rtol=1e-5, atol=0)
    assert one.frob_sq == pytest.approx(pair.frob_sq, rel=1e-6)
    torch.testing.assert_close((one.U * one.S) @ one.Vh, (pair.U * pair.S) @ pair.Vh, rtol=0, atol=1e-5)


def test_single_matrix_frobenius_norm_is_summed_in_float64():
    # One float32 reduction over all 2048² squares is off by ~2e-4 here (mean 0.5 keeps the
    # squares from cancelling); the partial norms summed in float64 are not.
    A = torch.randn(2048, 2048, generator=torch.Generator().manual_seed(8)) + 0.5
    res = truncated_svd(A, 4)
    assert res.frob_sq == pytest.approx(float((A.double() ** 2).sum()), rel=1e-6)


def test_single_matrix_views_and_large_magnitudes():
    base = planted(400, 600, 0.85 ** torch.arange(400, dtype=torch.float64), seed=3, dtype=torch.float32)
    for view in (base[::2, ::3], base.T):  # strided (copied once) and column-major (used as is)
        res = truncated_svd(view, 6)
        np.testing.assert_allclose(res.S.double().numpy(), lapack(view)[1][:6], rtol=1e-4)
        assert res.frob_sq == pytest.approx(float((view.double() ** 2).sum()), rel=1e-6)
    # squares beyond float32's range: ‖M‖²_F is still finite (float64 fallback), σ still right
    big = planted(120, 80, 1e21 * 0.7 ** torch.arange(80, dtype=torch.float64), seed=5, dtype=torch.float32)
    assert not torch.isfinite(torch.linalg.vector_norm(big)), "the case must overflow a float32 sum"
    for p in (8, 16, 24):  # the Krylov step's M·(MᵀQ) ~ σ₁² overflows float32 unless scaled
        res = truncated_svd(big, 5, oversample=p)
        np.testing.assert_allclose(res.S.double().numpy(), lapack(big)[1][:5], rtol=1e-4)
        assert res.frob_sq == pytest.approx(float((big.double() ** 2).sum()), rel=1e-6)
        assert res.sketch_S.numel() > -(-(5 + p) // 8) * 8, "the Krylov step was cut short"


@pytest.mark.parametrize("bad", [float("nan"), float("inf")], ids=["nan", "inf"])
def test_single_matrix_with_nan_or_inf_raises_input_error(bad):
    x = torch.randn(40, 30)
    x[5, 7] = bad
    with pytest.raises(InputError, match="NaN or Inf"):
        truncated_svd(x, 3)


def test_new_krylov_directions_direct_and_rank_revealing_paths():
    """A well-conditioned new block is orthonormalised directly (every direction kept); a block
    with a direction whose share outside the earlier basis is rounding-level goes through the
    rank-revealing path, which drops it. Both come back orthonormal and orthogonal to Qprev."""
    from aios_fast.linalg import _new_directions

    g = torch.Generator().manual_seed(5)
    basis = torch.linalg.qr(torch.randn(500, 13, generator=g))[0]
    Qprev, a, b = basis[:, :10], basis[:, 10], basis[:, 11]

    def check(Q, width):
        assert Q.shape == (500, width)
        torch.testing.assert_close(Q.T @ Q, torch.eye(width), rtol=0, atol=1e-6)
        assert float((Qprev.T @ Q).abs().max()) < 1e-6

    check(_new_directions(Qprev, torch.randn(500, 8, generator=g)), 8)
    # columns 1 and 3 are new (a, b); column 2 is Qprev's own direction plus 1e-6 of b
    K = torch.stack([Qprev[:, 0] + a, Qprev[:, 1] + 1e-6 * b, Qprev[:, 2] + 0.5 * b], 1)
    Q = _new_directions(Qprev, K)
    check(Q, 2)
    torch.testing.assert_close(Q @ Q.T, torch.outer(a, a) + torch.outer(b, b), rtol=0, atol=1e-5)
    assert _new_directions(Qprev, Qprev[:, :4] @ torch.randn(4, 3, generator=g)) is None
