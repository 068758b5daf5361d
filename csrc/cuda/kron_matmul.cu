// kron_matmul on CUDA: P = IG M IA for every layer in two launches of the grouped GEMM kernel
// (cuda/grouped_gemm.cuh; per pair of gradient and factor dtypes), whatever the number of layers:
//   1. T = M IA   (reads the gradient in its own dtype; no conversion pass)
//   2. P = IG T   (written in the gradient's dtype)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <vector>

#include "cuda/grouped_gemm.cuh"
#include "cuda/runtime.h"
#include "kron_matmul.h"

namespace natgrad {
namespace NATGRAD_KERNEL_NS {
namespace {

std::vector<at::Tensor> kron_matmul(at::TensorList grads, at::TensorList IA, at::TensorList IG) {
  kron_matmul::check_args(grads, IA, IG);
  const size_t count = grads.size();
  std::vector<at::Tensor> out(count);
  if (count == 0) return out;
  const DeviceGuard guard(grads[0].device());
  const stream_t stream = current_stream();

  for (const auto& group : dtype_groups(grads, IA)) {
    const auto gdt = grads[group[0]].scalar_type(), adt = IA[group[0]].scalar_type();
    Stages<2> st(adt);
    for (const size_t i : group) {
      const at::Tensor& M = grads[i];
      out[i] = uninitialized(M.sizes(), M.options());
      if (M.numel() == 0) continue;
      const at::Tensor T = uninitialized(M.sizes(), IA[i].options());
      st.keep.push_back(T);
      st.add(0, M, false, IA[i], false, T);
      st.add(1, IG[i], false, T, false, out[i]);
    }
    if (st.empty()) continue;
    const StageTables t = upload_stages(st, grads[group[0]], "kron_matmul");
    AT_DISPATCH_FLOATING_TYPES(adt, "kron_matmul", [&] {
      using acc_t = scalar_t;
      AT_DISPATCH_SWITCH(gdt, "kron_matmul", AT_DISPATCH_CASE_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, [&] {
        using g_t = scalar_t;
        run_stage<g_t, acc_t, acc_t, acc_t>(st, t, 0, stream);
        run_stage<acc_t, g_t, acc_t, acc_t>(st, t, 1, stream);
      }));
    });
  }
  return out;
}

}  // namespace

NATGRAD_CUDA_IMPL(natgrad, m) { m.impl("kron_matmul", &kron_matmul); }

}  // namespace NATGRAD_KERNEL_NS
}  // namespace natgrad
