// Shared pieces of kron_matmul (P = IG M IA for every layer): the argument checks of the CPU and
// CUDA entry points.
#pragma once

#include <ATen/ATen.h>

namespace natgrad {
namespace kron_matmul {

inline void check_args(at::TensorList grads, at::TensorList IA, at::TensorList IG) {
  const size_t n = grads.size();
  TORCH_CHECK(IA.size() == n && IG.size() == n, "kron_matmul: grads, IA and IG must have the same length");
  for (size_t i = 0; i < n; ++i) {
    const at::Tensor& M = grads[i];
    TORCH_CHECK(M.dim() == 2, "kron_matmul: grads[", i, "] must be 2-D (out, in), got ", M.sizes());
    const int64_t o = M.size(0), k = M.size(1);
    TORCH_CHECK(IA[i].dim() == 2 && IA[i].size(0) == k && IA[i].size(1) == k, "kron_matmul: IA[", i, "] must be (",
                k, ", ", k, "), got ", IA[i].sizes());
    TORCH_CHECK(IG[i].dim() == 2 && IG[i].size(0) == o && IG[i].size(1) == o, "kron_matmul: IG[", i, "] must be (",
                o, ", ", o, "), got ", IG[i].sizes());
    const auto t = IA[i].scalar_type();
    TORCH_CHECK((t == at::kFloat || t == at::kDouble) && IG[i].scalar_type() == t, "kron_matmul: IA[", i,
                "] and IG[", i, "] must share one dtype, float32 or float64");
    const auto g = M.scalar_type();
    TORCH_CHECK(g == at::kFloat || g == at::kDouble || g == at::kBFloat16 || g == at::kHalf, "kron_matmul: grads[", i,
                "] must be fp32, fp64, bf16 or fp16");
    TORCH_CHECK(IA[i].device() == M.device() && IG[i].device() == M.device() && M.device() == grads[0].device(),
                "kron_matmul: the tensors of layer ", i, " must all be on ", grads[0].device());
  }
}

}  // namespace kron_matmul
}  // namespace natgrad
