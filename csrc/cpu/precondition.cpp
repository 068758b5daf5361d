// precondition on the CPU: per layer two GEMMs into the eigenbases, the division by the damped
// eigenvalue products fused into one pass over the rotated gradient, two GEMMs back. Layers are
// balanced over the cores by their multiply-adds (schedule.h): a layer too big to balance runs
// alone with multi-threaded BLAS, the others in parallel, each GEMM single-threaded (digits MLP
// 64-128-128-128-10: 295 us one layer at a time on two threads, about 180 us balanced). Low-rank
// layers (precondition.h) take four GEMMs too, the weights fused into one pass over a product.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include <vector>

#include "precondition.h"
#include "schedule.h"

namespace natgrad {
namespace cpu_kernels {
namespace {

precondition::Damping damping_of(const at::Tensor& dA, const at::Tensor& dG, int64_t dim_a, int64_t dim_g,
                                  double damping, bool factored) {
  if (!factored) return precondition::exact(damping);
  return AT_DISPATCH_FLOATING_TYPES(dA.scalar_type(), "precondition", [&] {
    const at::Tensor a = dA.contiguous(), g = dG.contiguous();
    const scalar_t* da = a.data_ptr<scalar_t>();
    const scalar_t* dg = g.data_ptr<scalar_t>();
    scalar_t ma = 0, mg = 0;
    for (int64_t j = 0; j < a.numel(); ++j) ma += da[j];
    for (int64_t i = 0; i < g.numel(); ++i) mg += dg[i];
    return precondition::factored<scalar_t>(dim_a ? ma / dim_a : 0, dim_g ? mg / dim_g : 0, damping);
  });
}

at::Tensor one_layer(const at::Tensor& grad, const at::Tensor& QA, const at::Tensor& dA, const at::Tensor& QG,
                     const at::Tensor& dG, double damping, bool factored) {
  at::Tensor V = at::mm(at::mm(QG.t(), grad.to(QA.scalar_type())), QA).contiguous();
  AT_DISPATCH_FLOATING_TYPES(QA.scalar_type(), "precondition", [&] {
    const at::Tensor a = dA.contiguous(), g = dG.contiguous();
    const scalar_t* da = a.data_ptr<scalar_t>();
    const scalar_t* dg = g.data_ptr<scalar_t>();
    const int64_t o = V.size(0), k = V.size(1);
    const precondition::Damping d = damping_of(dA, dG, k, o, damping, factored);
    scalar_t* v = V.data_ptr<scalar_t>();
    for (int64_t i = 0; i < o; ++i)
      for (int64_t j = 0; j < k; ++j) v[i * k + j] /= precondition::denominator(dg[i], da[j], d);
  });
  return at::mm(at::mm(QG, V), QA.t()).to(grad.scalar_type());
}

// Low rank, exact damping: P = M / lambda + QG [(QG^T M QA) * W] QA^T.
at::Tensor one_layer_low_rank_exact(const at::Tensor& grad, const at::Tensor& QA, const at::Tensor& dA,
                                    const at::Tensor& QG, const at::Tensor& dG, double damping) {
  const at::Tensor M = grad.to(QA.scalar_type());
  at::Tensor V = at::mm(at::mm(QG.t(), M), QA).contiguous();
  AT_DISPATCH_FLOATING_TYPES(QA.scalar_type(), "precondition", [&] {
    const at::Tensor a = dA.contiguous(), g = dG.contiguous();
    const scalar_t* da = a.data_ptr<scalar_t>();
    const scalar_t* dg = g.data_ptr<scalar_t>();
    const int64_t rg = V.size(0), ra = V.size(1);
    const precondition::Damping d = precondition::exact(damping);
    scalar_t* v = V.data_ptr<scalar_t>();
    for (int64_t i = 0; i < rg; ++i)
      for (int64_t j = 0; j < ra; ++j) v[i * ra + j] *= precondition::low_rank_weight(dg[i], da[j], d);
  });
  return (at::mm(at::mm(QG, V), QA.t()) + M / damping).to(grad.scalar_type());
}

// Low rank, factored damping: T = M S_A = M / gA + (M QA) diag(wA) QA^T, P = S_G T = T / gG + QG diag(wG) QG^T T.
at::Tensor one_layer_low_rank_factored(const at::Tensor& grad, const at::Tensor& QA, const at::Tensor& dA,
                                       const at::Tensor& QG, const at::Tensor& dG, double damping) {
  const at::Tensor M = grad.to(QA.scalar_type());
  const precondition::Damping d = damping_of(dA, dG, M.size(1), M.size(0), damping, true);
  at::Tensor U = at::mm(M, QA).contiguous();
  at::Tensor T, Y;
  AT_DISPATCH_FLOATING_TYPES(QA.scalar_type(), "precondition", [&] {
    const at::Tensor a = dA.contiguous(), g = dG.contiguous();
    const scalar_t* da = a.data_ptr<scalar_t>();
    const scalar_t* dg = g.data_ptr<scalar_t>();
    const int64_t o = U.size(0), ra = U.size(1);
    scalar_t* u = U.data_ptr<scalar_t>();
    for (int64_t i = 0; i < o; ++i)
      for (int64_t j = 0; j < ra; ++j) u[i * ra + j] *= precondition::shift_weight(da[j], d.gA);
    T = at::mm(U, QA.t()) + M / scalar_t(d.gA);
    Y = at::mm(QG.t(), T).contiguous();
    const int64_t rg = Y.size(0), k = Y.size(1);
    scalar_t* y = Y.data_ptr<scalar_t>();
    for (int64_t i = 0; i < rg; ++i) {
      const scalar_t w = precondition::shift_weight(dg[i], d.gG);
      for (int64_t j = 0; j < k; ++j) y[i * k + j] *= w;
    }
  });
  return (at::mm(QG, Y) + T / d.gG).to(grad.scalar_type());
}

std::vector<at::Tensor> precondition_op(at::TensorList grads, at::TensorList QA, at::TensorList dA,
                                        at::TensorList QG, at::TensorList dG, double damping, bool factored) {
  precondition::check_args(grads, QA, dA, QG, dG, damping);
  const int64_t n = static_cast<int64_t>(grads.size());
  std::vector<at::Tensor> out(n);
  std::vector<double> work(n);
  for (int64_t i = 0; i < n; ++i) {
    const double o = static_cast<double>(grads[i].size(0)), k = static_cast<double>(grads[i].size(1));
    const double ra = static_cast<double>(QA[i].size(1)), rg = static_cast<double>(QG[i].size(1));
    work[i] = o * k * (ra + rg);  // the four GEMMs (at full rank; a bound at low rank)
  }
  run_balanced(work, [&](int64_t i) {
    if (!precondition::low_rank(QA[i], QG[i]))
      out[i] = one_layer(grads[i], QA[i], dA[i], QG[i], dG[i], damping, factored);
    else if (!factored)
      out[i] = one_layer_low_rank_exact(grads[i], QA[i], dA[i], QG[i], dG[i], damping);
    else
      out[i] = one_layer_low_rank_factored(grads[i], QA[i], dA[i], QG[i], dG[i], damping);
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(natgrad, CPU, m) { m.impl("precondition", &precondition_op); }

}  // namespace cpu_kernels
}  // namespace natgrad
