// damped_inverse on the CPU: LAPACK Cholesky (ATen's linalg_cholesky_ex, then cholesky_inverse) per
// matrix, in parallel over the matrices. A factorisation that fails or an inverse that is not finite
// is redone in float64 and cast back; one that still fails is NaN, for the caller to fall back on an
// eigendecomposition.
#include <ATen/ATen.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <tuple>
#include <vector>

#include "damped_inverse.h"
#include "finite.h"
#include "schedule.h"

namespace natgrad {
namespace cpu_kernels {
namespace {

bool try_inverse(const at::Tensor& F, double shift, at::Tensor* out) {
  at::Tensor S = F.tril() + F.tril(-1).t();  // symmetric from the lower triangle
  S.diagonal().add_(shift);
  at::Tensor L, info;
  std::tie(L, info) = at::linalg_cholesky_ex(S);
  if (info.item<int>() != 0 || !all_finite(L)) return false;
  *out = at::cholesky_inverse(L).contiguous();  // symmetric: either layout holds the same values
  return all_finite(*out);
}

at::Tensor solve(const at::Tensor& F, double shift) {
  at::Tensor out;
  if (try_inverse(F, shift, &out)) return out;
  if (F.scalar_type() != at::kDouble && try_inverse(F.to(at::kDouble), shift, &out)) return out.to(F.scalar_type());
  return at::full(F.sizes(), std::numeric_limits<double>::quiet_NaN(), F.options());
}

std::vector<at::Tensor> damped_inverse(at::TensorList mats, at::ArrayRef<double> shifts) {
  damped_inverse::check_args(mats, shifts);
  const int64_t count = static_cast<int64_t>(mats.size());
  std::vector<at::Tensor> out(count);
  // One LAPACK factorisation and inversion per matrix, balanced over the cores by n^3 (schedule.h).
  std::vector<double> work(count);
  for (int64_t i = 0; i < count; ++i) work[i] = std::pow(static_cast<double>(mats[i].size(0)), 3.0);
  run_balanced(work, [&](int64_t i) { out[i] = solve(mats[i], shifts[i]); });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(natgrad, CPU, m) { m.impl("damped_inverse", &damped_inverse); }

}  // namespace cpu_kernels
}  // namespace natgrad
