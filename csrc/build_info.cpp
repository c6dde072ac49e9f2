// What this build of _C contains: OpenMP, SIMD level, CUDA, so that
// `aios-fast info` can say why each kernel was or was not chosen.
#include <pybind11/pybind11.h>

#include <thread>

#ifdef AIOS_FAST_WITH_OPENMP
#include <omp.h>
#endif

#include "registry.h"
#include "cuda/cuda_api.h"

namespace py = pybind11;

namespace aios {

static py::dict build_info() {
    py::dict d;
#ifdef AIOS_FAST_WITH_OPENMP
    d["openmp"] = true;
    d["openmp_threads"] = omp_get_max_threads();
#else
    d["openmp"] = false;
    d["openmp_threads"] = 1;
#endif
    py::list simd;
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
    __builtin_cpu_init();
    if (__builtin_cpu_supports("sse4.2")) simd.append("sse4.2");
    if (__builtin_cpu_supports("avx2")) simd.append("avx2");
    if (__builtin_cpu_supports("fma")) simd.append("fma");
    if (__builtin_cpu_supports("avx512f")) simd.append("avx512f");
#elif defined(__aarch64__)
    simd.append("neon");
#endif
    d["cpu_simd"] = simd;
    d["hardware_threads"] = std::thread::hardware_concurrency();
#ifdef AIOS_FAST_WITH_CUDA
    d["cuda_compiled"] = true;
    d["cuda_runtime_version"] = cuda::runtime_version();
    d["cuda_device_count"] = cuda::device_count();
#else
    d["cuda_compiled"] = false;
    d["cuda_runtime_version"] = 0;
    d["cuda_device_count"] = 0;
#endif
#if defined(__clang__)
    d["compiler"] = "clang " __clang_version__;
#elif defined(__GNUC__)
    d["compiler"] = "gcc " __VERSION__;
#else
    d["compiler"] = "unknown";
#endif
    return d;
}

void register_build_info(py::module_& m) {
    m.def("build_info", &build_info, "Features compiled into this build of _C.");
}

}  // namespace aios
