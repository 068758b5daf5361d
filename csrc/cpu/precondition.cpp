// precondition on the CPU: per layer two GEMMs into the eigenbases, the division by the damped
// eigenvalue products fused into one pass over the rotated gradient, two GEMMs back. Many small
// layers run in parallel over layers (each GEMM single-threaded); wide ones one after another with
// multi-threaded BLAS.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "precondition.h"

namespace natgrad {
namespace cpu_kernels {
namespace {

constexpr int64_t kParallelMaxDim = 128;  // layers up to this width go parallel over layers

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
  int64_t widest = 0;
  for (const at::Tensor& g : grads) widest = std::max({widest, g.size(0), g.size(1)});
  auto run = [&](int64_t i) { out[i] = one_layer(grads[i], QA[i], dA[i], QG[i], dG[i], damping, factored); };
  if (widest <= kParallelMaxDim && n > 1) {
    at::parallel_for(0, n, 1, [&](int64_t b, int64_t e) {
      for (int64_t i = b; i < e; ++i) run(i);
    });
  } else {
    for (int64_t i = 0; i < n; ++i) run(i);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(natgrad, CPU, m) { m.impl("precondition", &precondition_op); }

}  // namespace cpu_kernels
}  // namespace natgrad
