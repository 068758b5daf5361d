// The finiteness check of the CPU kernels that retry a failed solve in float64.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

namespace natgrad {
namespace cpu_kernels {

// Finite entries only: x * 0 is 0 for a finite x and NaN otherwise, summed without a branch
// (ATen's isfinite().all().item() costs more than the check itself).
inline bool all_finite(const at::Tensor& t) {
  const at::Tensor c = t.is_contiguous() || t.t().is_contiguous() ? t : t.contiguous();  // any dense layout
  return AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "all_finite", [&] {
    const scalar_t* p = c.data_ptr<scalar_t>();
    scalar_t s = 0;
    for (int64_t i = 0; i < c.numel(); ++i) s += p[i] * scalar_t(0);
    return s == scalar_t(0);
  });
}

}  // namespace cpu_kernels
}  // namespace natgrad
