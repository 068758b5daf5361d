// precondition: for every layer, P = QG [(QG^T M QA) / D] QA^T with D[i][j] the damped eigenvalue
// product. The math shared by the CPU and CUDA kernels: argument checks and the denominator.
//   exact damping (G (x) A + lambda I)^-1:           D = dG_i dA_j + lambda
//   factored Tikhonov damping, pi = sqrt(mean dA / mean dG) (1 if either is 0):
//     (G + sqrt(lambda)/pi I)^-1 (x) (A + pi sqrt(lambda) I)^-1:  D = (dG_i + sqrt(lambda)/pi)(dA_j + pi sqrt(lambda))
// Low rank: QA (in, rA) with rA < in or QG (out, rG) with rG < out keep the leading eigenpairs of a
// factor whose other eigenvalues are zero; pi's means are still over the full sizes (sum dA / in), and
//   exact:    P = M / lambda + QG [(QG^T M QA) * W] QA^T,  W[i][j] = 1/(dG_i dA_j + lambda) - 1/lambda
//   factored: P = S_G M S_A,  S = I/g + Q diag(1/(d + g) - 1/g) Q^T  (g = gA or gG, the side's shift)
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "common.h"

namespace natgrad {
namespace precondition {

inline void check_args(at::TensorList grads, at::TensorList QA, at::TensorList dA, at::TensorList QG,
                       at::TensorList dG, double damping) {
  const size_t n = grads.size();
  TORCH_CHECK(QA.size() == n && dA.size() == n && QG.size() == n && dG.size() == n,
              "precondition: grads, QA, dA, QG and dG must have the same length");
  TORCH_CHECK(std::isfinite(damping) && damping > 0, "precondition: damping must be finite and > 0, got ", damping);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& M = grads[i];
    TORCH_CHECK(M.dim() == 2, "precondition: grads[", i, "] must be 2-D (out, in), got ", M.sizes());
    const int64_t o = M.size(0), k = M.size(1);
    TORCH_CHECK(QA[i].dim() == 2 && QA[i].size(0) == k && QA[i].size(1) <= k && dA[i].dim() == 1 &&
                    dA[i].size(0) == QA[i].size(1),
                "precondition: QA[", i, "] must be (", k, ", r) with r <= ", k, " and dA[", i, "] (r), got ",
                QA[i].sizes(), " and ", dA[i].sizes());
    TORCH_CHECK(QG[i].dim() == 2 && QG[i].size(0) == o && QG[i].size(1) <= o && dG[i].dim() == 1 &&
                    dG[i].size(0) == QG[i].size(1),
                "precondition: QG[", i, "] must be (", o, ", r) with r <= ", o, " and dG[", i, "] (r), got ",
                QG[i].sizes(), " and ", dG[i].sizes());
    const auto t = QA[i].scalar_type();
    TORCH_CHECK((t == at::kFloat || t == at::kDouble) && dA[i].scalar_type() == t && QG[i].scalar_type() == t &&
                    dG[i].scalar_type() == t,
                "precondition: QA[", i, "], dA[", i, "], QG[", i, "] and dG[", i, "] must share one dtype, float32 or float64");
    const auto g = M.scalar_type();
    TORCH_CHECK(g == at::kFloat || g == at::kDouble || g == at::kBFloat16 || g == at::kHalf, "precondition: grads[",
                i, "] must be fp32, fp64, bf16 or fp16");
    for (const at::Tensor* x : {&QA[i], &dA[i], &QG[i], &dG[i]})
      TORCH_CHECK(x->device() == M.device() && M.device() == grads[0].device(), "precondition: the tensors of layer ",
                  i, " must all be on ", grads[0].device());
  }
}

// The shifts (gG, gA) added to the eigenvalues, and lambda added to their product.
struct Damping {
  double gG, gA, lambda;
};

NATGRAD_HOST_DEVICE inline Damping exact(double damping) { return {0.0, 0.0, damping}; }

template <typename T>
NATGRAD_HOST_DEVICE inline Damping factored(T mean_dA, T mean_dG, double damping) {
  const double pi = (mean_dA > T(0) && mean_dG > T(0)) ? std::sqrt(double(mean_dA) / double(mean_dG)) : 1.0;
  const double root = std::sqrt(damping);
  return {root / pi, pi * root, 0.0};
}

template <typename T>
NATGRAD_HOST_DEVICE inline T denominator(T dg, T da, const Damping& d) {
  return (dg + T(d.gG)) * (da + T(d.gA)) + T(d.lambda);
}

// Whether a layer takes the low-rank formulas (a full decomposition keeps the plain sandwich).
inline bool low_rank(const at::Tensor& QA, const at::Tensor& QG) {
  return QA.size(1) < QA.size(0) || QG.size(1) < QG.size(0);
}

// Low rank, exact damping: W[i][j], the kept pairs' weight beyond the 1/lambda of every direction.
template <typename T>
NATGRAD_HOST_DEVICE inline T low_rank_weight(T dg, T da, const Damping& d) {
  return T(1) / denominator(dg, da, d) - T(1) / T(d.lambda);
}

// Low rank, factored damping: a kept eigenvalue's weight in S = I/g + Q diag(1/(d + g) - 1/g) Q^T.
template <typename T>
NATGRAD_HOST_DEVICE inline T shift_weight(T d, double g) {
  return T(1) / (d + T(g)) - T(1) / T(g);
}

}  // namespace precondition
}  // namespace natgrad
