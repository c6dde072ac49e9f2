// Host-side declarations of the CUDA part of _C. Everything here takes raw device
// pointers and a cudaStream_t passed as an integer (torch.cuda.current_stream().cuda_stream),
// so _C never links against libtorch.
#pragma once
#include <cstdint>

namespace aios {
namespace cuda {
#ifdef AIOS_FAST_WITH_CUDA
int runtime_version();
int device_count();
#endif
}  // namespace cuda
}  // namespace aios
