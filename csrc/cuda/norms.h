// Host launcher of the token-norm statistics kernel (see norms.cu). Raw device pointers
// and the caller's cudaStream_t arrive as integers, so _C never links against libtorch.
#pragma once
#include <cstdint>

namespace aios {
namespace cuda {
#ifdef AIOS_FAST_WITH_CUDA
// Enqueues one kernel on `stream`; returns nullptr, or a static error string when the
// launch failed. Never synchronises.
const char* token_norms_launch(uintptr_t x, int dtype, int64_t rows, int64_t cols, uintptr_t mask,
                               uintptr_t stats, uintptr_t channel, uintptr_t stream);
#endif
}  // namespace cuda
}  // namespace aios
