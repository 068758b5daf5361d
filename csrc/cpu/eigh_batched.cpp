// eigh_batched on the CPU: LAPACK (ATen's linalg_eigh, lower triangle) per matrix, the matrices
// dealt out to the threads largest first, round robin, so that one big factor does not leave the
// other threads idle behind a block of small ones. A result that fails or is not finite is redone
// in float64 and cast back; one that still fails is NaN, for the caller to keep an earlier one.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

#include "eigh_batched.h"

namespace natgrad {
namespace cpu_kernels {
namespace {

bool try_eigh(const at::Tensor& M, at::Tensor* w, at::Tensor* v) {
  if (!at::isfinite(M).all().item<bool>()) return false;
  try {
    std::tie(*w, *v) = at::linalg_eigh(M, "L");
  } catch (const c10::Error&) {  // LAPACK did not converge
    return false;
  }
  *v = v->contiguous();  // LAPACK's column-major result as a plain row-major matrix, on every path
  return at::isfinite(*w).all().item<bool>() && at::isfinite(*v).all().item<bool>();
}

void solve(const at::Tensor& M, at::Tensor* w, at::Tensor* v) {
  if (try_eigh(M, w, v)) return;
  if (M.scalar_type() != at::kDouble && try_eigh(M.to(at::kDouble), w, v)) {
    *w = w->to(M.scalar_type());
    *v = v->to(M.scalar_type());
    return;
  }
  *w = at::full({M.size(0)}, std::numeric_limits<double>::quiet_NaN(), M.options());
  *v = at::full_like(M, std::numeric_limits<double>::quiet_NaN());
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> eigh_batched(at::TensorList mats) {
  eigh_batched::check_mats(mats);
  const int64_t count = static_cast<int64_t>(mats.size());
  std::vector<at::Tensor> evals(count), evecs(count);
  std::vector<int64_t> order(count);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(),
                   [&](int64_t a, int64_t b) { return mats[a].size(0) > mats[b].size(0); });
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), count));
  at::parallel_for(0, threads, 1, [&](int64_t begin, int64_t end) {
    for (int64_t t = begin; t < end; ++t)
      for (int64_t k = t; k < count; k += threads) solve(mats[order[k]], &evals[order[k]], &evecs[order[k]]);
  });
  return {evals, evecs};
}

}  // namespace

TORCH_LIBRARY_IMPL(natgrad, CPU, m) { m.impl("eigh_batched", &eigh_batched); }

}  // namespace cpu_kernels
}  // namespace natgrad
