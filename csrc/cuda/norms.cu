// Token-norm statistics on the GPU: one launch per call, on the caller's stream, results
// accumulated into device buffers (float64 stats[4] = count, sum, sumsq, max of token
// norms; float64 channel[cols] = per-feature sum of squares). Nothing is read back here:
// the probe reads the buffers once, at the end of its run.
//
// Layout: each warp takes one token (row) at a time and the row's sum of squares is a
// warp-shuffle reduction. Two kernels:
// * vec (rows of <= 1536 features, 16-byte aligned): each lane loads 16 bytes per chunk of the
//   row (4 floats or 8 halves) with all of the row's chunks in flight at once, and keeps the
//   channel energy of its own features in registers across every row it visits; a block adds
//   those to shared memory once at the end, then to global float64 once. The first kernel
//   (below) did a shared-memory atomic per element with one 4-byte load in flight per lane:
//   4.0 ms for MiniLM's 37 outputs at 128 x 256 on an H200 (about 450 GB/s).
// * scalar (any shape): lanes stride over the features with 4-byte loads; channel energy goes
//   through shared-memory atomics per element (global ones past 8192 features).
// Token totals are reduced per block and added with one set of global atomics per block.
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

// One row done: its sum of squares, summed over the warp's lanes, into the warp's token totals
// (every lane ends with the same totals; lane 0's are the ones flushed).
__device__ __forceinline__ void add_row(float s, double& cnt, double& sum, double& sumsq, double& mx) {
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) s += __shfl_xor_sync(0xffffffffu, s, off);
    const double n = sqrt(static_cast<double>(s));
    cnt += 1;
    sum += n;
    sumsq += s;
    mx = fmax(mx, n);
}

// The end of both kernels, called by every thread of the block: each warp's token totals go
// to shared memory and one thread adds the block's to the global stats; then the block's
// shared channel partials (when it kept them there: CH) are added to global float64.
template <bool CH>
__device__ __forceinline__ void flush_block(double (&sh_tot)[kWarps][4], int lane, int warp, double cnt,
                                            double sum, double sumsq, double mx, double* __restrict__ stats,
                                            const float* sh_ch, int64_t cols, double* __restrict__ channel) {
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
    if (CH) {
        for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) {
            const float v = sh_ch[j];
            if (v != 0.f) atomicAdd(channel + j, static_cast<double>(v));
        }
    }
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
        add_row(s, cnt, sum, sumsq, mx);
    }
    flush_block<SHARED>(sh_tot, lane, warp, cnt, sum, sumsq, mx, stats, sh_ch, cols, channel);
}

// 16 bytes of a row as floats: 4 float32 or 8 float16 / bfloat16.
template <int DT>
struct Vec16 {
    static constexpr int kElems = DT == 0 ? 4 : 8;
    __device__ static __forceinline__ void load(const char* p, float* out) {
        const uint4 u = __ldg(reinterpret_cast<const uint4*>(p));
        if constexpr (DT == 0) {
            out[0] = __uint_as_float(u.x);
            out[1] = __uint_as_float(u.y);
            out[2] = __uint_as_float(u.z);
            out[3] = __uint_as_float(u.w);
        } else {
            const unsigned w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                float2 f;
                if constexpr (DT == 1) {
                    f = __half22float2(*reinterpret_cast<const __half2*>(&w[i]));
                } else {
                    f = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&w[i]));
                }
                out[2 * i] = f.x;
                out[2 * i + 1] = f.y;
            }
        }
    }
};

// NCH chunks of 32 lanes x 16 bytes cover the row; lane `lane` owns features
// [(c*32 + lane)*E, +E) of chunk c, the same ones on every row, so their energy stays in registers.
template <int DT, int NCH>
__global__ void __launch_bounds__(kThreads, 2)
token_norms_vec_kernel(const void* __restrict__ x, int64_t rows, int64_t cols, const uint8_t* __restrict__ mask,
                       double* __restrict__ stats, double* __restrict__ channel) {
    constexpr int E = Vec16<DT>::kElems;
    constexpr int kBytes = DT == 0 ? 4 : 2;
    extern __shared__ float sh_ch[];
    __shared__ double sh_tot[kWarps][4];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    for (int64_t j = threadIdx.x; j < cols; j += blockDim.x) sh_ch[j] = 0.f;
    float acc[NCH][E];
#pragma unroll
    for (int c = 0; c < NCH; ++c)
#pragma unroll
        for (int i = 0; i < E; ++i) acc[c][i] = 0.f;
    double cnt = 0, sum = 0, sumsq = 0, mx = 0;
    const int64_t stride = static_cast<int64_t>(gridDim.x) * kWarps;
    for (int64_t t = static_cast<int64_t>(blockIdx.x) * kWarps + warp; t < rows; t += stride) {
        if (mask && !mask[t]) continue;  // warp-uniform branch: the whole warp owns row t
        const char* row = static_cast<const char*>(x) + t * cols * kBytes;
        float v[NCH][E];
#pragma unroll
        for (int c = 0; c < NCH; ++c) {
            const int64_t j = static_cast<int64_t>(c * 32 + lane) * E;
            if (j < cols) {
                Vec16<DT>::load(row + j * kBytes, v[c]);
            } else {
#pragma unroll
                for (int i = 0; i < E; ++i) v[c][i] = 0.f;
            }
        }
        float s = 0.f;
#pragma unroll
        for (int c = 0; c < NCH; ++c)
#pragma unroll
            for (int i = 0; i < E; ++i) {
                const float q = v[c][i] * v[c][i];
                acc[c][i] += q;
                s += q;
            }
        add_row(s, cnt, sum, sumsq, mx);
    }
    __syncthreads();  // sh_ch zeroed by every thread before any adds into it
#pragma unroll
    for (int c = 0; c < NCH; ++c) {
        const int64_t j = static_cast<int64_t>(c * 32 + lane) * E;
        if (j < cols) {
#pragma unroll
            for (int i = 0; i < E; ++i)
                if (acc[c][i] != 0.f) atomicAdd(sh_ch + j + i, acc[c][i]);
        }
    }
    flush_block<true>(sh_tot, lane, warp, cnt, sum, sumsq, mx, stats, sh_ch, cols, channel);
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

// Blocks of one vec kernel that fit on the device at once (registers decide: NCH sets them), so
// that each warp walks many rows and the per-block flush of channel partials stays small next
// to the data it summarises. Cached per device for each instantiation.
template <int DT, int NCH>
void launch_vec(const void* x, int64_t rows, int64_t cols, const uint8_t* mask, double* stats, double* channel,
                cudaStream_t stream) {
    static int per_sm_cache[64] = {0};
    const size_t smem = static_cast<size_t>(cols) * sizeof(float);
    int dev = 0, per_sm = 2;
    if (cudaGetDevice(&dev) == cudaSuccess && dev >= 0 && dev < 64) {
        if (per_sm_cache[dev] == 0) {
            int n = 0;
            // at the largest row this kernel takes (1536 features of shared partials): a safe bound
            if (cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, token_norms_vec_kernel<DT, NCH>, kThreads,
                                                              1536 * sizeof(float)) != cudaSuccess || n <= 0)
                n = 2;
            per_sm_cache[dev] = n;
        }
        per_sm = per_sm_cache[dev];
    }
    int64_t blocks = (rows + kWarps - 1) / kWarps;
    const int64_t cap = static_cast<int64_t>(sm_count()) * per_sm;
    if (blocks > cap) blocks = cap;
    token_norms_vec_kernel<DT, NCH><<<static_cast<unsigned>(blocks), kThreads, smem, stream>>>(
        x, rows, cols, mask, stats, channel);
}

// The vec kernel for rows of whole 16-byte chunks, up to 1536 features; false if it does not apply.
template <int DT>
bool try_vec(const void* x, int64_t rows, int64_t cols, const uint8_t* mask, double* stats, double* channel,
             cudaStream_t stream) {
    constexpr int E = Vec16<DT>::kElems;
    if (cols <= 0 || cols > 1536 || cols % E != 0 || reinterpret_cast<uintptr_t>(x) % 16 != 0) return false;
    const int64_t nch = (cols + 32 * E - 1) / (32 * E);
    // Register budget: NCH * E accumulators plus as many loaded values per lane.
    if constexpr (DT == 0) {
        if (nch <= 1) launch_vec<DT, 1>(x, rows, cols, mask, stats, channel, stream);
        else if (nch <= 2) launch_vec<DT, 2>(x, rows, cols, mask, stats, channel, stream);
        else if (nch <= 3) launch_vec<DT, 3>(x, rows, cols, mask, stats, channel, stream);
        else if (nch <= 4) launch_vec<DT, 4>(x, rows, cols, mask, stats, channel, stream);
        else if (nch <= 6) launch_vec<DT, 6>(x, rows, cols, mask, stats, channel, stream);
        else if (nch <= 8) launch_vec<DT, 8>(x, rows, cols, mask, stats, channel, stream);
        else launch_vec<DT, 12>(x, rows, cols, mask, stats, channel, stream);
    } else {
        if (nch <= 1) launch_vec<DT, 1>(x, rows, cols, mask, stats, channel, stream);
        else if (nch <= 2) launch_vec<DT, 2>(x, rows, cols, mask, stats, channel, stream);
        else if (nch <= 3) launch_vec<DT, 3>(x, rows, cols, mask, stats, channel, stream);
        else if (nch <= 4) launch_vec<DT, 4>(x, rows, cols, mask, stats, channel, stream);
        else launch_vec<DT, 6>(x, rows, cols, mask, stats, channel, stream);
    }
    return true;
}

template <int DT>
void launch(const void* x, int64_t rows, int64_t cols, const uint8_t* mask, double* stats, double* channel,
            cudaStream_t stream) {
    if (try_vec<DT>(x, rows, cols, mask, stats, channel, stream)) return;
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
