#include "registry.h"
namespace aios { void register_svd(pybind11::module_& m) {} }
