// Runtime queries that must not fail when no driver or GPU is present.
#include <cuda_runtime.h>

#include "cuda_api.h"

namespace aios {
namespace cuda {

int runtime_version() {
    int v = 0;
    if (cudaRuntimeGetVersion(&v) != cudaSuccess) return 0;
    return v;
}

int device_count() {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        cudaGetLastError();  // clear the sticky "no driver" error for later calls
        return 0;
    }
    return n;
}

}  // namespace cuda
}  // namespace aios
