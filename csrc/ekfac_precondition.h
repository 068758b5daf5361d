// ekfac_precondition (EKFAC, George et al. 2018): for every layer, P = QG [(QG^T M QA) / (S + lambda)] QA^T,
// the division elementwise. QA, QG are full eigenbases of the Kronecker factors; S (out, in) holds the
// second moments of the gradients in that basis, which replace K-FAC's eigenvalue products dG_i dA_j.
// The math shared by the CPU and CUDA kernels: argument checks and the denominator.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "common.h"

namespace natgrad {
namespace ekfac_precondition {

inline void check_args(at::TensorList grads, at::TensorList QA, at::TensorList QG, at::TensorList S,
                       double damping) {
  const size_t n = grads.size();
  TORCH_CHECK(QA.size() == n && QG.size() == n && S.size() == n,
              "ekfac_precondition: grads, QA, QG and S must have the same length");
  TORCH_CHECK(std::isfinite(damping) && damping > 0, "ekfac_precondition: damping must be finite and > 0, got ",
              damping);
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& M = grads[i];
    TORCH_CHECK(M.dim() == 2, "ekfac_precondition: grads[", i, "] must be 2-D (out, in), got ", M.sizes());
    const int64_t o = M.size(0), k = M.size(1);
    // Full bases only: the scaling lives in the whole rotated space, with no low-rank remainder.
    TORCH_CHECK(QA[i].dim() == 2 && QA[i].size(0) == k && QA[i].size(1) == k, "ekfac_precondition: QA[", i,
                "] must be a full (", k, ", ", k, ") eigenbasis, got ", QA[i].sizes());
    TORCH_CHECK(QG[i].dim() == 2 && QG[i].size(0) == o && QG[i].size(1) == o, "ekfac_precondition: QG[", i,
                "] must be a full (", o, ", ", o, ") eigenbasis, got ", QG[i].sizes());
    TORCH_CHECK(S[i].dim() == 2 && S[i].size(0) == o && S[i].size(1) == k, "ekfac_precondition: S[", i,
                "] must be (", o, ", ", k, "), got ", S[i].sizes());
    const auto t = QA[i].scalar_type();
    TORCH_CHECK((t == at::kFloat || t == at::kDouble) && QG[i].scalar_type() == t && S[i].scalar_type() == t,
                "ekfac_precondition: QA[", i, "], QG[", i, "] and S[", i, "] must share one dtype, float32 or float64");
    const auto g = M.scalar_type();
    TORCH_CHECK(g == at::kFloat || g == at::kDouble || g == at::kBFloat16 || g == at::kHalf,
                "ekfac_precondition: grads[", i, "] must be fp32, fp64, bf16 or fp16");
    for (const at::Tensor* x : {&QA[i], &QG[i], &S[i]})
      TORCH_CHECK(x->device() == M.device() && M.device() == grads[0].device(),
                  "ekfac_precondition: the tensors of layer ", i, " must all be on ", grads[0].device());
  }
}

// The damped scaling a rotated gradient entry is divided by.
template <typename T>
NATGRAD_HOST_DEVICE inline T denominator(T s, double damping) {
  return s + T(damping);
}

}  // namespace ekfac_precondition
}  // namespace natgrad
