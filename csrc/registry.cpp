// The op schemas (registered once, here) and the pybind11 module natgrad_cuda._C (build info).
// Kernels register their implementations per dispatch key next to their code:
// csrc/cpu/<op>.cpp (CPU) and csrc/cuda/<op>.cu (CUDA).
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <sstream>
#include <string>

namespace py = pybind11;

TORCH_LIBRARY(natgrad, m) {
  m.def("factor_update_(Tensor(a!)[] factors, Tensor[] inputs, float decay, float[] scales, "
        "bool[] append_ones) -> ()");
}

namespace {

py::dict build_info() {
  py::dict info;
  info["version"] = NATGRAD_VERSION;
  info["torch"] = NATGRAD_TORCH_VERSION;
  py::list backends;
  backends.append("cpu");
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
  m.doc() = "natgrad_cuda compiled kernels; the ops live in torch.ops.natgrad";
  m.def("build_info", &build_info, "What this extension was built with and for");
}
