// Shared pieces of damped_inverse ((F + shift I)^-1 of every symmetric matrix by Cholesky): the
// argument checks of the CPU and CUDA entry points.
//
// Every path reads the LOWER triangle only and returns a symmetric matrix in F's dtype; one whose
// factorisation fails or whose inverse is not finite is redone in float64, and NaN if that fails too.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

namespace natgrad {
namespace damped_inverse {

inline void check_args(at::TensorList mats, at::ArrayRef<double> shifts) {
  TORCH_CHECK(shifts.size() == mats.size(), "damped_inverse: shifts has ", shifts.size(), " entries but mats has ",
              mats.size());
  for (size_t i = 0; i < mats.size(); ++i) {
    const at::Tensor& M = mats[i];
    TORCH_CHECK(M.dim() == 2 && M.size(0) == M.size(1), "damped_inverse: mats[", i,
                "] must be a square matrix, got shape ", M.sizes());
    TORCH_CHECK(M.scalar_type() == at::kFloat || M.scalar_type() == at::kDouble, "damped_inverse: mats[", i,
                "] must be float32 or float64, got ", M.scalar_type());
    TORCH_CHECK(M.device() == mats[0].device(), "damped_inverse: mats[", i, "] is on ", M.device(), ", mats[0] on ",
                mats[0].device());
    TORCH_CHECK(std::isfinite(shifts[i]) && shifts[i] > 0, "damped_inverse: shifts[", i,
                "] must be finite and > 0, got ", shifts[i]);
  }
}

}  // namespace damped_inverse
}  // namespace natgrad
