// damped_inverse on CUDA: the matrices grouped by size and dtype; per group, S = sym(lower(F)) +
// shift I for all of them at once (a handful of batched torch ops, not a handful per matrix; S is
// symmetric, so its row-major copy is also column-major), then per matrix cusolverDnXpotrf (lower)
// and cusolverDnXpotrs with B = I, which leaves S^-1 in B (one workspace for the group's calls,
// which run one after the other on the stream); the lower triangle, mirrored, is the result
// (exactly symmetric). Whether each factorisation succeeded (info, a finite factor) and its inverse
// is finite is read for all matrices with one host synchronisation; the failures are redone in
// float64, whose own failure becomes NaN on the device (no second synchronisation).
#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <map>
#include <utility>
#include <vector>

#include "cuda/runtime.h"
#include "cuda/solver.h"
#include "damped_inverse.h"

namespace natgrad {
namespace NATGRAD_KERNEL_NS {
namespace {

cudaDataType solver_type(at::ScalarType t) { return t == at::kDouble ? CUDA_R_64F : CUDA_R_32F; }

// (F_b + shift_b I)^-1 for equal-sized matrices F (B, n, n) of one dtype, in that dtype, and (B,)
// bools on the device: factorisation succeeded and the inverse is finite.
std::pair<at::Tensor, at::Tensor> cholesky_inverses(const at::Tensor& F, const std::vector<double>& shifts,
                                                    const SolverParams& params) {
  const int64_t batch = F.size(0), n = F.size(1);
  at::Tensor S = F.tril();
  S.add_(S.tril(-1).mT());
  const at::Tensor shift = at::tensor(shifts, at::TensorOptions().dtype(at::kDouble)).to(S.options());
  S.diagonal(0, 1, 2).add_(shift.unsqueeze(1));
  at::Tensor B = at::eye(n, S.options()).expand({batch, n, n}).contiguous();
  at::Tensor info = at::zeros({batch, 2}, S.options().dtype(at::kInt));  // potrf's, potrs'
  const cudaDataType t = solver_type(S.scalar_type());
  const cusolverDnHandle_t h = solver_handle();
  size_t dev_bytes = 0, host_bytes = 0;
  NATGRAD_CUSOLVER_CHECK(cusolverDnXpotrf_bufferSize(h, params.params, CUBLAS_FILL_MODE_LOWER, n, t, S[0].data_ptr(),
                                                     n, t, &dev_bytes, &host_bytes));
  at::Tensor dev_work = at::empty({static_cast<int64_t>(std::max<size_t>(dev_bytes, 1))},
                                  S.options().dtype(at::kByte));
  std::vector<char> host_work(std::max<size_t>(host_bytes, 1));
  for (int64_t b = 0; b < batch; ++b) {
    void* s = S[b].data_ptr();
    int* info_ptr = info[b].data_ptr<int>();
    NATGRAD_CUSOLVER_CHECK(cusolverDnXpotrf(h, params.params, CUBLAS_FILL_MODE_LOWER, n, t, s, n, t,
                                            dev_work.data_ptr(), dev_bytes, host_work.data(), host_bytes, info_ptr));
    // After a failed factorisation this solves with garbage; its result is dropped by the flag.
    NATGRAD_CUSOLVER_CHECK(cusolverDnXpotrs(h, params.params, CUBLAS_FILL_MODE_LOWER, n, n, t, s, n, t,
                                            B[b].data_ptr(), n, info_ptr + 1));
  }
  // B holds S^-1 column-major, i.e. its transpose row-major: the same matrix up to rounding.
  at::Tensor X = B.tril();
  X.add_(X.tril(-1).mT());
  // A finite factor too (S holds it in one triangle, the finite input in the other), as on the CPU:
  // an infinite diagonal entry factors "successfully" into a finite but wrong inverse.
  const at::Tensor ok = info.eq(0).all(1).logical_and_(at::isfinite(S).flatten(1).all(1))
                            .logical_and_(at::isfinite(X).flatten(1).all(1));
  return {X, ok};
}

std::vector<at::Tensor> damped_inverse(at::TensorList mats, at::ArrayRef<double> shifts) {
  damped_inverse::check_args(mats, shifts);
  const size_t count = mats.size();
  std::vector<at::Tensor> out(count);
  if (count == 0) return out;
  const DeviceGuard guard(mats[0].device());
  const SolverParams params;

  std::map<std::pair<int64_t, int>, std::vector<size_t>> groups;
  for (size_t i = 0; i < count; ++i) {
    if (mats[i].size(0) == 0)
      out[i] = at::empty({0, 0}, mats[i].options());
    else
      groups[{mats[i].size(0), static_cast<int>(mats[i].scalar_type())}].push_back(i);
  }
  if (groups.empty()) return out;

  std::vector<size_t> which;  // matrix of each flag
  std::vector<at::Tensor> flags;
  for (const auto& [key, idx] : groups) {
    std::vector<at::Tensor> part;
    std::vector<double> shift;
    for (const size_t i : idx) {
      part.push_back(mats[i]);
      shift.push_back(shifts[i]);
    }
    auto [X, ok] = cholesky_inverses(at::stack(part), shift, params);
    for (size_t k = 0; k < idx.size(); ++k) out[idx[k]] = X[static_cast<int64_t>(k)];
    flags.push_back(ok);
    which.insert(which.end(), idx.begin(), idx.end());
  }

  // One synchronisation for all: redo the failures in float64.
  const at::Tensor ok = at::cat(flags).cpu();
  const bool* okp = ok.data_ptr<bool>();
  for (size_t w = 0; w < which.size(); ++w) {
    if (okp[w]) continue;
    const size_t i = which[w];
    const double nan = std::numeric_limits<double>::quiet_NaN();
    if (mats[i].scalar_type() == at::kDouble) {
      out[i] = at::full_like(out[i], nan);  // a fresh tensor: the group's others stay as they are
      continue;
    }
    auto [X, ok64] = cholesky_inverses(mats[i].to(at::kDouble).unsqueeze(0), {shifts[i]}, params);
    out[i] = at::where(ok64[0], X[0], at::full({}, nan, X.options())).to(mats[i].scalar_type());
  }
  return out;
}

}  // namespace

NATGRAD_CUDA_IMPL(natgrad, m) { m.impl("damped_inverse", &damped_inverse); }

}  // namespace NATGRAD_KERNEL_NS
}  // namespace natgrad
