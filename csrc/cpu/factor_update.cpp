// factor_update_ on the CPU: one BLAS call (addmm) per layer for X^T X, the ones column handled
// by a column sum, so [X, 1] is never materialised.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "factor_update.h"

namespace natgrad {
namespace cpu_kernels {

void factor_update_(at::TensorList factors, at::TensorList inputs, double decay,
                       at::ArrayRef<double> scales, const c10::List<bool>& append_ones) {
  TORCH_CHECK(inputs.size() == factors.size() && scales.size() == factors.size() &&
                  append_ones.size() == factors.size(),
              "factor_update_: factors, inputs, scales and append_ones must have the same length");
  for (size_t i = 0; i < factors.size(); ++i) {
    const at::Tensor& F = factors[i];
    const int64_t n = inputs[i].size(0), d = inputs[i].size(1);
    const int64_t dim = d + (append_ones.get(i) ? 1 : 0);
    TORCH_CHECK(F.dim() == 2 && F.size(0) == dim && F.size(1) == dim, "factor_update_: factors[", i,
                "] must be (", dim, ", ", dim, ")");
    if (dim == 0) continue;
    // The factor's dtype is the accumulation dtype (fp32 or fp64): half inputs are widened first.
    const at::Tensor X = inputs[i].to(F.scalar_type());
    at::Tensor Fw = F.narrow(0, 0, d).narrow(1, 0, d);
    Fw.addmm_(X.t(), X, /*beta=*/decay, /*alpha=*/scales[i]);
    if (append_ones.get(i)) {
      at::Tensor col = F.select(1, d).narrow(0, 0, d);
      col.mul_(decay).add_(X.sum(0), scales[i]);
      F.select(0, d).narrow(0, 0, d).copy_(col);
      F.select(0, d).select(0, d).mul_(decay).add_(scales[i] * static_cast<double>(n));
    }
  }
}

TORCH_LIBRARY_IMPL(natgrad, CPU, m) { m.impl("factor_update_", &factor_update_); }

}  // namespace cpu_kernels
}  // namespace natgrad
