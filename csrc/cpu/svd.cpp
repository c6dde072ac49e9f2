// Tile conversion for the fused delta sketch of aios_fast.linalg.truncated_svd.
//
// The randomized SVD of a delta ΔW = T − B reads both checkpoints once per pass. This file
// does the memory-bound half of each pass: it converts a cache-sized tile of rows of T and
// B (float32, float16 or bfloat16, decoded by bit manipulation, no F16C requirement)
// into float32 T − B in a caller-owned buffer and returns ‖T − B‖²_F of the tile in
// double precision, in one read of the inputs. Python then hands the hot tile to torch's
// matmul (MKL/oneDNN), which beats any GEMM we could link here without a BLAS.
#include <pybind11/pybind11.h>

#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#ifdef AIOS_FAST_WITH_OPENMP
#include <omp.h>
#endif

#include "cpu/half.h"
#include "registry.h"
#ifdef AIOS_FAST_WITH_CUDA
#include "cuda/svd.h"
#endif

namespace py = pybind11;

namespace aios {
namespace {

template <int DT>
double delta_kernel(const void* t, const void* b, float* out, int64_t n) {
    double total = 0.0;
    // Chunks of 4096 elements: each thread accumulates its chunk in float (exact enough
    // for a partial sum of 4096 squares) and the chunk sums in double.
    const int64_t chunk = 4096;
    const int64_t nchunks = (n + chunk - 1) / chunk;
#ifdef AIOS_FAST_WITH_OPENMP
#pragma omp parallel for schedule(static) reduction(+ : total)
#endif
    for (int64_t c = 0; c < nchunks; ++c) {
        const int64_t lo = c * chunk, hi = lo + chunk < n ? lo + chunk : n;
        float acc = 0.0f;
        if (b != nullptr) {
#pragma omp simd reduction(+ : acc)
            for (int64_t i = lo; i < hi; ++i) {
                float d = load_elem<DT>(t, i) - load_elem<DT>(b, i);
                out[i] = d;
                acc += d * d;
            }
        } else {
#pragma omp simd reduction(+ : acc)
            for (int64_t i = lo; i < hi; ++i) {
                float d = load_elem<DT>(t, i);
                out[i] = d;
                acc += d * d;
            }
        }
        total += static_cast<double>(acc);
    }
    return total;
}

int kind_of(const std::string& k) {
    if (k == "float32") return kF32;
    if (k == "float16") return kF16;
    if (k == "bfloat16") return kBF16;
    throw std::invalid_argument("delta_tile: kind must be float32, float16 or bfloat16, got " + k);
}

// delta_tile(t, b_or_None, out, kind) -> sum of squares. t/b: contiguous buffers of n
// elements of `kind` (2-byte kinds passed as int16/uint16 buffers); out: n float32.
double delta_tile(py::buffer t, py::object b, py::buffer out, const std::string& kind) {
    const int k = kind_of(kind);
    const py::ssize_t esize = k == kF32 ? 4 : 2;
    py::buffer_info ti = t.request();
    py::buffer_info oi = out.request(true);
    if (ti.itemsize != esize || oi.itemsize != 4) throw std::invalid_argument("delta_tile: item sizes do not match kind");
    const int64_t n = static_cast<int64_t>(ti.size);
    if (static_cast<int64_t>(oi.size) != n) throw std::invalid_argument("delta_tile: out has the wrong size");
    const void* bp = nullptr;
    py::buffer_info bi;
    if (!b.is_none()) {
        bi = py::cast<py::buffer>(b).request();
        if (bi.itemsize != esize || static_cast<int64_t>(bi.size) != n)
            throw std::invalid_argument("delta_tile: b does not match t");
        bp = bi.ptr;
    }
    const void* tp = ti.ptr;
    float* op = static_cast<float*>(oi.ptr);
    double s = 0.0;
    {
        // Safe to release the GIL: the buffers stay alive through the py::buffer_info
        // objects held in this frame, and the loop touches no Python object.
        py::gil_scoped_release release;
        if (k == kF32) s = delta_kernel<kF32>(tp, bp, op, n);
        else if (k == kF16) s = delta_kernel<kF16>(tp, bp, op, n);
        else s = delta_kernel<kBF16>(tp, bp, op, n);
    }
    return s;
}

}  // namespace

void register_svd(py::module_& m) {
    m.def("delta_tile", &delta_tile, py::arg("t"), py::arg("b"), py::arg("out"), py::arg("kind"),
          "out[:] = float32(t) - float32(b) (b may be None); returns the sum of squares (double).");
#ifdef AIOS_FAST_WITH_CUDA
    m.def("delta_tile_cuda",
          [](uintptr_t t, uintptr_t b, uintptr_t out, uintptr_t sumsq, int64_t n, const std::string& kind,
             uintptr_t stream) {
              const int k = kind_of(kind);
              int err = cuda::delta_tile(t, b, out, sumsq, n, k, stream);
              if (err != 0) throw std::runtime_error("delta_tile_cuda: CUDA launch failed with error " + std::to_string(err));
          },
          py::arg("t"), py::arg("b"), py::arg("out"), py::arg("sumsq"), py::arg("n"), py::arg("kind"),
          py::arg("stream"),
          "Device pointers: out = f32(t) - f32(b) (b may be 0), atomically adds the sum of squares "
          "to the float64 at sumsq; enqueued on `stream`.");
#endif
}

}  // namespace aios
