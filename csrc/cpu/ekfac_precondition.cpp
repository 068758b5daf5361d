// ekfac_precondition on the CPU: per layer two GEMMs into the eigenbases, the division by the damped
// scaling S + lambda fused into one pass over the rotated gradient, two GEMMs back. Layers are
// balanced over the cores by their multiply-adds (schedule.h), as in precondition.cpp.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "ekfac_precondition.h"
#include "schedule.h"

namespace natgrad {
namespace cpu_kernels {
namespace {

at::Tensor one_layer(const at::Tensor& grad, const at::Tensor& QA, const at::Tensor& QG, const at::Tensor& S,
                     double damping) {
  at::Tensor V = at::mm(at::mm(QG.t(), grad.to(QA.scalar_type())), QA).contiguous();
  AT_DISPATCH_FLOATING_TYPES(QA.scalar_type(), "ekfac_precondition", [&] {
    // The pass below indexes S densely: a strided (or expanded) view is copied first.
    const at::Tensor s = S.contiguous();
    const scalar_t* sp = s.data_ptr<scalar_t>();
    scalar_t* v = V.data_ptr<scalar_t>();
    const int64_t count = V.numel();
    for (int64_t e = 0; e < count; ++e) v[e] /= ekfac_precondition::denominator(sp[e], damping);
  });
  return at::mm(at::mm(QG, V), QA.t()).to(grad.scalar_type());
}

std::vector<at::Tensor> ekfac_precondition_op(at::TensorList grads, at::TensorList QA, at::TensorList QG,
                                              at::TensorList S, double damping) {
  ekfac_precondition::check_args(grads, QA, QG, S, damping);
  const int64_t n = static_cast<int64_t>(grads.size());
  std::vector<at::Tensor> out(n);
  std::vector<double> work(n);
  for (int64_t i = 0; i < n; ++i) {
    const double o = static_cast<double>(grads[i].size(0)), k = static_cast<double>(grads[i].size(1));
    work[i] = o * k * (o + k);  // the four GEMMs
  }
  run_balanced(work, [&](int64_t i) { out[i] = one_layer(grads[i], QA[i], QG[i], S[i], damping); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(natgrad, CPU, m) { m.impl("ekfac_precondition", &ekfac_precondition_op); }

}  // namespace cpu_kernels
}  // namespace natgrad
