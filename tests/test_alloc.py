"""Huge-page scratch buffers (aios_fast._alloc): the right tensor, backed by THP where Linux offers it."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import torch

from aios_fast._alloc import empty_scratch

THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def _anon_huge_kib() -> int:
    text = Path("/proc/self/smaps_rollup").read_text()
    return int(re.search(r"AnonHugePages:\s+(\d+) kB", text).group(1))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_large_buffer_is_a_writable_contiguous_tensor(dtype):
    t = empty_scratch((1024, 9000), dtype)  # 35 MiB in float32: over the fallback threshold
    assert t.shape == (1024, 9000) and t.dtype == dtype and t.is_contiguous()
    t.fill_(2.5)
    t[7, 11] = -1.0
    assert float(t.sum()) == pytest.approx(2.5 * (1024 * 9000 - 1) - 1.0)


def test_small_and_unsupported_requests_fall_back_to_torch_empty():
    for shape, dtype in (((16, 16), torch.float32), ((2048, 2048), torch.float32), ((2048, 4096), torch.bfloat16)):
        t = empty_scratch(shape, dtype)
        assert t.shape == shape and t.dtype == dtype
        t.zero_()


@pytest.mark.skipif(not sys.platform.startswith("linux") or not THP.exists()
                    or "[never]" in THP.read_text(), reason="transparent huge pages are off or absent here")
def test_buffer_is_backed_by_huge_pages():
    before = _anon_huge_kib()
    t = empty_scratch((4096, 4096), torch.float32)  # 64 MiB
    t.fill_(1.0)
    gained = _anon_huge_kib() - before
    # Without the advice (THP mode "madvise") none of it would be; the kernel may leave the
    # unaligned head and tail, or what it cannot compact on a fragmented host, in small pages.
    assert gained >= 8 * 1024, f"only {gained} KiB of the 64 MiB buffer in huge pages"
    del t


def test_scratch_pool_reuses_by_shape_and_keeps_at_most_its_budget():
    from aios_fast._alloc import ScratchPool

    pool = ScratchPool(max_bytes=3 * 1024 * 1024 * 4)  # three 1024² float32 buffers
    a = pool.take((1024, 1024), torch.float32)
    pool.give(a)
    assert pool.take((1024, 1024), torch.float32) is a          # the same buffer again
    assert pool.take((1024, 1024), torch.float32) is not a      # a was handed out: a new one
    bufs = [pool.take((1024, 1024), torch.float32) for _ in range(5)]
    for b in bufs:
        pool.give(b)
    assert pool.kept_bytes == 3 * 1024 * 1024 * 4                  # the budget, not five buffers
    assert pool.take((1024, 1024), torch.float32) is bufs[-1]    # most recently returned first
    assert pool.take((512, 2048), torch.float32).shape == (512, 2048)  # other shapes: fresh
    pool.clear()
    assert pool.kept_bytes == 0


def test_truncated_svd_returns_its_delta_to_the_pool_and_results_do_not_alias_it():
    from aios_fast import linalg

    linalg.free_scratch()
    g = torch.Generator().manual_seed(0)
    T, B = torch.randn(300, 200, generator=g).bfloat16(), torch.randn(300, 200, generator=g).bfloat16()
    first = linalg.truncated_svd((T, B), 4, materialize=True)
    (kept,) = linalg.SCRATCH._free
    assert kept.shape == (300, 200) and kept.dtype == torch.float32
    U, S = first.U.clone(), first.S.clone()
    kept.fill_(float("nan"))                                     # the next call may overwrite it
    assert torch.equal(first.U, U) and torch.equal(first.S, S)
    again = linalg.truncated_svd((T, B), 4, materialize=True)
    assert len(linalg.SCRATCH._free) == 1 and linalg.SCRATCH._free[0] is kept  # reused
    assert torch.equal(again.S, S)                                              # same answer
    assert linalg.free_scratch() == 300 * 200 * 4 and linalg.SCRATCH.kept_bytes == 0
