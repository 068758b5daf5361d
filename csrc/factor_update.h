// factor_update_: F_i <- decay * F_i + scale_i * X~_i^T X~_i for many layers in one call,
// X~_i = [X_i, 1] when append_ones_i. The math shared by the CPU and CUDA kernels; each kernel file
// registers its own entry point with the dispatcher.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include <cstdint>

#include "common.h"

namespace natgrad {

namespace factor_update {

// Host-side checks of every kernel entry point (ops.py checks first, with friendlier messages;
// these guard direct torch.ops calls).
inline void check_lengths(at::TensorList factors, at::TensorList inputs, at::ArrayRef<double> scales,
                          const c10::List<bool>& append_ones) {
  TORCH_CHECK(inputs.size() == factors.size() && scales.size() == factors.size() &&
                  append_ones.size() == factors.size(),
              "factor_update_: factors, inputs, scales and append_ones must have the same length");
}

// The width of X~_i = [X_i, 1?], checked against factors[i]'s shape and dtype.
inline int64_t checked_dim(const at::Tensor& F, const at::Tensor& X, bool ones, size_t i) {
  const int64_t dim = X.size(1) + (ones ? 1 : 0);
  TORCH_CHECK(F.dim() == 2 && F.size(0) == dim && F.size(1) == dim, "factor_update_: factors[", i,
              "] must be (", dim, ", ", dim, ")");
  TORCH_CHECK(F.scalar_type() == at::kFloat || F.scalar_type() == at::kDouble, "factor_update_: factors[", i,
              "] must be float32 or float64");
  return dim;
}

// Element (row k, column c) of X~ = [X, 1] without materialising the ones column; rows past n
// and columns past the width read as zero so that partial tiles need no branches in the inner loop.
// ptr_t: a pointer to the input's elements (a checked pointer in the emulated build).
template <typename acc_t, typename ptr_t>
NATGRAD_HOST_DEVICE inline acc_t load_augmented(const ptr_t& x, int64_t n, int64_t d,
                                                int64_t stride0, int64_t stride1, bool ones,
                                                int64_t k, int64_t c) {
  if (k >= n) return acc_t(0);
  if (c < d) return static_cast<acc_t>(x[k * stride0 + c * stride1]);
  return (ones && c == d) ? acc_t(1) : acc_t(0);
}

// Upper-triangle tile number t (row-major over tiles with ti <= tj) of a T x T tile grid.
NATGRAD_HOST_DEVICE inline void upper_tile(int64_t t, int64_t T, int64_t* ti, int64_t* tj) {
  int64_t row = 0;
  while (t >= T - row) {
    t -= T - row;
    ++row;
  }
  *ti = row;
  *tj = row + t;
}

NATGRAD_HOST_DEVICE inline int64_t upper_tile_count(int64_t T) { return T * (T + 1) / 2; }

}  // namespace factor_update
}  // namespace natgrad
