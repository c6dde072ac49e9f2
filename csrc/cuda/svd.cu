// CUDA tile conversion for the fused delta sketch: one read of T and B (float32 / float16 /
// bfloat16), one float32 write of T − B, and its sum of squares, on the caller's stream.
// The GEMMs of the sketch stay in torch (cuBLAS) on the same stream.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "svd.h"

namespace aios {
namespace cuda {
namespace {

template <int K>
__device__ __forceinline__ float load(const void* p, int64_t i) {
    if constexpr (K == 0) {
        return static_cast<const float*>(p)[i];
    } else if constexpr (K == 1) {
        return __half2float(static_cast<const __half*>(p)[i]);
    } else {
        return __bfloat162float(static_cast<const __nv_bfloat16*>(p)[i]);
    }
}

template <int K>
__global__ void delta_tile_kernel(const void* __restrict__ t, const void* __restrict__ b,
                                  float* __restrict__ out, double* __restrict__ sumsq, int64_t n) {
    float acc = 0.0f;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        float d = load<K>(t, i);
        if (b != nullptr) d -= load<K>(b, i);
        out[i] = d;
        acc += d * d;
    }
    // Warp then block reduction; one double atomic per block.
    for (int off = 16; off > 0; off >>= 1) acc += __shfl_down_sync(0xffffffffu, acc, off);
    __shared__ float warp_sums[32];
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    if (lane == 0) warp_sums[warp] = acc;
    __syncthreads();
    if (warp == 0) {
        const int nwarps = (blockDim.x + 31) >> 5;
        double v = lane < nwarps ? (double)warp_sums[lane] : 0.0;
        for (int off = 16; off > 0; off >>= 1) v += __shfl_down_sync(0xffffffffu, v, off);
        if (lane == 0) atomicAdd(sumsq, v);
    }
}

}  // namespace

int delta_tile(uintptr_t t, uintptr_t b, uintptr_t out, uintptr_t sumsq, int64_t n, int kind,
               uintptr_t stream) {
    if (n <= 0) return 0;
    const int threads = 256;
    int64_t blocks64 = (n + threads * 8 - 1) / (threads * 8);  // ~8 elements per thread
    const int blocks = blocks64 > 4096 ? 4096 : (int)blocks64;
    auto s = reinterpret_cast<cudaStream_t>(stream);
    auto tp = reinterpret_cast<const void*>(t);
    auto bp = reinterpret_cast<const void*>(b);
    auto op = reinterpret_cast<float*>(out);
    auto sp = reinterpret_cast<double*>(sumsq);
    if (kind == 0) delta_tile_kernel<0><<<blocks, threads, 0, s>>>(tp, bp, op, sp, n);
    else if (kind == 1) delta_tile_kernel<1><<<blocks, threads, 0, s>>>(tp, bp, op, sp, n);
    else delta_tile_kernel<2><<<blocks, threads, 0, s>>>(tp, bp, op, sp, n);
    return (int)cudaGetLastError();
}

}  // namespace cuda
}  // namespace aios
