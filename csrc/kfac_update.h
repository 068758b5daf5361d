// kfac_update_: the end of a K-FAC step for every parameter at once, as torch.optim.SGD does it,
// after the KL-clip trust region (docs/curvature.md):
//   nu = min(1, sqrt(kl_clip / (lr^2 sum over clipped i of <d_i, g_i>)))  (1 when kl_clip <= 0 or the sum <= 0)
//   d = d_i (* nu if clipped_i) + weight_decay p;  buf = momentum buf + d (if momentum);  p -= lr (buf or d)
// The math shared by the CPU and CUDA kernels; buffers start at zero, so the first step's buf = d.
#pragma once

#include <ATen/ATen.h>

#include <cmath>

#include "common.h"

namespace natgrad {
namespace kfac_update {

// Elements per chunk: the unit of work of one CUDA block or one CPU task.
constexpr int64_t kChunk = 8192;

inline void check_args(at::TensorList params, at::TensorList directions, at::TensorList grads,
                       at::TensorList buffers, const c10::List<bool>& clipped, double lr, double momentum,
                       double weight_decay, double kl_clip) {
  const size_t n = params.size();
  TORCH_CHECK(directions.size() == n && grads.size() == n && clipped.size() == n,
              "kfac_update_: params, directions, grads and clipped must have the same length");
  TORCH_CHECK(buffers.size() == n || (buffers.empty() && momentum == 0.0),
              "kfac_update_: momentum_buffers must have one buffer per parameter (or none when momentum is 0)");
  TORCH_CHECK(std::isfinite(lr) && std::isfinite(momentum) && std::isfinite(weight_decay) && std::isfinite(kl_clip),
              "kfac_update_: lr, momentum, weight_decay and kl_clip must be finite");
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& p = params[i];
    TORCH_CHECK(p.is_contiguous(), "kfac_update_: params[", i, "] must be contiguous");
    const auto t = p.scalar_type();
    TORCH_CHECK(t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf, "kfac_update_: params[",
                i, "] must be fp32, fp64, bf16 or fp16");
    const at::Tensor* others[] = {&directions[i], &grads[i], buffers.empty() ? &p : &buffers[i]};
    for (const at::Tensor* x : others) {
      TORCH_CHECK(x->sizes() == p.sizes() && x->scalar_type() == t && x->device() == params[0].device() &&
                      x->is_contiguous(),
                  "kfac_update_: directions[", i, "], grads[", i, "] and momentum_buffers[", i,
                  "] must be contiguous, of params[", i, "]'s shape and dtype, on its device");
    }
  }
}

NATGRAD_HOST_DEVICE inline double kl_nu(double vg, double lr, double kl_clip) {
  const double v = vg * lr * lr;
  if (!(kl_clip > 0.0) || !(v > 0.0)) return 1.0;
  const double nu = std::sqrt(kl_clip / v);
  return nu < 1.0 ? nu : 1.0;
}

// One element: returns the new parameter value; updates buf in place when momentum is used.
template <typename acc_t>
NATGRAD_HOST_DEVICE inline acc_t step(acc_t p, acc_t d, acc_t* buf, acc_t scale, acc_t lr, acc_t momentum,
                                      acc_t weight_decay, bool has_momentum) {
  d = d * scale + weight_decay * p;
  if (has_momentum) {
    *buf = momentum * *buf + d;
    d = *buf;
  }
  return p - lr * d;
}

}  // namespace kfac_update
}  // namespace natgrad
