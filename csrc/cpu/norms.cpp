// Activation-norm statistics (the WeightMapProbe hot path), CPU side.
//
// For an activation matrix x of shape (rows = tokens, cols = features), in one pass:
//   per token t:   n_t = sqrt(sum_j x[t,j]^2)
//   stats  (float64[4]) += (count, sum n_t, sum n_t^2, max n_t)   -- max is a running max
//   channel (float64[cols]) += sum_t x[t,j]^2                    -- channel energy
// Rows whose mask byte is 0 are skipped (padding tokens).
//
// Threads split the rows (OpenMP); each keeps float32 partial channel sums in a private
// buffer (cols floats, stays in L1/L2) and float64 token totals, merged once at the end,
// so there is no sharing in the inner loop. Half types are converted in registers by bit
// manipulation or F16C, never copied to a float32 buffer first.
//
// Pointers arrive as integers: bf16 has no NumPy dtype, and going through the buffer
// protocol would cost a conversion per call on a path that runs once per hooked module per
// forward. The Python layer (aios_fast.kernels.norms) has already checked dtype, shape,
// contiguity and device, and keeps the tensors alive for the duration of the call.
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#ifdef AIOS_FAST_WITH_OPENMP
#include <omp.h>
#endif

#include "cpu/dispatch.h"
#include "cpu/half.h"
#include "registry.h"
#ifdef AIOS_FAST_WITH_CUDA
#include "cuda/norms.h"
#endif

namespace py = pybind11;

namespace aios {
namespace {

// One row, portable: returns the row's sum of squares and adds x^2 into ch.
template <int DT>
float row_portable(const void* row, int64_t cols, float* ch) {
    float s = 0.f;
#pragma omp simd reduction(+ : s)
    for (int64_t j = 0; j < cols; ++j) {
        const float v = load_elem<DT>(row, j);
        const float q = v * v;
        s += q;
        ch[j] += q;
    }
    return s;
}

#ifdef AIOS_X86_DISPATCH
template <int DT>
__attribute__((target("avx2,fma,f16c"))) inline __m256 load8(const void* base, int64_t j) {
    if constexpr (DT == kF32) {
        return _mm256_loadu_ps(static_cast<const float*>(base) + j);
    } else if constexpr (DT == kBF16) {
        __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + j));
        return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
    } else {
        __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(base) + j));
        return _mm256_cvtph_ps(h);
    }
}

// One row with AVX2/FMA/F16C: two independent accumulators hide the FMA latency.
template <int DT>
__attribute__((target("avx2,fma,f16c"))) float row_avx2(const void* row, int64_t cols, float* ch) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= cols; j += 16) {
        const __m256 a = load8<DT>(row, j), b = load8<DT>(row, j + 8);
        acc0 = _mm256_fmadd_ps(a, a, acc0);
        acc1 = _mm256_fmadd_ps(b, b, acc1);
        _mm256_storeu_ps(ch + j, _mm256_fmadd_ps(a, a, _mm256_loadu_ps(ch + j)));
        _mm256_storeu_ps(ch + j + 8, _mm256_fmadd_ps(b, b, _mm256_loadu_ps(ch + j + 8)));
    }
    for (; j + 8 <= cols; j += 8) {
        const __m256 a = load8<DT>(row, j);
        acc0 = _mm256_fmadd_ps(a, a, acc0);
        _mm256_storeu_ps(ch + j, _mm256_fmadd_ps(a, a, _mm256_loadu_ps(ch + j)));
    }
    acc0 = _mm256_add_ps(acc0, acc1);
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(acc0), _mm256_extractf128_ps(acc0, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    float s = _mm_cvtss_f32(lo);
    for (; j < cols; ++j) {  // tail (cols not a multiple of 8)
        const float v = load_elem<DT>(row, j);
        s += v * v;
        ch[j] += v * v;
    }
    return s;
}

#endif

using RowFn = float (*)(const void*, int64_t, float*);

template <int DT>
RowFn pick_row_fn() {
#ifdef AIOS_X86_DISPATCH
    if (cpu_has_avx2() && cpu_has_f16c()) return &row_avx2<DT>;
#endif
    return &row_portable<DT>;
}

struct Partial {
    double count = 0, sum = 0, sumsq = 0, max = 0;
};

void token_norms_impl(const void* x, int dtype, int64_t rows, int64_t cols, const uint8_t* mask,
                      double* stats, double* channel) {
    RowFn fn = dtype == kF32 ? pick_row_fn<kF32>() : dtype == kF16 ? pick_row_fn<kF16>() : pick_row_fn<kBF16>();
    const int64_t elem = dtype == kF32 ? 4 : 2;
    const char* base = static_cast<const char*>(x);

    int nthreads = 1;
#ifdef AIOS_FAST_WITH_OPENMP
    // The op is memory-bound: one core streams ~10 GB/s, close to what the memory bus gives,
    // so a second thread helps only on large inputs. Worse, the probe calls this between
    // torch's own multithreaded ops, whose (separate) OpenMP pool is still spinning; a
    // barrier of ours then waits for a descheduled thread, costing milliseconds on a busy
    // machine (measured: 0.2 ms single-threaded vs 15-40 ms with 2 threads under load for
    // 8192x384). So each thread gets at least 8M elements (~32 MB of fp32).
    const int64_t work = rows * std::max<int64_t>(cols, 1);
    nthreads = static_cast<int>(std::min<int64_t>(omp_get_max_threads(), std::max<int64_t>(1, work / (int64_t{1} << 23))));
    nthreads = static_cast<int>(std::min<int64_t>(nthreads, std::max<int64_t>(rows, 1)));
#endif
    std::vector<float> ch_part(static_cast<size_t>(nthreads) * static_cast<size_t>(cols), 0.f);
    std::vector<Partial> part(nthreads);

#ifdef AIOS_FAST_WITH_OPENMP
#pragma omp parallel num_threads(nthreads) if (nthreads > 1)
#endif
    {
        int tid = 0;
#ifdef AIOS_FAST_WITH_OPENMP
        tid = omp_get_thread_num();
#endif
        float* ch = ch_part.data() + static_cast<size_t>(tid) * static_cast<size_t>(cols);
        Partial p;
#ifdef AIOS_FAST_WITH_OPENMP
#pragma omp for schedule(static)
#endif
        for (int64_t t = 0; t < rows; ++t) {
            if (mask && !mask[t]) continue;
            const double s = fn(base + t * cols * elem, cols, ch);
            const double n = std::sqrt(s);
            p.count += 1;
            p.sum += n;
            p.sumsq += s;
            p.max = std::max(p.max, n);
        }
        part[tid] = p;
    }

    for (int tid = 0; tid < nthreads; ++tid) {
        stats[0] += part[tid].count;
        stats[1] += part[tid].sum;
        stats[2] += part[tid].sumsq;
        stats[3] = std::max(stats[3], part[tid].max);
        const float* ch = ch_part.data() + static_cast<size_t>(tid) * static_cast<size_t>(cols);
        for (int64_t j = 0; j < cols; ++j) channel[j] += ch[j];
    }
}

void token_norms_cpu(uintptr_t x, int dtype, int64_t rows, int64_t cols, uintptr_t mask, uintptr_t stats,
                     uintptr_t channel) {
    if (dtype < kF32 || dtype > kBF16) throw std::invalid_argument("token_norms_cpu: unknown dtype code");
    if (rows < 0 || cols < 0) throw std::invalid_argument("token_norms_cpu: negative shape");
    if (rows == 0) return;
    // Safe to drop the GIL: the loop touches only the raw buffers, which the Python caller
    // keeps referenced (and unmodified by other threads) until this call returns.
    py::gil_scoped_release nogil;
    token_norms_impl(reinterpret_cast<const void*>(x), dtype, rows, cols, reinterpret_cast<const uint8_t*>(mask),
                     reinterpret_cast<double*>(stats), reinterpret_cast<double*>(channel));
}

#ifdef AIOS_FAST_WITH_CUDA
void token_norms_cuda(uintptr_t x, int dtype, int64_t rows, int64_t cols, uintptr_t mask, uintptr_t stats,
                      uintptr_t channel, uintptr_t stream) {
    if (dtype < kF32 || dtype > kBF16) throw std::invalid_argument("token_norms_cuda: unknown dtype code");
    if (rows < 0 || cols < 0) throw std::invalid_argument("token_norms_cuda: negative shape");
    if (rows == 0) return;
    const char* err;
    {
        // The launch is asynchronous and touches no Python object.
        py::gil_scoped_release nogil;
        err = cuda::token_norms_launch(x, dtype, rows, cols, mask, stats, channel, stream);
    }
    if (err) throw std::runtime_error(std::string("token_norms_cuda: ") + err);
}
#endif

}  // namespace

void register_norms(py::module_& m) {
    m.def("token_norms_cpu", &token_norms_cpu, py::arg("x"), py::arg("dtype"), py::arg("rows"), py::arg("cols"),
          py::arg("mask"), py::arg("stats"), py::arg("channel"),
          "Accumulate token-norm stats (float64[4]) and channel energy (float64[cols]) of a "
          "contiguous (rows, cols) buffer; dtype 0=f32 1=f16 2=bf16; mask 0 = none.");
#ifdef AIOS_FAST_WITH_CUDA
    m.def("token_norms_cuda", &token_norms_cuda, py::arg("x"), py::arg("dtype"), py::arg("rows"), py::arg("cols"),
          py::arg("mask"), py::arg("stats"), py::arg("channel"), py::arg("stream"),
          "Same as token_norms_cpu on device pointers, one launch on the given stream, no sync.");
#endif
}

}  // namespace aios
