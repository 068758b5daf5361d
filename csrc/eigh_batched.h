// Shared pieces of eigh_batched: argument checks (CPU and CUDA entry points) and the math of the
// one-block-per-matrix Jacobi kernel (a plain function, so it reads the same on host and device).
//
// Every path reads the LOWER triangle only, as torch.linalg.eigh does, and returns eigenvalues in
// ascending order with orthonormal eigenvectors as columns.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "common.h"

namespace natgrad {
namespace eigh_batched {

inline void check_mats(at::TensorList mats) {
  for (size_t i = 0; i < mats.size(); ++i) {
    const at::Tensor& M = mats[i];
    TORCH_CHECK(M.dim() == 2 && M.size(0) == M.size(1), "eigh_batched: mats[", i,
                "] must be a square matrix, got shape ", M.sizes());
    TORCH_CHECK(M.scalar_type() == at::kFloat || M.scalar_type() == at::kDouble, "eigh_batched: mats[", i,
                "] must be float32 or float64, got ", M.scalar_type());
    TORCH_CHECK(M.device() == mats[0].device(), "eigh_batched: mats[", i, "] is on ", M.device(),
                ", mats[0] on ", mats[0].device());
  }
}

// The k-th of the m/2 disjoint pairs of round r (0 <= r < m - 1) of a cyclic sweep over m (even)
// indices, by the circle method: index 0 stays, 1..m-1 rotate; over the m - 1 rounds every pair
// meets exactly once.
NATGRAD_HOST_DEVICE inline void round_robin_pair(int r, int k, int m, int* p, int* q) {
  auto at = [&](int pos) { return pos == 0 ? 0 : 1 + (pos - 1 + r) % (m - 1); };
  *p = at(k);
  *q = at(m - 1 - k);
}

// The row stride of the Jacobi kernel's matrices in shared memory: odd, so that a warp reading down
// a column touches 32 different banks.
NATGRAD_HOST_DEVICE inline int jacobi_ld(int n) { return n | 1; }

// The Jacobi rotation (c, s) that zeroes a_pq when applied as A <- J^T A J with
// (J^T A)[p,:] = c A[p,:] - s A[q,:], (J^T A)[q,:] = s A[p,:] + c A[q,:] (and likewise on columns):
// t = s / c is the smaller root of t^2 + 2 theta t - 1 = 0, theta = (a_qq - a_pp) / (2 a_pq).
// Returns false, with the identity, when a_pq is negligible: |a_pq| <= eps sqrt(|a_pp a_qq|), the
// rule under which Jacobi's eigenvalues have small relative errors (Demmel and Veselic 1992); a
// sweep without a rotation has converged.
template <typename T>
NATGRAD_HOST_DEVICE inline bool jacobi_rotation(T app, T aqq, T apq, T* c, T* s) {
  *c = T(1);
  *s = T(0);
  if (!(std::fabs(apq) > std::numeric_limits<T>::epsilon() * std::sqrt(std::fabs(app) * std::fabs(aqq))))
    return false;
  const T theta = (aqq - app) / (T(2) * apq);
  const T t = (theta >= T(0) ? T(1) : T(-1)) / (std::fabs(theta) + std::sqrt(theta * theta + T(1)));
  *c = T(1) / std::sqrt(t * t + T(1));
  *s = t * *c;
  return true;
}

// How many matrices of order n each cusolverDnXsyevBatched call takes, for `count` of them: as many
// as keep batch * n^2 within `limit` elements, at least one per call.
inline std::vector<int64_t> solver_batches(int64_t count, int64_t n, int64_t limit) {
  const int64_t per_call = std::max<int64_t>(1, limit / std::max<int64_t>(1, n * n));
  std::vector<int64_t> calls;
  for (int64_t left = count; left > 0; left -= per_call) calls.push_back(std::min(left, per_call));
  return calls;
}

}  // namespace eigh_batched
}  // namespace natgrad
