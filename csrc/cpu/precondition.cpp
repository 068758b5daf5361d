// precondition on the CPU: per layer two GEMMs into the eigenbases, the division by the damped
// eigenvalue products fused into one pass over the rotated gradient, two GEMMs back. Layers are
// balanced over the cores by their multiply-adds (schedule.h): a layer too big to balance runs
// alone with multi-threaded BLAS, the others in parallel, each GEMM single-threaded (digits MLP
// 64-128-128-128-10: 295 us one layer at a time on two threads, about 180 us balanced).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "precondition.h"
#include "schedule.h"

namespace natgrad {
namespace cpu_kernels {
namespace {

at::Tensor one_layer(const at::Tensor& grad, const at::Tensor& QA, const at::Tensor& dA, const at::Tensor& QG,
                     const at::Tensor& dG, double damping, bool factored) {
  at::Tensor V = at::mm(at::mm(QG.t(), grad.to(QA.scalar_type())), QA).contiguous();
  AT_DISPATCH_FLOATING_TYPES(QA.scalar_type(), "precondition", [&] {
    const at::Tensor a = dA.contiguous(), g = dG.contiguous();
    const scalar_t* da = a.data_ptr<scalar_t>();
    const scalar_t* dg = g.data_ptr<scalar_t>();
    const int64_t o = V.size(0), k = V.size(1);
    precondition::Damping d = precondition::exact(damping);
    if (factored) {
      scalar_t ma = 0, mg = 0;
      for (int64_t j = 0; j < k; ++j) ma += da[j];
      for (int64_t i = 0; i < o; ++i) mg += dg[i];
      d = precondition::factored<scalar_t>(k ? ma / k : 0, o ? mg / o : 0, damping);
    }
    scalar_t* v = V.data_ptr<scalar_t>();
    for (int64_t i = 0; i < o; ++i)
      for (int64_t j = 0; j < k; ++j) v[i * k + j] /= precondition::denominator(dg[i], da[j], d);
  });
  return at::mm(at::mm(QG, V), QA.t()).to(grad.scalar_type());
}

std::vector<at::Tensor> precondition_op(at::TensorList grads, at::TensorList QA, at::TensorList dA,
                                        at::TensorList QG, at::TensorList dG, double damping, bool factored) {
  precondition::check_args(grads, QA, dA, QG, dG, damping);
  const int64_t n = static_cast<int64_t>(grads.size());
  std::vector<at::Tensor> out(n);
  std::vector<double> work(n);
  for (int64_t i = 0; i < n; ++i) {
    const double o = static_cast<double>(grads[i].size(0)), k = static_cast<double>(grads[i].size(1));
    work[i] = o * k * (o + k);  // the four GEMMs
  }
  run_balanced(work, [&](int64_t i) { out[i] = one_layer(grads[i], QA[i], dA[i], QG[i], dG[i], damping, factored); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(natgrad, CPU, m) { m.impl("precondition", &precondition_op); }

}  // namespace cpu_kernels
}  // namespace natgrad
