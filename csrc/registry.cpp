// The op schemas (registered once, here) and the pybind11 module natgrad_cuda._C (build info).
// Kernels register their implementations per dispatch key next to their code:
// csrc/cpu/<op>.cpp (CPU) and csrc/cuda/<op>.cu (CUDA).
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <sstream>
#include <string>

#include "emu/counters.h"
#include "schemas.h"

namespace py = pybind11;

TORCH_LIBRARY(natgrad, m) {
  for (const char* schema : natgrad::kOpSchemas) m.def(schema);
}
TORCH_LIBRARY(natgrad_emu, m) {
  for (const char* schema : natgrad::kOpSchemas) m.def(schema);
}
TORCH_LIBRARY(natgrad_testing, m) {
  for (const char* schema : natgrad::kTestingSchemas) m.def(schema);
}
TORCH_LIBRARY(natgrad_testing_emu, m) {
  for (const char* schema : natgrad::kTestingSchemas) m.def(schema);
}

namespace {

py::dict build_info() {
  py::dict info;
  info["version"] = NATGRAD_VERSION;
  info["torch"] = NATGRAD_TORCH_VERSION;
  py::list backends;
  backends.append("cpu");
  backends.append("emulated");
#ifdef NATGRAD_WITH_CUDA
  backends.append("cuda");
  info["cuda_version"] = NATGRAD_CUDA_VERSION;
  py::list archs;
  std::stringstream ss(NATGRAD_CUDA_ARCHS);
  for (std::string a; std::getline(ss, a, ',');) archs.append(a);
  info["cuda_archs"] = archs;
#else
  info["cuda_version"] = py::none();
  info["cuda_archs"] = py::list();
#endif
  info["backends"] = backends;
  info["compiler"] = __VERSION__;
  return info;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "natgrad_cuda compiled kernels; the ops live in torch.ops.natgrad (natgrad_emu: emulated CUDA)";
  m.def("build_info", &build_info, "What this extension was built with and for");
  m.def("emulation_counters", [] {
    const natgrad::emu::Counters c = natgrad::emu::counters();
    py::dict by_name;
    for (const auto& [name, n] : c.by_name) by_name[py::str(name)] = n;
    py::dict out;
    out["launches"] = c.launches;
    out["library_calls"] = c.library_calls;
    out["by_name"] = by_name;
    return out;
  }, "Kernel launches and library calls made by the emulated CUDA backend since the last reset");
  m.def("reset_emulation_counters", &natgrad::emu::reset_counters);
}
