"""Where the GPU time goes: torch.profiler tables of the probe forward and of truncated_svd beside
svd_lowrank, and an A/B of doing the SVD's l x l factorizations on the host (monkeypatched here)."""
import statistics
import sys
import time

import torch
from torch.profiler import ProfilerActivity, profile

import aios_fast.kernels.svd as ks
import aios_fast.linalg as la
from aios_fast.bench.cases import probe as pr
from aios_fast.bench.cases import svd as sv

dev = sys.argv[1] if len(sys.argv) > 1 else "cuda"
cuda = dev == "cuda"
sync = torch.cuda.synchronize if cuda else (lambda: None)
acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])


def table(p, key, n):
    try:
        return p.key_averages().table(sort_by=key, row_limit=n)
    except Exception:  # noqa: BLE001 - older/newer key names
        return p.key_averages().table(sort_by=key.replace("cuda", "device"), row_limit=n)


def prof(fn, label, n=3):
    for _ in range(2):
        fn()
    sync()
    with profile(activities=acts) as p:
        for _ in range(n):
            fn()
            sync()
    print(f"\n==== {label} ({n} calls)")
    print(table(p, "self_cuda_time_total" if cuda else "self_cpu_time_total", 14))
    print(table(p, "cpu_time_total", 10))


def timed(fn, reps=15):
    fn()
    sync()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        sync()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


model, tok = pr.load_model()
model = model.to(dev)
b, s = (128, 256) if cuda else (4, 32)
batch = {k: v.to(dev) for k, v in pr.make_batch(tok, b, s).items()}
prof(lambda: pr.forward(model, batch), f"plain forward MiniLM {b}x{s}")
prof(lambda: pr.probe_forward(model, batch), f"forward + WeightMapProbe MiniLM {b}x{s}")
outs = pr.linear_outputs(model, batch)
prof(lambda: pr.all_stats(outs, "cuda" if cuda else "cpp"), "token_norms of every Linear output")
del model, outs

# ---- A/B: the l x l factorizations on the host
orig = (ks._chol_r, la._new_directions, la._small_svd)


def host(A):
    return A.cpu() if A.device.type != "cpu" else A


def chol_r_host(Y):
    R, info = torch.linalg.cholesky_ex(host(Y.T @ Y), upper=True)
    if int(info) != 0:
        return None
    d = R.diagonal().abs()
    if not bool(torch.isfinite(d).all()) or float(d.min()) <= float(d.max()) / ks._COND_LIMIT.get(Y.dtype, 1e3):
        return None
    return R.to(Y.device)


def small_svd_host(Q, Z, k):
    dev_ = Z.device
    f = ks.cholqr2_factors(Z)
    Q1, R2, R = f
    u, s_, vh = torch.linalg.svd(host(R.T))
    Vh = torch.linalg.solve_triangular(host(R2), vh[:k].T, upper=True).T.to(dev_) @ Q1.T
    s_ = s_.to(dev_)
    return Q @ u[:, :k].to(dev_), s_[:k].clone(), Vh, s_


shapes = [((4096, 4096), 16), ((4096, 4096), 64), ((4096, 11008), 16)] if cuda else [((512, 768), 16)]
for shape, k in shapes:
    T, B = (t.to(dev) for t in sv.make_pair(shape, torch.bfloat16))
    base = timed(lambda: sv.ours(T, B, k))
    ks._chol_r, la._small_svd = chol_r_host, small_svd_host
    off = timed(lambda: sv.ours(T, B, k))
    ks._chol_r, la._new_directions, la._small_svd = orig
    peer = timed(lambda: sv.lowrank(T, B, k))
    print(f"A/B {shape} r{k}: device-side {base*1e3:.2f} ms, host-side l x l {off*1e3:.2f} ms, "
          f"svd_lowrank {peer*1e3:.2f} ms")
    if shape == (4096, 11008):
        prof(lambda: sv.ours(T, B, k), f"truncated_svd {shape} bf16 r{k}")
        prof(lambda: sv.lowrank(T, B, k), f"svd_lowrank {shape} bf16 r{k}")
    del T, B
