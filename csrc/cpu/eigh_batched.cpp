// eigh_batched on the CPU: LAPACK (ATen's linalg_eigh, lower triangle) per matrix, in parallel over
// the matrices. A result that fails or is not finite is redone
// in float64 and cast back; one that still fails is NaN, for the caller to keep an earlier one.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <ATen/Dispatch.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <numeric>
#include <tuple>
#include <vector>

#include "eigh_batched.h"

namespace natgrad {
namespace cpu_kernels {
namespace {

// Finite entries only: x * 0 is 0 for a finite x and NaN otherwise, summed without a branch
// (ATen's isfinite().all().item() costs more than the check itself).
bool all_finite(const at::Tensor& t) {
  const at::Tensor c = t.is_contiguous() || t.t().is_contiguous() ? t : t.contiguous();  // any dense layout
  return AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "eigh_batched", [&] {
    const scalar_t* p = c.data_ptr<scalar_t>();
    scalar_t s = 0;
    for (int64_t i = 0; i < c.numel(); ++i) s += p[i] * scalar_t(0);
    return s == scalar_t(0);
  });
}

bool try_eigh(const at::Tensor& M, at::Tensor* w, at::Tensor* v) {
  if (!all_finite(M)) return false;
  try {
    std::tie(*w, *v) = at::linalg_eigh(M, "L");
  } catch (const c10::Error&) {  // LAPACK did not converge
    return false;
  }
  // v stays in LAPACK's column-major layout, as on every path; LAPACK gives finite eigenvectors
  // whenever the eigenvalues are.
  return all_finite(*w);
}

void solve(const at::Tensor& M, at::Tensor* w, at::Tensor* v) {
  if (try_eigh(M, w, v)) return;
  if (M.scalar_type() != at::kDouble && try_eigh(M.to(at::kDouble), w, v)) {
    *w = w->to(M.scalar_type());
    *v = v->to(M.scalar_type()).t().contiguous().t();
    return;
  }
  *w = at::full({M.size(0)}, std::numeric_limits<double>::quiet_NaN(), M.options());
  *v = at::full({M.size(0), M.size(0)}, std::numeric_limits<double>::quiet_NaN(), M.options()).t();
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> eigh_batched(at::TensorList mats) {
  eigh_batched::check_mats(mats);
  const int64_t count = static_cast<int64_t>(mats.size());
  std::vector<at::Tensor> evals(count), evecs(count);
  // Largest first. A matrix whose work (n^3) exceeds an even share of all that is left cannot be
  // balanced against the others: it runs alone on all threads (LAPACK's threaded BLAS; digits CNN,
  // 513 wide beside small ones: 9.2 ms on two threads against 12.9 ms on one). The rest go parallel
  // over matrices, each on one thread, dealt to the least loaded thread, which beats one call at a
  // time on all threads (LAPACK's eigensolvers scale poorly).
  std::vector<int64_t> order(count);
  std::iota(order.begin(), order.end(), 0);
  std::stable_sort(order.begin(), order.end(), [&](int64_t a, int64_t b) { return mats[a].size(0) > mats[b].size(0); });
  auto work = [&](int64_t i) { return std::pow(static_cast<double>(mats[i].size(0)), 3.0); };
  const int64_t threads = std::max<int64_t>(1, at::get_num_threads());
  double left = 0;
  for (int64_t i = 0; i < count; ++i) left += work(i);
  int64_t first = 0;
  while (first < count && (count - first == 1 || threads == 1 || work(order[first]) * threads > left)) {
    solve(mats[order[first]], &evals[order[first]], &evecs[order[first]]);
    left -= work(order[first++]);
  }
  if (first == count) return {evals, evecs};
  const int64_t lanes = std::min<int64_t>(threads, count - first);
  std::vector<std::vector<int64_t>> lane(lanes);
  std::vector<double> load(lanes, 0.0);
  for (int64_t k = first; k < count; ++k) {
    const int64_t l = std::min_element(load.begin(), load.end()) - load.begin();
    lane[l].push_back(order[k]);
    load[l] += work(order[k]);
  }
  at::parallel_for(0, lanes, 1, [&](int64_t begin, int64_t end) {
    for (int64_t l = begin; l < end; ++l)
      for (int64_t i : lane[l]) solve(mats[i], &evals[i], &evecs[i]);
  });
  return {evals, evecs};
}

}  // namespace

TORCH_LIBRARY_IMPL(natgrad, CPU, m) { m.impl("eigh_batched", &eigh_batched); }

}  // namespace cpu_kernels
}  // namespace natgrad
