// damped_inverse on CUDA: per matrix, S = sym(lower(F)) + shift I in a fresh workspace (symmetric,
// so its row-major copy is also column-major), cusolverDnXpotrf (lower) and cusolverDnXpotrs with
// B = I, which leaves S^-1 in B; the lower triangle, mirrored, is the result (exactly symmetric).
// Whether each factorisation succeeded (info, a finite factor) and its inverse is finite is read
// for all matrices with one host synchronisation; the failures are redone in float64, whose own
// failure becomes NaN on the device (no second synchronisation).
#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <utility>
#include <vector>

#include "cuda/runtime.h"
#include "cuda/solver.h"
#include "damped_inverse.h"

namespace natgrad {
namespace NATGRAD_KERNEL_NS {
namespace {

cudaDataType solver_type(at::ScalarType t) { return t == at::kDouble ? CUDA_R_64F : CUDA_R_32F; }

// (F + shift I)^-1 in F's dtype, and a 0-d bool on the device: factorisation succeeded and the
// inverse is finite.
std::pair<at::Tensor, at::Tensor> cholesky_inverse(const at::Tensor& F, double shift, const SolverParams& params) {
  const int64_t n = F.size(0);
  at::Tensor S = (F.tril() + F.tril(-1).t()).contiguous();
  S.diagonal().add_(shift);
  at::Tensor B = at::eye(n, S.options());
  at::Tensor info = at::zeros({2}, S.options().dtype(at::kInt));  // potrf's, potrs'
  const cudaDataType t = solver_type(S.scalar_type());
  const cusolverDnHandle_t h = solver_handle();
  size_t dev_bytes = 0, host_bytes = 0;
  void* s = S.data_ptr();
  NATGRAD_CUSOLVER_CHECK(cusolverDnXpotrf_bufferSize(h, params.params, CUBLAS_FILL_MODE_LOWER, n, t, s, n, t,
                                                     &dev_bytes, &host_bytes));
  at::Tensor dev_work = at::empty({static_cast<int64_t>(std::max<size_t>(dev_bytes, 1))},
                                  S.options().dtype(at::kByte));
  std::vector<char> host_work(std::max<size_t>(host_bytes, 1));
  int* info_ptr = info.data_ptr<int>();
  NATGRAD_CUSOLVER_CHECK(cusolverDnXpotrf(h, params.params, CUBLAS_FILL_MODE_LOWER, n, t, s, n, t,
                                          dev_work.data_ptr(), dev_bytes, host_work.data(), host_bytes, info_ptr));
  // After a failed factorisation this solves with garbage; its result is dropped by the flag.
  NATGRAD_CUSOLVER_CHECK(cusolverDnXpotrs(h, params.params, CUBLAS_FILL_MODE_LOWER, n, n, t, s, n, t, B.data_ptr(),
                                          n, info_ptr + 1));
  // B holds S^-1 column-major, i.e. its transpose row-major: the same matrix up to rounding.
  at::Tensor X = B.tril();
  X += X.tril(-1).t();
  // A finite factor too (S holds it in one triangle, the finite input in the other), as on the CPU:
  // an infinite diagonal entry factors "successfully" into a finite but wrong inverse.
  at::Tensor ok = info.eq(0).all().logical_and(at::isfinite(S).all()).logical_and(at::isfinite(X).all());
  return {X, ok};
}

std::vector<at::Tensor> damped_inverse(at::TensorList mats, at::ArrayRef<double> shifts) {
  damped_inverse::check_args(mats, shifts);
  const size_t count = mats.size();
  std::vector<at::Tensor> out(count);
  if (count == 0) return out;
  const DeviceGuard guard(mats[0].device());
  const SolverParams params;

  std::vector<size_t> which;
  std::vector<at::Tensor> flags;
  for (size_t i = 0; i < count; ++i) {
    if (mats[i].size(0) == 0) {
      out[i] = at::empty({0, 0}, mats[i].options());
      continue;
    }
    auto [X, ok] = cholesky_inverse(mats[i], shifts[i], params);
    out[i] = X;
    flags.push_back(ok);
    which.push_back(i);
  }
  if (which.empty()) return out;

  // One synchronisation for all: redo the failures in float64.
  const at::Tensor ok = at::stack(flags).cpu();
  const bool* okp = ok.data_ptr<bool>();
  for (size_t w = 0; w < which.size(); ++w) {
    if (okp[w]) continue;
    const size_t i = which[w];
    const double nan = std::numeric_limits<double>::quiet_NaN();
    if (mats[i].scalar_type() == at::kDouble) {
      out[i].fill_(nan);
      continue;
    }
    auto [X, ok64] = cholesky_inverse(mats[i].to(at::kDouble), shifts[i], params);
    out[i] = at::where(ok64, X, at::full({}, nan, X.options())).to(mats[i].scalar_type());
  }
  return out;
}

}  // namespace

NATGRAD_CUDA_IMPL(natgrad, m) { m.impl("damped_inverse", &damped_inverse); }

}  // namespace NATGRAD_KERNEL_NS
}  // namespace natgrad
