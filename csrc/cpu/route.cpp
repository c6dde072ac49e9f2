// Skill routing scan (LoRARouter's hot path), CPU side.
//
// Each skill s owns the example rows [off[s], off[s+1]) of an (N, d) matrix of L2-normalised
// example embeddings; its score for a query q is the mean of its best min(kex, count) example
// similarities q.e. The result is the exact top-K skills by that score.
//
// Reading every float32 row is bound by memory bandwidth (15 MB per query at 1,000 skills of
// 10 examples), so the scan reads an int8 copy instead (a quarter of the bytes) and keeps the
// answer exact with a certificate:
//   e ~ s_e * ê (int8 row, per-row scale), q ~ s_q * q̂ (int8, per-query scale), so
//   |q.e - s_q s_e (q̂.ê)| <= |q - s_q q̂| * |e| + |s_q q̂| * |e - s_e ê| =: b_e
// and a top-k mean moves by at most the largest b_e of its rows. Every skill whose upper
// bound reaches the K-th largest lower bound is rescored exactly from the float32 rows; the
// others cannot be in the top K. Typically K plus a handful of skills are rescored.
//
// Small problems skip the int8 pass (the exact scan is cheaper than the bookkeeping).
// The index's pointers arrive as integers (computed once per index); the Python layer (aios_fast.kernels.route) has checked dtypes,
// shapes and contiguity and keeps the arrays alive during the call.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <functional>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "cpu/dispatch.h"
#include "registry.h"

namespace py = pybind11;

namespace aios {
namespace {

constexpr int64_t kMaxKex = 64;
// Below this many multiply-adds per query the exact float32 scan is used directly.
constexpr int64_t kExactOnlyWork = int64_t{1} << 16;

float dot_f32_portable(const float* a, const float* b, int64_t d) {
    float s0 = 0.f, s1 = 0.f, s2 = 0.f, s3 = 0.f;
    int64_t j = 0;
    for (; j + 4 <= d; j += 4) {
        s0 += a[j] * b[j];
        s1 += a[j + 1] * b[j + 1];
        s2 += a[j + 2] * b[j + 2];
        s3 += a[j + 3] * b[j + 3];
    }
    for (; j < d; ++j) s0 += a[j] * b[j];
    return (s0 + s1) + (s2 + s3);
}

// ê rows are padded to dp (a multiple of 32) with zeros; q̂ is int16, padded the same way.
int32_t dot_i8_portable(const int8_t* e, const int16_t* q, int64_t dp) {
    int32_t s = 0;
    for (int64_t j = 0; j < dp; ++j) s += static_cast<int32_t>(e[j]) * q[j];
    return s;
}

#ifdef AIOS_X86_DISPATCH
__attribute__((target("avx2,fma"))) inline float hsum256(__m256 v) {
    __m128 lo = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    lo = _mm_add_ps(lo, _mm_movehl_ps(lo, lo));
    lo = _mm_add_ss(lo, _mm_shuffle_ps(lo, lo, 1));
    return _mm_cvtss_f32(lo);
}

__attribute__((target("avx2,fma"))) float dot_f32_avx2(const float* a, const float* b, int64_t d) {
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    int64_t j = 0;
    for (; j + 16 <= d; j += 16) {
        acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc0);
        acc1 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j + 8), _mm256_loadu_ps(b + j + 8), acc1);
    }
    for (; j + 8 <= d; j += 8) acc0 = _mm256_fmadd_ps(_mm256_loadu_ps(a + j), _mm256_loadu_ps(b + j), acc0);
    float s = hsum256(_mm256_add_ps(acc0, acc1));
    for (; j < d; ++j) s += a[j] * b[j];
    return s;
}

// Sign-extend 16 int8 to int16 and multiply-add pairs into int32 lanes: exact (|sum| stays far
// below 2^31 for d <= 65536), and no saturation unlike the u8 x s8 maddubs trick.
__attribute__((target("avx2"))) int32_t dot_i8_avx2(const int8_t* e, const int16_t* q, int64_t dp) {
    __m256i acc0 = _mm256_setzero_si256(), acc1 = _mm256_setzero_si256();
    for (int64_t j = 0; j < dp; j += 32) {
        const __m256i e0 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(e + j)));
        const __m256i e1 = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(e + j + 16)));
        acc0 = _mm256_add_epi32(acc0, _mm256_madd_epi16(e0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + j))));
        acc1 = _mm256_add_epi32(acc1, _mm256_madd_epi16(e1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q + j + 16))));
    }
    __m256i acc = _mm256_add_epi32(acc0, acc1);
    __m128i s = _mm_add_epi32(_mm256_castsi256_si128(acc), _mm256_extracti128_si256(acc, 1));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(1, 0, 3, 2)));
    s = _mm_add_epi32(s, _mm_shuffle_epi32(s, _MM_SHUFFLE(2, 3, 0, 1)));
    return _mm_cvtsi128_si32(s);
}
#endif

using DotF32 = float (*)(const float*, const float*, int64_t);
using DotI8 = int32_t (*)(const int8_t*, const int16_t*, int64_t);

// The best `k` values seen so far, kept sorted descending (k <= kMaxKex, usually 3).
struct TopK {
    float v[kMaxKex];
    int64_t k, n = 0;
    explicit TopK(int64_t k_) : k(k_) {}
    inline void push(float x) {
        if (n < k) {
            int64_t i = n++;
            while (i > 0 && v[i - 1] < x) { v[i] = v[i - 1]; --i; }
            v[i] = x;
        } else if (x > v[k - 1]) {
            int64_t i = k - 1;
            while (i > 0 && v[i - 1] < x) { v[i] = v[i - 1]; --i; }
            v[i] = x;
        }
    }
    inline float mean() const {
        if (n == 0) return 0.f;
        float s = 0.f;
        for (int64_t i = 0; i < n; ++i) s += v[i];
        return s / static_cast<float>(n);
    }
};

struct Index {
    const float* E;       // (N, d) float32
    const int8_t* Eq;     // (N, dp) int8, zero-padded; null: exact scan only
    const float* scale;   // (N,)  s_e
    const float* norm;    // (N,)  |e|
    const float* resid;   // (N,)  |e - s_e ê|
    const int64_t* off;   // (S + 1,)
    int64_t S, N, d, dp;
};

float exact_score(const Index& ix, int64_t s, const float* q, int64_t kex, DotF32 dot) {
    TopK t(kex);
    for (int64_t i = ix.off[s]; i < ix.off[s + 1]; ++i) t.push(dot(ix.E + i * ix.d, q, ix.d));
    return t.mean();
}

// Exact top-K of the candidate skills, best first (ties: lower skill index first).
void select_top(std::vector<std::pair<float, int64_t>>& cand, int64_t K, int64_t* ids, float* out) {
    auto better = [](const std::pair<float, int64_t>& a, const std::pair<float, int64_t>& b) {
        return a.first > b.first || (a.first == b.first && a.second < b.second);
    };
    const int64_t k = std::min<int64_t>(K, static_cast<int64_t>(cand.size()));
    std::partial_sort(cand.begin(), cand.begin() + k, cand.end(), better);
    for (int64_t i = 0; i < k; ++i) {
        ids[i] = cand[i].second;
        out[i] = cand[i].first;
    }
}

void route_one(const Index& ix, const float* q, int64_t kex, int64_t K, int64_t* ids, float* out,
               DotF32 dotf, DotI8 doti, std::vector<float>& lo, std::vector<float>& hi, std::vector<float>& tmp,
               std::vector<int16_t>& qq, std::vector<std::pair<float, int64_t>>& cand) {
    cand.clear();
    const bool certified = ix.Eq != nullptr && ix.S > K && ix.N * ix.d >= kExactOnlyWork;
    if (!certified) {
        for (int64_t s = 0; s < ix.S; ++s) cand.emplace_back(exact_score(ix, s, q, kex, dotf), s);
        select_top(cand, K, ids, out);
        return;
    }
    // Quantise the query symmetrically to [-127, 127].
    float amax = 0.f;
    for (int64_t j = 0; j < ix.d; ++j) amax = std::max(amax, std::fabs(q[j]));
    const float sq = amax > 0.f ? amax / 127.f : 1.f;
    double eq2 = 0.0, qn2 = 0.0;
    for (int64_t j = 0; j < ix.d; ++j) {
        const float r = std::nearbyint(q[j] / sq);
        const int16_t v = static_cast<int16_t>(std::max(-127.f, std::min(127.f, r)));
        qq[j] = v;
        const double back = static_cast<double>(sq) * v;
        eq2 += (q[j] - back) * (q[j] - back);
        qn2 += back * back;
    }
    for (int64_t j = ix.d; j < ix.dp; ++j) qq[j] = 0;
    const float eq = static_cast<float>(std::sqrt(eq2)), qn = static_cast<float>(std::sqrt(qn2));

    for (int64_t s = 0; s < ix.S; ++s) {
        TopK t(kex);
        float bmax = 0.f;
        for (int64_t i = ix.off[s]; i < ix.off[s + 1]; ++i) {
            const int32_t dot = doti(ix.Eq + i * ix.dp, qq.data(), ix.dp);
            t.push(sq * ix.scale[i] * static_cast<float>(dot));
            bmax = std::max(bmax, eq * ix.norm[i] + qn * ix.resid[i]);
        }
        const float a = t.mean();
        // Slack for float32 rounding in the approximate score and in the exact rescoring (a
        // d-term float32 dot of unit vectors is within ~d * 2^-24 of the real value).
        const float slack = 1e-4f * (1.f + std::fabs(a));
        lo[s] = a - bmax - slack;
        hi[s] = a + bmax + slack;
    }
    tmp.assign(lo.begin(), lo.begin() + ix.S);
    std::nth_element(tmp.begin(), tmp.begin() + (K - 1), tmp.end(), std::greater<float>());
    const float kth = tmp[K - 1];
    for (int64_t s = 0; s < ix.S; ++s)
        if (hi[s] >= kth) cand.emplace_back(exact_score(ix, s, q, kex, dotf), s);
    select_top(cand, K, ids, out);
}

py::tuple route_topk_cpu(uintptr_t E, uintptr_t Eq, uintptr_t scale, uintptr_t norm, uintptr_t resid, uintptr_t off,
                         int64_t S, int64_t N, int64_t d, int64_t dp,
                         py::array_t<float, py::array::c_style> Qarr, int64_t kex, int64_t K) {
    if (S < 1 || N < S || d < 1) throw std::invalid_argument("route_topk_cpu: bad shape");
    if (kex < 1 || kex > kMaxKex) throw std::invalid_argument("route_topk_cpu: kex must be in [1, 64]");
    if (K < 1 || K > S) throw std::invalid_argument("route_topk_cpu: K must be in [1, S]");
    if (Eq && (dp < d || dp % 32 != 0)) throw std::invalid_argument("route_topk_cpu: dp must be >= d and a multiple of 32");
    if (Qarr.ndim() != 2 || Qarr.shape(1) != d) throw std::invalid_argument("route_topk_cpu: Q must be (n, d)");
    const int64_t n = Qarr.shape(0);
    Index ix{reinterpret_cast<const float*>(E), reinterpret_cast<const int8_t*>(Eq),
             reinterpret_cast<const float*>(scale), reinterpret_cast<const float*>(norm),
             reinterpret_cast<const float*>(resid), reinterpret_cast<const int64_t*>(off), S, N, d, dp};
    DotF32 dotf = &dot_f32_portable;
    DotI8 doti = &dot_i8_portable;
#ifdef AIOS_X86_DISPATCH
    if (cpu_has_avx2()) {
        dotf = &dot_f32_avx2;
        doti = &dot_i8_avx2;
    }
#endif
    // Outputs are allocated here: one query routes in microseconds, and creating the arrays in
    // Python and passing their addresses costs more than the scan at 10 skills.
    py::array_t<int64_t> ids({n, K});
    py::array_t<float> out({n, K});
    const float* q = Qarr.data();
    // A NaN would poison every bound and leave the candidate set empty: refuse it here, where
    // the check costs nothing beside the scan (callers skip the Python-side check on this path).
    for (int64_t i = 0; i < n * d; ++i)
        if (!std::isfinite(q[i]))
            throw std::invalid_argument("route_topk_cpu: query row " + std::to_string(i / d) +
                                        " contains NaN or infinity");
    int64_t* out_ids = ids.mutable_data();
    float* out_v = out.mutable_data();
    std::vector<float> lo(S), hi(S), tmp(S);
    std::vector<int16_t> qq(std::max(dp, d));
    std::vector<std::pair<float, int64_t>> cand;
    cand.reserve(S);
    auto run = [&] {
        for (int64_t r = 0; r < n; ++r)
            route_one(ix, q + r * d, kex, K, out_ids + r * K, out_v + r * K, dotf, doti, lo, hi, tmp, qq, cand);
    };
    // Release the GIL only when the batch is big enough for another thread to gain from it.
    if (n * N * d >= (int64_t{1} << 20)) {
        py::gil_scoped_release nogil;
        run();
    } else {
        run();
    }
    return py::make_tuple(ids, out);
}

}  // namespace

void register_route(py::module_& m) {
    m.def("route_topk_cpu", &route_topk_cpu, py::arg("E"), py::arg("Eq"), py::arg("scale"), py::arg("norm"),
          py::arg("resid"), py::arg("off"), py::arg("S"), py::arg("N"), py::arg("d"), py::arg("dp"), py::arg("Q"),
          py::arg("kex"), py::arg("K"),
          "Exact top-K skills (mean of the best kex example similarities) for n queries; an int8 "
          "scan with a certified error bound picks the skills rescored in float32. Eq = 0: exact only.");
}

}  // namespace aios
