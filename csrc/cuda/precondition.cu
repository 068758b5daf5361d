// precondition on CUDA: P = QG [(QG^T M QA) / D] QA^T for every layer in four launches of one
// grouped GEMM kernel (cuda/grouped_gemm.cuh; per pair of gradient and factor dtypes), whatever the
// number of layers:
//   1. T = M QA          (reads the gradient in its own dtype; no conversion pass)
//   2. V = (QG^T T) / D  (the division by the damped eigenvalue products is the epilogue: no
//                         separate elementwise pass)
//   3. T = V QA^T
//   4. P = QG T          (written in the gradient's dtype)
// Low-rank layers (precondition.h) take the same four launches with other epilogues:
//   exact:    T = M QA;  V = (QG^T T) * W;  T2 = V QA^T;  P = QG T2 + M / lambda
//   factored: U = (M QA) * wA (columns);  T = U QA^T + M / gA;  Y = (QG^T T) * wG (rows);  P = QG Y + T / gG
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <vector>

#include "cuda/grouped_gemm.cuh"
#include "cuda/runtime.h"
#include "precondition.h"

namespace natgrad {
namespace NATGRAD_KERNEL_NS {
namespace {

std::vector<at::Tensor> precondition_op(at::TensorList grads, at::TensorList QA, at::TensorList dA,
                                        at::TensorList QG, at::TensorList dG, double damping, bool factored) {
  precondition::check_args(grads, QA, dA, QG, dG, damping);
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
      // The epilogues index the eigenvalues densely: a strided (or stride-0) view is copied first.
      const at::Tensor da = dA[i].contiguous(), dg = dG[i].contiguous();
      const int64_t o = M.size(0), k = M.size(1), ra = QA[i].size(1), rg = QG[i].size(1);
      const auto acc = QA[i].options();
      st.keep.insert(st.keep.end(), {da, dg});
      EpilogueArgs e;
      e.dG = &dg;
      e.dA = &da;
      e.dimG = o;
      e.dimA = k;
      e.damping = damping;
      if (!precondition::low_rank(QA[i], QG[i])) {
        const at::Tensor T = uninitialized({o, k}, acc), V = uninitialized({o, k}, acc);
        st.keep.insert(st.keep.end(), {T, V});
        e.epilogue = factored ? kFactored : kExact;
        st.add(0, M, false, QA[i], false, T);
        st.add(1, QG[i], true, T, false, V, e);
        st.add(2, V, false, QA[i], true, T);
        st.add(3, QG[i], false, T, false, out[i]);
      } else if (!factored) {
        const at::Tensor T = uninitialized({o, ra}, acc), V = uninitialized({rg, ra}, acc), T2 = uninitialized({rg, k}, acc);
        st.keep.insert(st.keep.end(), {T, V, T2});
        EpilogueArgs w = e, add = e;
        w.epilogue = kExactLowRank;
        add.add = kAddOverDamping;
        add.X = &M;
        st.add(0, M, false, QA[i], false, T);
        st.add(1, QG[i], true, T, false, V, w);
        st.add(2, V, false, QA[i], true, T2);
        st.add(3, QG[i], false, T2, false, out[i], add);
      } else {
        const at::Tensor U = uninitialized({o, ra}, acc), T = uninitialized({o, k}, acc), Y = uninitialized({rg, k}, acc);
        st.keep.insert(st.keep.end(), {U, T, Y});
        EpilogueArgs cols = e, add_a = e, rows = e, add_g = e;
        cols.epilogue = kColumnsLowRank;
        add_a.add = kAddOverGA;
        add_a.X = &M;
        rows.epilogue = kRowsLowRank;
        add_g.add = kAddOverGG;
        add_g.X = &T;
        st.add(0, M, false, QA[i], false, U, cols);
        st.add(1, U, false, QA[i], true, T, add_a);
        st.add(2, QG[i], true, T, false, Y, rows);
        st.add(3, QG[i], false, Y, false, out[i], add_g);
      }
    }
    if (st.empty()) continue;
    const StageTables t = upload_stages(st, grads[group[0]], "precondition");
    // The matrices added in stages 2 and 4 (X): the gradient (g_t), or T of factored damping (acc_t).
    AT_DISPATCH_FLOATING_TYPES(adt, "precondition", [&] {
      using acc_t = scalar_t;
      AT_DISPATCH_SWITCH(gdt, "precondition", AT_DISPATCH_CASE_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, [&] {
        using g_t = scalar_t;
        run_stage<g_t, acc_t, acc_t, acc_t>(st, t, 0, stream);
        run_stage<acc_t, acc_t, g_t, acc_t>(st, t, 1, stream);
        run_stage<acc_t, acc_t, acc_t, acc_t>(st, t, 2, stream);
        if (factored)
          run_stage<acc_t, g_t, acc_t, acc_t>(st, t, 3, stream);
        else
          run_stage<acc_t, g_t, g_t, acc_t>(st, t, 3, stream);
      }));
    });
  }
  return out;
}

}  // namespace

NATGRAD_CUDA_IMPL(natgrad, m) { m.impl("precondition", &precondition_op); }

}  // namespace NATGRAD_KERNEL_NS
}  // namespace natgrad
