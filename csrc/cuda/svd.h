// Host launcher of the CUDA tile conversion used by the fused delta sketch (see cpu/svd.cpp).
#pragma once
#include <cstdint>

namespace aios {
namespace cuda {
#ifdef AIOS_FAST_WITH_CUDA
// out[i] = f32(t[i]) - f32(b[i]) (b == 0: f32(t[i])) for i < n; *sumsq (double) += Σ out[i]².
// kind: 0 float32, 1 float16, 2 bfloat16. Pointers are device pointers; stream is a
// cudaStream_t as an integer. Returns the cudaError_t of the launch (0 on success).
int delta_tile(uintptr_t t, uintptr_t b, uintptr_t out, uintptr_t sumsq, int64_t n, int kind,
               uintptr_t stream);
#endif
}  // namespace cuda
}  // namespace aios
