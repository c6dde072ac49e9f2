"""Private compiled kernels of aios_fast. Call the validating Python API instead:
aios_fast.kernels.norms.token_norm_stats, aios_fast.linalg.truncated_svd, aios_fast.backends.

Pointers are integers (``tensor.data_ptr()``), so bfloat16 needs no NumPy dtype and _C is not
linked against libtorch. CUDA entry points exist only in builds with CUDA compiled in
(``build_info()["cuda_compiled"]``) and take ``torch.cuda.current_stream().cuda_stream``.
"""

from typing import Any

from typing_extensions import Buffer

def build_info() -> dict[str, Any]:
    """Features compiled into this build: openmp, openmp_threads, cpu_simd, hardware_threads,
    cuda_compiled, cuda_runtime_version, cuda_device_count, compiler."""

def token_norms_cpu(x: int, dtype: int, rows: int, cols: int, mask: int, stats: int,
                    channel: int) -> None:
    """Accumulate per-token L2-norm statistics of a contiguous (rows, cols) buffer at ``x``
    (dtype 0 = float32, 1 = float16, 2 = bfloat16) into ``stats`` (float64[4]: count, sum,
    sum of squares, max) and ``channel`` (float64[cols]: per-feature sum of squares).
    ``mask`` points to bool[rows] (0: every row counts)."""

def token_norms_cuda(x: int, dtype: int, rows: int, cols: int, mask: int, stats: int,
                     channel: int, stream: int) -> None:
    """As token_norms_cpu on device pointers: one launch on ``stream``, no host sync."""

def delta_tile(t: Buffer, b: Buffer | None, out: Buffer, kind: str) -> float:
    """out[:] = float32(t) - float32(b) (b may be None) for kind "f32", "f16" or "bf16";
    returns the sum of squares of out (accumulated in double)."""

def delta_tile_cuda(t: int, b: int, out: int, sumsq: int, n: int, kind: str, stream: int) -> None:
    """Device pointers: out = float32(t) - float32(b) (b may be 0) over n elements; atomically
    adds the sum of squares to the float64 at ``sumsq``; enqueued on ``stream``."""

def card_layout(file: Buffer, max_rows: int, max_name_bytes: int, max_dim: int,
                max_rank: int) -> tuple[int, dict[bytes, bytes], tuple[Any, ...]] | None:
    """A .lora.arrow card read from its bytes: (version, schema metadata, rows) with rows =
    (modules, dtype_a names, dtype_b names, shape_a, shape_b, weight_a start, weight_a offsets,
    weight_b start, weight_b offsets, ranks, alphas or None for v1), every row checked; None
    when the file is not exactly a plain, valid card (aios_fast.cards._reader then runs its
    checked path, which names the problem)."""
