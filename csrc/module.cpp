// Table of contents of the private compiled module aios_fast._C.
// Each concept registers itself from its own source file.
#include <pybind11/pybind11.h>

#include "registry.h"

PYBIND11_MODULE(_C, m) {
    m.doc() = "aios_fast private kernels; use the validating Python API in aios_fast instead.";
    aios::register_build_info(m);
    aios::register_norms(m);
    aios::register_svd(m);
    aios::register_route(m);
    aios::register_card_layout(m);
}
