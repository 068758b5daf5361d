// ekfac_precondition on CUDA: P = QG [(QG^T M QA) / (S + lambda)] QA^T for every layer in four
// launches of the grouped GEMM kernel (cuda/grouped_gemm.cuh; per pair of gradient and factor
// dtypes), whatever the number of layers, as precondition's full-rank path:
//   1. T = M QA                      (reads the gradient in its own dtype; no conversion pass)
//   2. V = (QG^T T) / (S + lambda)   (the epilogue kOverScale reads S through its strides: no copy
//                                     of S and no separate elementwise pass)
//   3. T = V QA^T
//   4. P = QG T                      (written in the gradient's dtype)
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <vector>

#include "cuda/grouped_gemm.cuh"
#include "cuda/runtime.h"
#include "ekfac_precondition.h"

namespace natgrad {
namespace NATGRAD_KERNEL_NS {
namespace {

std::vector<at::Tensor> ekfac_precondition_op(at::TensorList grads, at::TensorList QA, at::TensorList QG,
                                              at::TensorList S, double damping) {
  ekfac_precondition::check_args(grads, QA, QG, S, damping);
  const size_t count = grads.size();
  std::vector<at::Tensor> out(count);
  if (count == 0) return out;
  const DeviceGuard guard(grads[0].device());
  const stream_t stream = current_stream();

  for (const auto& group : dtype_groups(grads, QA)) {
    const auto gdt = grads[group[0]].scalar_type(), adt = QA[group[0]].scalar_type();
    Stages<4> st(adt);
    for (const size_t i : group) {
      const at::Tensor& M = grads[i];
      out[i] = uninitialized(M.sizes(), M.options());
      if (M.numel() == 0) continue;
      const int64_t o = M.size(0), k = M.size(1);
      const at::Tensor T = uninitialized({o, k}, QA[i].options()), V = uninitialized({o, k}, QA[i].options());
      st.keep.insert(st.keep.end(), {T, V});
      EpilogueArgs e;
      e.epilogue = kOverScale;
      e.X = &S[i];
      e.damping = damping;
      st.add(0, M, false, QA[i], false, T);
      st.add(1, QG[i], true, T, false, V, e);
      st.add(2, V, false, QA[i], true, T);
      st.add(3, QG[i], false, T, false, out[i]);
    }
    if (st.empty()) continue;
    const StageTables t = upload_stages(st, grads[group[0]], "ekfac_precondition");
    // X (read in stage 2 only) is S, in the factors' dtype.
    AT_DISPATCH_FLOATING_TYPES(adt, "ekfac_precondition", [&] {
      using acc_t = scalar_t;
      AT_DISPATCH_SWITCH(gdt, "ekfac_precondition", AT_DISPATCH_CASE_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, [&] {
        using g_t = scalar_t;
        run_stage<g_t, acc_t, acc_t, acc_t>(st, t, 0, stream);
        run_stage<acc_t, acc_t, acc_t, acc_t>(st, t, 1, stream);
        run_stage<acc_t, acc_t, acc_t, acc_t>(st, t, 2, stream);
        run_stage<acc_t, g_t, acc_t, acc_t>(st, t, 3, stream);
      }));
    });
  }
  return out;
}

}  // namespace

NATGRAD_CUDA_IMPL(natgrad, m) { m.impl("ekfac_precondition", &ekfac_precondition_op); }

}  // namespace NATGRAD_KERNEL_NS
}  // namespace natgrad
