// kron_matmul on the CPU: per layer two GEMMs, P = (IG M) IA in the factors' dtype. Layers are
// balanced over the cores by their multiply-adds (schedule.h), as in precondition.cpp.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <vector>

#include "kron_matmul.h"
#include "schedule.h"

namespace natgrad {
namespace cpu_kernels {
namespace {

std::vector<at::Tensor> kron_matmul(at::TensorList grads, at::TensorList IA, at::TensorList IG) {
  kron_matmul::check_args(grads, IA, IG);
  const int64_t n = static_cast<int64_t>(grads.size());
  std::vector<at::Tensor> out(n);
  std::vector<double> work(n);
  for (int64_t i = 0; i < n; ++i) {
    const double o = static_cast<double>(grads[i].size(0)), k = static_cast<double>(grads[i].size(1));
    work[i] = o * k * (o + k);  // the two GEMMs
  }
  run_balanced(work, [&](int64_t i) {
    out[i] = at::mm(at::mm(IG[i], grads[i].to(IA[i].scalar_type())), IA[i]).to(grads[i].scalar_type());
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(natgrad, CPU, m) { m.impl("kron_matmul", &kron_matmul); }

}  // namespace cpu_kernels
}  // namespace natgrad
