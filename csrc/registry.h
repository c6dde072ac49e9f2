// One register_<concept>(m) per concept; module.cpp calls them all.
#pragma once
#include <pybind11/pybind11.h>

namespace aios {
void register_build_info(pybind11::module_& m);
void register_norms(pybind11::module_& m);
void register_svd(pybind11::module_& m);
void register_route(pybind11::module_& m);
void register_card_layout(pybind11::module_& m);
}  // namespace aios
