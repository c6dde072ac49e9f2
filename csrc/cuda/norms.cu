// Token-norm statistics on the GPU: one launch per call, on the caller's stream, results
// accumulated into device buffers (float64 stats[4] = count, sum, sumsq, max of token
// norms; float64 channel[cols] = per-feature sum of squares). Nothing is read back here:
// the probe reads the buffers once, at the end of its run.
//
// Layout: each warp takes one token (row) at a time; lanes stride over the features so
// loads are coalesced; the row's sum of squares is a warp-shuffle reduction. Channel
// energy is accumulated per block in shared memory (float32 atomics, cheap on sm_80+) and
// flushed to global float64 once per block; token totals are reduced per block and added
// with one set of global atomics per block. When cols does not fit in shared memory the
// block adds channel energy straight to global memory instead.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "norms.h"

namespace aios {
namespace cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int64_t kMaxSharedCols = 8192;  // 32 KiB of float partials per block

template <int DT>
__device__ __forceinline__ float load(const void* base, int64_t i) {
    if constexpr (DT == 0) return __ldg(static_cast<const float*>(base) + i);
    if constexpr (DT == 1) return __half2float(static_cast<const __half*>(base)[i]);
    return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[i]);
}

// Token norms are >= 0, and for non-negative doubles the IEEE bit patterns order like the
// values, so an integer atomicMax on the bits is a float max.
__device__ __forceinline__ void atomic_max_nonneg(double* addr, double v) {
    atomicMax(reinterpret_cast<unsigned long long*>(addr), static_cast<unsigned long long>(__double_as_longlong(v)));
}

template <int DT, bool SHARED>
__global__ void token_norms_kernel(const void* __restrict__ x, int64_t rows, int64_t cols,
                                   const uint8_t* __restrict__ mask, double* __restrict__ stats,
                                   double* __restrict__ channel) {
    extern __shared__ float sh_ch[];
    __shared__ double sh_tot[kWarps][4];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (SHARED) {
        for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) sh_ch[j] = 0.f;
        __syncthreads();
    }
    double cnt = 0, sum = 0, sumsq = 0, mx = 0;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
    for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + warp; t < rows; t += stride) {
        if (mask && !mask[t]) continue;  // warp-uniform branch: the whole warp owns row t
        const char* row = static_cast<const char*>(x) + t * cols * (DT == 0 ? 4 : 2);
        float s = 0.f;
        for (int64_t j = lane; j < cols; j += 32) {
            const float v = load<DT>(row, j);
            const float q = v * v;
            s += q;
            if (SHARED) atomicAdd(sh_ch + j, q);
            else atomicAdd(channel + j, static_cast<double>(q));
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
        const double n = sqrt(static_cast<double>(s));
        cnt += 1;
        sum += n;
        sumsq += s;
        mx = fmax(mx, n);
    }
    if (lane == 0) {
        sh_tot[warp][0] = cnt;
        sh_tot[warp][1] = sum;
        sh_tot[warp][2] = sumsq;
        sh_tot[warp][3] = mx;
    }
    __syncthreads();
    if (threadIdx.x == 0) {
        double c = 0, a = 0, b = 0, m = 0;
        for (int w = 0; w < kWarps; ++w) {
            c += sh_tot[w][0];
            a += sh_tot[w][1];
            b += sh_tot[w][2];
            m = fmax(m, sh_tot[w][3]);
        }
        if (c > 0) {
            atomicAdd(stats + 0, c);
            atomicAdd(stats + 1, a);
            atomicAdd(stats + 2, b);
            atomic_max_nonneg(stats + 3, m);
        }
    }
    if (SHARED) {
        for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
            const float v = sh_ch[j];
            if (v != 0.f) atomicAdd(channel + j, static_cast<double>(v));
        }
    }
}

int sm_count() {
    // Cached per device: cudaDeviceGetAttribute is cheap but not free, and this runs once
    // per hooked module per forward.
    static int cache[64] = {0};
    int dev = 0;
    if (cudaGetDevice(&dev) != cudaSuccess || dev < 0 || dev >= 64) return 80;
    if (cache[dev] == 0) {
        int n = 0;
        if (cudaDeviceGetAttribute(&n, cudaDevAttrMultiProcessorCount, dev) != cudaSuccess || n <= 0) n = 80;
        cache[dev] = n;
    }
    return cache[dev];
}

template <int DT>
void launch(const void* x, int64_t rows, int64_t cols, const uint8_t* mask, double* stats, double* channel,
            cudaStream_t stream) {
    // Enough blocks to fill the GPU, but each block covers many rows so the per-block
    // flush of channel partials stays small next to the data it summarises.
    int64_t blocks = (rows + kWarps * 8 - 1) / (kWarps * 8);
    const int64_t cap = static_cast<int64_t>(sm_count()) * 4;
    if (blocks > cap) blocks = cap;
    if (blocks < 1) blocks = 1;
    if (cols <= kMaxSharedCols) {
        const size_t smem = static_cast<size_t>(cols > 0 ? cols : 1) * sizeof(float);
        token_norms_kernel<DT, true><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
            x, rows, cols, mask, stats, channel);
    } else {
        token_norms_kernel<DT, false><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(
            x, rows, cols, mask, stats, channel);
    }
}

}  // namespace

const char* token_norms_launch(uintptr_t x, int dtype, int64_t rows, int64_t cols, uintptr_t mask,
                               uintptr_t stats, uintptr_t channel, uintptr_t stream) {
    if (rows == 0) return nullptr;
    auto* xp = reinterpret_cast<const void*>(x);
    auto* mp = reinterpret_cast<const uint8_t*>(mask);
    auto* sp = reinterpret_cast<double*>(stats);
    auto* cp = reinterpret_cast<double*>(channel);
    auto s = reinterpret_cast<cudaStream_t>(stream);
    switch (dtype) {
        case 0: launch<0>(xp, rows, cols, mp, sp, cp, s); break;
        case 1: launch<1>(xp, rows, cols, mp, sp, cp, s); break;
        case 2: launch<2>(xp, rows, cols, mp, sp, cp, s); break;
        default: return "unknown dtype code";
    }
    // Reports launch-configuration errors only; it does not wait for the kernel.
    const cudaError_t e = cudaGetLastError();
    return e == cudaSuccess ? nullptr : cudaGetErrorString(e);
}

}  // namespace cuda
}  // namespace aios
