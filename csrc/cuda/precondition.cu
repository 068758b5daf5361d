// precondition on CUDA: P = QG [(QG^T M QA) / D] QA^T for every layer in four launches of one
// grouped GEMM kernel (per pair of gradient and factor dtypes), whatever the number of layers:
//   1. T = M QA          (reads the gradient in its own dtype; no conversion pass)
//   2. V = (QG^T T) / D  (the division by the damped eigenvalue products is the epilogue: no
//                         separate elementwise pass)
//   3. T = V QA^T
//   4. P = QG T          (written in the gradient's dtype)
// Each layer's tiles are laid end to end in the grid (cuda/grouped.cuh); a block computes one
// 32x32 tile of C, staging 32-deep slabs of A and B in shared memory, accumulating in acc_t.
// Transposes are strides: the kernel takes any (row, column) strides of A, B and C.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>

#include <vector>

#include "cuda/grouped.cuh"
#include "cuda/reduce.cuh"
#include "cuda/runtime.h"
#include "precondition.h"

namespace natgrad {
namespace NATGRAD_KERNEL_NS {
namespace {

constexpr int kTile = 32;   // tile edge = threads in x
constexpr int kRows = 8;    // threads in y; each thread owns kTile / kRows rows of the tile
constexpr int kChunk = 32;  // depth of the staged slabs

enum Epilogue : int { kStore = 0, kExact = 1, kFactored = 2 };

struct Gemm {  // C (m x n) = A (m x k) B (k x n); X[i][j] at i * x0 + j * x1
  dev_ptr<const char> A, B;
  dev_ptr<char> C;
  dev_ptr<const char> dG, dA;  // the epilogue's eigenvalues (rows, columns); unused for kStore
  int64_t m, n, k;
  int64_t a0, a1, b0, b1, c0, c1;
  int64_t tile_begin, tiles_n;
  double damping;
  int epilogue;
};

template <typename a_t, typename c_t, typename acc_t>
__global__ void grouped_gemm_kernel(dev_ptr<const Gemm> table, int count) {
  const int64_t blk = blockIdx.x;
  const Gemm G = table[entry_of_block(table, count, blk)];
  const int64_t t = blk - G.tile_begin;
  const int64_t i0 = (t / G.tiles_n) * kTile, j0 = (t % G.tiles_n) * kTile;
  const dev_ptr<const a_t> a = ptr_cast<const a_t>(G.A);
  const dev_ptr<const acc_t> b = ptr_cast<const acc_t>(G.B);
  const int tx = threadIdx.x, ty = threadIdx.y;

  __shared__ acc_t As[kChunk][kTile + 1];  // As[r][x] = A[i0 + x][k0 + r]
  __shared__ acc_t Bs[kChunk][kTile + 1];  // Bs[r][x] = B[k0 + r][j0 + x]
  __shared__ acc_t scratch[32];
  acc_t acc[kTile / kRows];
#pragma unroll
  for (int q = 0; q < kTile / kRows; ++q) acc[q] = acc_t(0);

  for (int64_t k0 = 0; k0 < G.k; k0 += kChunk) {
    for (int r = ty; r < kChunk; r += kRows) {
      const int64_t kk = k0 + r;
      As[r][tx] = (i0 + tx < G.m && kk < G.k) ? static_cast<acc_t>(a[(i0 + tx) * G.a0 + kk * G.a1]) : acc_t(0);
      Bs[r][tx] = (kk < G.k && j0 + tx < G.n) ? b[kk * G.b0 + (j0 + tx) * G.b1] : acc_t(0);
    }
    __syncthreads();
    slab_multiply<kChunk, kTile, kRows>(As, Bs, acc, tx, ty);
    __syncthreads();
  }

  const dev_ptr<const acc_t> dG = ptr_cast<const acc_t>(G.dG), dA = ptr_cast<const acc_t>(G.dA);
  precondition::Damping damp = precondition::exact(G.damping);
  if (G.epilogue == kFactored) {  // uniform over the block: pi from the means of the layer's eigenvalues
    const int tid = tx + kTile * ty, nt = kTile * kRows;
    acc_t sa = acc_t(0), sg = acc_t(0);
    for (int64_t j = tid; j < G.n; j += nt) sa += dA[j];
    for (int64_t i = tid; i < G.m; i += nt) sg += dG[i];
    sa = block_reduce_sum(sa, scratch);
    sg = block_reduce_sum(sg, scratch);
    if (tid == 0) {
      scratch[0] = sa;
      scratch[1] = sg;
    }
    __syncthreads();
    damp = precondition::factored<acc_t>(scratch[0] / acc_t(G.n), scratch[1] / acc_t(G.m), G.damping);
  }
  const dev_ptr<c_t> c = ptr_cast<c_t>(G.C);
  const int64_t j = j0 + tx;
#pragma unroll
  for (int q = 0; q < kTile / kRows; ++q) {
    const int64_t i = i0 + ty + q * kRows;
    if (i >= G.m || j >= G.n) continue;
    acc_t v = acc[q];
    if (G.epilogue != kStore) v /= precondition::denominator(dG[i], dA[j], damp);
    c[i * G.c0 + j * G.c1] = static_cast<c_t>(v);
  }
}

// One stage's table entry; tiles are appended to `tiles`.
Gemm entry(const at::Tensor& A, bool ta, const at::Tensor& B, bool tb, const at::Tensor& C, int64_t* tiles,
           int epilogue = kStore, const at::Tensor* dG = nullptr, const at::Tensor* dA = nullptr,
           double damping = 0.0) {
  Gemm g;
  g.A = device_ptr<const char>(A);
  g.B = device_ptr<const char>(B);
  g.C = device_ptr<char>(C);
  g.dG = dG ? device_ptr<const char>(*dG) : device_ptr<const char>(C);
  g.dA = dA ? device_ptr<const char>(*dA) : device_ptr<const char>(C);
  g.m = C.size(0);
  g.n = C.size(1);
  g.k = ta ? A.size(0) : A.size(1);
  g.a0 = ta ? A.stride(1) : A.stride(0);
  g.a1 = ta ? A.stride(0) : A.stride(1);
  g.b0 = tb ? B.stride(1) : B.stride(0);
  g.b1 = tb ? B.stride(0) : B.stride(1);
  g.c0 = C.stride(0);
  g.c1 = C.stride(1);
  g.tiles_n = (g.n + kTile - 1) / kTile;
  g.tile_begin = *tiles;
  g.damping = damping;
  g.epilogue = epilogue;
  *tiles += ((g.m + kTile - 1) / kTile) * g.tiles_n;
  return g;
}

std::vector<at::Tensor> precondition_op(at::TensorList grads, at::TensorList QA, at::TensorList dA,
                                        at::TensorList QG, at::TensorList dG, double damping, bool factored) {
  precondition::check_args(grads, QA, dA, QG, dG, damping);
  const size_t count = grads.size();
  std::vector<at::Tensor> out(count);
  if (count == 0) return out;
  const DeviceGuard guard(grads[0].device());
  const stream_t stream = current_stream();

  std::vector<bool> done(count, false);
  for (size_t first = 0; first < count; ++first) {
    if (done[first]) continue;
    const auto gdt = grads[first].scalar_type(), adt = QA[first].scalar_type();
    // The four stages' tables, one after the other in one upload.
    std::vector<Gemm> stage[4];
    int64_t tiles[4] = {0, 0, 0, 0};
    std::vector<at::Tensor> keep;  // temporaries alive until the launches are queued
    for (size_t i = first; i < count; ++i) {
      if (done[i] || grads[i].scalar_type() != gdt || QA[i].scalar_type() != adt) continue;
      done[i] = true;
      const at::Tensor& M = grads[i];
      out[i] = at::empty(M.sizes(), M.options());
      if (M.numel() == 0) continue;
      const at::Tensor T = at::empty(M.sizes(), QA[i].options()), V = at::empty(M.sizes(), QA[i].options());
      // The epilogue indexes the eigenvalues densely: a strided (or stride-0) view is copied first.
      const at::Tensor da = dA[i].contiguous(), dg = dG[i].contiguous();
      keep.insert(keep.end(), {T, V, da, dg});
      stage[0].push_back(entry(M, false, QA[i], false, T, &tiles[0]));
      stage[1].push_back(entry(QG[i], true, T, false, V, &tiles[1], factored ? kFactored : kExact, &dg, &da,
                               damping));
      stage[2].push_back(entry(V, false, QA[i], true, T, &tiles[2]));
      stage[3].push_back(entry(QG[i], false, T, false, out[i], &tiles[3]));
    }
    if (stage[0].empty()) continue;
    TORCH_CHECK(tiles[0] < (int64_t(1) << 31) && tiles[1] < (int64_t(1) << 31), "precondition: too many tiles");
    std::vector<Gemm> all;
    for (const auto& s : stage) all.insert(all.end(), s.begin(), s.end());
    const at::Tensor table = upload(all.data(), all.size() * sizeof(Gemm), grads[first]);
    const dev_ptr<const Gemm> base = device_ptr<const Gemm>(table);
    const int per_stage = static_cast<int>(stage[0].size());
    const dim3 block(kTile, kRows);
    AT_DISPATCH_FLOATING_TYPES(adt, "precondition", [&] {
      using acc_t = scalar_t;
      AT_DISPATCH_SWITCH(gdt, "precondition", AT_DISPATCH_CASE_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, [&] {
        using g_t = scalar_t;
        for (int s = 0; s < 4; ++s) {
          const dim3 grid(static_cast<unsigned>(tiles[s]));
          const dev_ptr<const Gemm> t = base + s * per_stage;
          if (s == 0)
            NATGRAD_LAUNCH((grouped_gemm_kernel<g_t, acc_t, acc_t>), grid, block, 0, stream, t, per_stage);
          else if (s == 3)
            NATGRAD_LAUNCH((grouped_gemm_kernel<acc_t, g_t, acc_t>), grid, block, 0, stream, t, per_stage);
          else
            NATGRAD_LAUNCH((grouped_gemm_kernel<acc_t, acc_t, acc_t>), grid, block, 0, stream, t, per_stage);
          NATGRAD_KERNEL_LAUNCH_CHECK();
        }
      }));
    });
  }
  return out;
}

}  // namespace

NATGRAD_CUDA_IMPL(natgrad, m) { m.impl("precondition", &precondition_op); }

}  // namespace NATGRAD_KERNEL_NS
}  // namespace natgrad
