// The op schemas (registered once, here) and the pybind11 module natgrad_cuda._C (build info).
// Kernels register their implementations per dispatch key next to their code:
// csrc/cpu/<op>.cpp (CPU) and csrc/cuda/<op>.cu (CUDA).
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/GradMode.h>
#include <pybind11/pybind11.h>
#include <torch/library.h>

#include <atomic>
#include <sstream>
#include <string>
#include <vector>

#include "emu/control.h"
#include "library_gemms.h"
#include "schemas.h"

namespace py = pybind11;

namespace {

void define_ops(torch::Library& m) {
  for (const char* schema : natgrad::kOpSchemas) {
    const std::string text(schema), name = text.substr(0, text.find('('));
    std::vector<at::Tag> tags;
    for (const char* op : natgrad::kHostSyncOps)
      if (name == op) tags.push_back(at::Tag::cudagraph_unsafe);
    m.def(schema, static_cast<const std::vector<at::Tag>&>(tags));  // not the (schema, kernel) overload
  }
}

}  // namespace

TORCH_LIBRARY(natgrad, m) { define_ops(m); }
TORCH_LIBRARY(natgrad_emu, m) { define_ops(m); }
namespace {

// The ops have no derivatives. Without an Autograd kernel torch's fallback would differentiate
// through whatever the kernel does inside (a silently wrong gradient) and let the in-place ops
// write into autograd's leaves, so a tensor that requires grad while grad mode is on is refused;
// otherwise the call goes straight on to the CPU or CUDA kernel.
void refuse_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys, torch::jit::Stack* stack) {
  if (c10::GradMode::is_enabled()) {
    const auto& args = op.schema().arguments();
    const size_t first = stack->size() - args.size();
    for (size_t i = 0; i < args.size(); ++i) {
      const c10::IValue& v = (*stack)[first + i];
      bool requires_grad = v.isTensor() && v.toTensor().requires_grad();
      if (v.isTensorList()) {
        const auto list = v.toTensorList();
        for (size_t k = 0; k < list.size(); ++k) requires_grad = requires_grad || list.get(k).requires_grad();
      }
      TORCH_CHECK(!requires_grad, op.schema().name(), ": argument '", args[i].name(),
                  "' requires grad, and the op has no derivative: pass detached tensors or call it under "
                  "torch.no_grad()");
    }
  }
  at::AutoDispatchBelowADInplaceOrView below_autograd;
  op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
}

void register_autograd_guards(torch::Library& m) {
  for (const char* schema : natgrad::kOpSchemas) {
    const std::string text(schema);
    m.impl(text.substr(0, text.find('(')).c_str(), torch::CppFunction::makeFromBoxedFunction<&refuse_autograd>());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(natgrad, Autograd, m) { register_autograd_guards(m); }
TORCH_LIBRARY_IMPL(natgrad_emu, Autograd, m) { register_autograd_guards(m); }

TORCH_LIBRARY(natgrad_testing, m) {
  for (const char* schema : natgrad::kTestingSchemas) m.def(schema);
}
TORCH_LIBRARY(natgrad_testing_emu, m) {
  for (const char* schema : natgrad::kTestingSchemas) m.def(schema);
}

namespace natgrad {
namespace {
std::atomic<int64_t> g_min_macs{LibraryGemms{}.min_macs};
std::atomic<int> g_precision{static_cast<int>(LibraryGemms{}.precision)};
}  // namespace

LibraryGemms library_gemms() {
  LibraryGemms s;
  s.min_macs = g_min_macs.load();
  s.precision = static_cast<GemmPrecision>(g_precision.load());
  return s;
}

void set_library_gemms(const LibraryGemms& s) {
  g_min_macs.store(s.min_macs);
  g_precision.store(static_cast<int>(s.precision));
}
}  // namespace natgrad

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
    out["barriers"] = c.barriers;
    out["uploads"] = c.uploads;
    out["by_name"] = by_name;
    return out;
  }, "Kernel launches and library calls made by the emulated CUDA backend since the last reset");
  m.def("reset_emulation_counters", &natgrad::emu::reset_counters);
  m.def("emulation_checks", [] {
    const natgrad::emu::Checks c = natgrad::emu::checks();
    return py::make_tuple(c.schedule, c.seed, c.races);
  }, "The emulated launches' schedule, its seed, and whether races are detected");
  m.def("set_emulation_checks", [](const std::string& schedule, uint64_t seed, bool races) {
    natgrad::emu::set_checks(natgrad::emu::Checks{schedule, seed, races});
  }, py::arg("schedule"), py::arg("seed"), py::arg("races"));
  m.def("library_gemms", [] {
    const natgrad::LibraryGemms s = natgrad::library_gemms();
    return py::make_tuple(s.min_macs, static_cast<int>(s.precision));
  }, "Which products go to cuBLAS (min_macs, -1: by precision) and their precision code (library_gemms.h)");
  m.def("set_library_gemms", [](int64_t min_macs, int precision) {
    TORCH_CHECK(min_macs >= natgrad::kAuto && precision >= 0 && precision <= 3, "set_library_gemms: bad setting");
    natgrad::set_library_gemms(natgrad::LibraryGemms{min_macs, static_cast<natgrad::GemmPrecision>(precision)});
  }, py::arg("min_macs"), py::arg("precision"));
}
