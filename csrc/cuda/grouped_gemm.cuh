// The grouped GEMM kernel of precondition, ekfac_precondition and kron_matmul: C = A B (+ an
// epilogue) for many layers in one launch. Each layer's tiles are laid end to end in the grid
// (cuda/grouped.cuh); a block of 8 x 8 threads computes one 32x32 tile of C, 4 x 4 outputs per
// thread (TileShape), staging 32-deep slabs of A and B in shared memory, accumulating in acc_t.
// Transposes are strides: the kernel takes any (row, column) strides of A, B, C and X.
//
// Epilogues (per table entry, so one launch mixes them), on v = (A B)[i][j]:
//   kStore                v
//   kExact, kFactored     v / D[i][j], the damped eigenvalue product (precondition.h)
//   kExactLowRank         v (1/(dG_i dA_j + lambda) - 1/lambda)
//   kColumnsLowRank       v (1/(dA_j + gA) - 1/gA)     (factored damping's shifts gA, gG)
//   kRowsLowRank          v (1/(dG_i + gG) - 1/gG)
//   kOverScale            v / (X[i][j] + lambda), X the EKFAC scaling S (x_t; ekfac_precondition.h)
// then, unless add is kNoAdd, + X[i][j] / (lambda, gA or gG) (kOverScale reads X itself, so takes no
// add). The factored shifts come from pi, which each block computes from all of the layer's
// eigenvalues (sums over dimA and dimG).
//
// Large products go to cuBLAS instead (Stages::add, cuda/library_gemm.h): the library writes A B
// into a temporary Y before the stage's launch, and the layer's entry in the launch has k = 0 and
// starts its sums from Y, so that it only applies the epilogue. A plain product into the factors'
// dtype has no entry at all.
//
// Included by several .cu files: everything is in an anonymous namespace inside NATGRAD_KERNEL_NS,
// so that each translation unit (and the CUDA and emulated builds) has its own copy, no ODR clash.
#pragma once

#include <ATen/ATen.h>

#include <vector>

#include "cuda/grouped.cuh"
#include "cuda/library_gemm.h"
#include "cuda/reduce.cuh"
#include "cuda/runtime.h"
#include "ekfac_precondition.h"
#include "precondition.h"

namespace natgrad {
namespace NATGRAD_KERNEL_NS {
namespace {

constexpr int kTile = TileShape::kTile, kEdge = TileShape::kEdge, kMicro = TileShape::kMicro;
constexpr int kChunk = TileShape::kChunk;

enum Epilogue : int {
  kStore = 0,
  kExact = 1,
  kFactored = 2,
  kExactLowRank = 3,
  kColumnsLowRank = 4,
  kRowsLowRank = 5,
  kOverScale = 6,
};
enum Add : int { kNoAdd = 0, kAddOverDamping = 1, kAddOverGA = 2, kAddOverGG = 3 };

struct Gemm {  // C (m x n) = Y + A (m x k) B (k x n); X[i][j] at i * x0 + j * x1
  dev_ptr<const char> A, B;
  dev_ptr<char> C;
  dev_ptr<const char> X;       // the matrix added, or kOverScale's S (C's shape, x_t); else unused
  dev_ptr<const char> dG, dA;  // the layer's eigenvalues (nG, nA); unused for kStore without add
  dev_ptr<const char> Y;       // init: the sums' start (acc_t, C's shape), a library product
  int64_t m, n, k;
  int64_t a0, a1, b0, b1, c0, c1, x0, x1, y0, y1, init;
  int64_t nG, nA, dimG, dimA;  // eigenvalues kept, and the factors' sizes (pi's divisors)
  int64_t tile_begin, tiles_n;
  double damping;
  int epilogue, add;
};

// What an entry's epilogue needs besides C; the defaults store A B.
struct EpilogueArgs {
  int epilogue = kStore;
  int add = kNoAdd;
  const at::Tensor* X = nullptr;   // any strides (the kernel reads it through them)
  const at::Tensor* dG = nullptr;  // dense (the kernel indexes them directly)
  const at::Tensor* dA = nullptr;
  int64_t dimG = 0, dimA = 0;
  double damping = 0.0;
};

NATGRAD_HOST_DEVICE inline bool needs_pi(int epilogue, int add) {
  return epilogue == kFactored || epilogue == kColumnsLowRank || epilogue == kRowsLowRank || add == kAddOverGA ||
         add == kAddOverGG;
}

template <typename a_t, typename c_t, typename x_t, typename acc_t>
__global__ void grouped_gemm_kernel(dev_ptr<const Gemm> table, int count) {
  const int64_t blk = blockIdx.x;
  const Gemm G = table[entry_of_block(table, count, blk)];
  const int64_t t = blk - G.tile_begin;
  const int64_t i0 = (t / G.tiles_n) * kTile, j0 = (t % G.tiles_n) * kTile;
  const dev_ptr<const a_t> a = ptr_cast<const a_t>(G.A);
  const dev_ptr<const acc_t> b = ptr_cast<const acc_t>(G.B);
  const int tx = threadIdx.x, ty = threadIdx.y, tid = tx + kEdge * ty, lane = tid % 32, warp = tid / 32;

  NATGRAD_SHARED(acc_t, As, [kChunk][kTile + 1]);  // As[r][x] = A[i0 + x][k0 + r]
  NATGRAD_SHARED(acc_t, Bs, [kChunk][kTile + 1]);  // Bs[r][x] = B[k0 + r][j0 + x]
  NATGRAD_SHARED(acc_t, scratch, [32]);
  acc_t acc[kMicro][kMicro] = {};

  // Coalesced loads: a warp (one slab row r per step, lane = 0..31) reads 32 consecutive elements
  // of whichever index of each operand has unit stride; the tiles' odd row length keeps the shared
  // writes free of bank conflicts either way. Uniform over the block (the strides are the entry's).
  const bool a_along_k = G.a1 == 1 && G.a0 != 1, b_along_k = G.b0 == 1 && G.b1 != 1;
  static_assert(kChunk == kTile, "the transposed loads swap the slab's two indices");
  for (int64_t k0 = 0; k0 < G.k; k0 += kChunk) {
    for (int r = warp; r < kChunk; r += TileShape::kLoadGroups) {
      // a_along_k: lane loads k index k0 + lane of row i0 + r; otherwise row i0 + lane at k0 + r.
      const int64_t ai = i0 + (a_along_k ? r : lane), ak = k0 + (a_along_k ? lane : r);
      const acc_t av = (ai < G.m && ak < G.k) ? static_cast<acc_t>(a[ai * G.a0 + ak * G.a1]) : acc_t(0);
      if (a_along_k) As[lane][r] = av; else As[r][lane] = av;
      const int64_t bk = k0 + (b_along_k ? lane : r), bj = j0 + (b_along_k ? r : lane);
      const acc_t bv = (bk < G.k && bj < G.n) ? static_cast<acc_t>(b[bk * G.b0 + bj * G.b1]) : acc_t(0);
      if (b_along_k) Bs[lane][r] = bv; else Bs[r][lane] = bv;
    }
    __syncthreads();
    slab_multiply(As, Bs, acc, tx, ty);
    __syncthreads();
  }

  const dev_ptr<const acc_t> dG = ptr_cast<const acc_t>(G.dG), dA = ptr_cast<const acc_t>(G.dA);
  precondition::Damping damp = precondition::exact(G.damping);
  if (needs_pi(G.epilogue, G.add)) {  // uniform over the block: pi from the means of the layer's eigenvalues
    const int nt = TileShape::kThreads;
    acc_t sa = acc_t(0), sg = acc_t(0);
    for (int64_t j = tid; j < G.nA; j += nt) sa += dA[j];
    for (int64_t i = tid; i < G.nG; i += nt) sg += dG[i];
    sa = block_reduce_sum(sa, scratch);
    sg = block_reduce_sum(sg, scratch);
    if (tid == 0) {
      scratch[0] = sa;
      scratch[1] = sg;
    }
    __syncthreads();
    damp = precondition::factored<acc_t>(scratch[0] / acc_t(G.dimA), scratch[1] / acc_t(G.dimG), G.damping);
  }
  const double over = G.add == kAddOverDamping ? damp.lambda : G.add == kAddOverGA ? damp.gA : damp.gG;
  const dev_ptr<const x_t> x = ptr_cast<const x_t>(G.X);
  const dev_ptr<c_t> c = ptr_cast<c_t>(G.C);
  for_each_output(tx, ty, [&](int q, int p, int row, int col) {
    const int64_t i = i0 + row, j = j0 + col;
    if (i >= G.m || j >= G.n) return;
    acc_t v = acc[q][p];
    if (G.init) v += ptr_cast<const acc_t>(G.Y)[i * G.y0 + j * G.y1];
    switch (G.epilogue) {
      case kExact:
      case kFactored:
        v /= precondition::denominator(dG[i], dA[j], damp);
        break;
      case kExactLowRank:
        v *= precondition::low_rank_weight(dG[i], dA[j], damp);
        break;
      case kColumnsLowRank:
        v *= precondition::shift_weight(dA[j], damp.gA);
        break;
      case kRowsLowRank:
        v *= precondition::shift_weight(dG[i], damp.gG);
        break;
      case kOverScale:
        v /= ekfac_precondition::denominator(static_cast<acc_t>(x[i * G.x0 + j * G.x1]), G.damping);
        break;
      default:
        break;
    }
    if (G.add != kNoAdd) v += static_cast<acc_t>(x[i * G.x0 + j * G.x1]) / acc_t(over);
    c[i * G.c0 + j * G.c1] = static_cast<c_t>(v);
  });
}

// One stage's table entry for C = op(A) op(B) (op a transpose when ta / tb); tiles are appended to
// `tiles`.
Gemm entry(const at::Tensor& A, bool ta, const at::Tensor& B, bool tb, const at::Tensor& C, int64_t* tiles,
           const EpilogueArgs& e = {}) {
  Gemm g;
  g.A = device_ptr<const char>(A);
  g.B = device_ptr<const char>(B);
  g.C = device_ptr<char>(C);
  g.X = e.X ? device_ptr<const char>(*e.X) : device_ptr<const char>(C);
  g.dG = e.dG ? device_ptr<const char>(*e.dG) : device_ptr<const char>(C);
  g.dA = e.dA ? device_ptr<const char>(*e.dA) : device_ptr<const char>(C);
  g.Y = device_ptr<const char>(C);
  g.y0 = g.y1 = g.init = 0;
  g.m = C.size(0);
  g.n = C.size(1);
  g.k = ta ? A.size(0) : A.size(1);
  g.a0 = ta ? A.stride(1) : A.stride(0);
  g.a1 = ta ? A.stride(0) : A.stride(1);
  g.b0 = tb ? B.stride(1) : B.stride(0);
  g.b1 = tb ? B.stride(0) : B.stride(1);
  g.c0 = C.stride(0);
  g.c1 = C.stride(1);
  g.x0 = e.X ? e.X->stride(0) : 0;
  g.x1 = e.X ? e.X->stride(1) : 0;
  g.nG = e.dG ? e.dG->numel() : 0;
  g.nA = e.dA ? e.dA->numel() : 0;
  g.dimG = e.dimG;
  g.dimA = e.dimA;
  g.tiles_n = (g.n + kTile - 1) / kTile;
  g.tile_begin = *tiles;
  g.damping = e.damping;
  g.epilogue = e.epilogue;
  g.add = e.add;
  *tiles += ((g.m + kTile - 1) / kTile) * g.tiles_n;
  return g;
}

// Launches one stage (skipped when it has no tiles: an empty grid is a launch error).
template <typename a_t, typename c_t, typename x_t, typename acc_t>
void launch_stage(dev_ptr<const Gemm> table, int count, int64_t tiles, stream_t stream) {
  if (tiles == 0) return;
  const dim3 grid(static_cast<unsigned>(tiles)), block(kEdge, kEdge);
  NATGRAD_LAUNCH((grouped_gemm_kernel<a_t, c_t, x_t, acc_t>), grid, block, 0, stream, table, count);
  NATGRAD_KERNEL_LAUNCH_CHECK();
}

// The layers grouped by (gradient dtype, factor dtype), in order of first appearance: each group
// is one set of launches (the kernel is templated on both).
inline std::vector<std::vector<size_t>> dtype_groups(at::TensorList grads, at::TensorList factors) {
  std::vector<std::vector<size_t>> groups;
  std::vector<bool> done(grads.size(), false);
  for (size_t first = 0; first < grads.size(); ++first) {
    if (done[first]) continue;
    groups.emplace_back();
    for (size_t i = first; i < grads.size(); ++i) {
      if (done[i] || grads[i].scalar_type() != grads[first].scalar_type() ||
          factors[i].scalar_type() != factors[first].scalar_type())
        continue;
      done[i] = true;
      groups.back().push_back(i);
    }
  }
  return groups;
}

// The stages of one op's chain of products for one dtype group. add() puts C = op(A) op(B) (+ an
// epilogue) into stage s: as tiles of the stage's grouped launch, or, for a product of at least
// min_macs multiply-adds (library_gemms.h), as a cuBLAS call into a temporary Y made just before
// the launch, which then only applies the epilogue from Y (an entry with k = 0). A plain product
// (kStore, no add) into a row-major C of the factors' dtype has no entry: cuBLAS writes C.
template <size_t S>
struct Stages {
  struct Call {
    at::Tensor A;
    bool ta;
    at::Tensor B;
    bool tb;
    at::Tensor C;
  };
  explicit Stages(at::ScalarType acc) : acc(acc) {}
  at::ScalarType acc;  // the factors' dtype: the sums', Y's and the library's
  std::vector<Gemm> gemms[S];
  int64_t tiles[S] = {};
  std::vector<Call> library[S];
  std::vector<at::Tensor> keep;  // temporaries alive until the launches are queued

  void add(size_t s, const at::Tensor& A, bool ta, const at::Tensor& B, bool tb, const at::Tensor& C,
           const EpilogueArgs& e = {}) {
    const int64_t m = C.size(0), n = C.size(1), k = ta ? A.size(0) : A.size(1);
    if (!use_library(m, n, k, acc, acc)) {  // operands of another dtype are converted to the factors
      gemms[s].push_back(entry(A, ta, B, tb, C, &tiles[s], e));
      return;
    }
    if (e.epilogue == kStore && e.add == kNoAdd && C.scalar_type() == acc && row_major(C)) {
      library[s].push_back({A, ta, B, tb, C});
      return;
    }
    const at::Tensor Y = uninitialized({m, n}, C.options().dtype(acc));
    keep.push_back(Y);
    library[s].push_back({A, ta, B, tb, Y});
    Gemm g = entry(A, ta, B, tb, C, &tiles[s], e);
    g.k = 0;
    g.Y = device_ptr<const char>(Y);
    g.y0 = n;
    g.y1 = 1;
    g.init = 1;
    gemms[s].push_back(g);
  }
  bool empty() const {
    for (size_t s = 0; s < S; ++s)
      if (!gemms[s].empty() || !library[s].empty()) return false;
    return true;
  }
};

// The stages' tables in one upload, after checking that every stage's grid fits; `table` keeps the
// upload alive until the launches are queued.
struct StageTables {
  at::Tensor table;
  dev_ptr<const Gemm> base;
  std::vector<int64_t> offset, count;
  dev_ptr<const Gemm> stage(size_t s) const { return base + offset[s]; }
};

template <size_t S>
StageTables upload_stages(const Stages<S>& st, const at::Tensor& like, const char* op) {
  for (const int64_t t : st.tiles) TORCH_CHECK(t < (int64_t(1) << 31), op, ": too many tiles");
  std::vector<Gemm> all;
  StageTables out;
  for (const auto& s : st.gemms) {
    out.offset.push_back(static_cast<int64_t>(all.size()));
    out.count.push_back(static_cast<int64_t>(s.size()));
    all.insert(all.end(), s.begin(), s.end());
  }
  if (all.empty()) return out;  // every product went to the library: no launch reads a table
  out.table = upload(all.data(), all.size() * sizeof(Gemm), like);
  out.base = device_ptr<const Gemm>(out.table);
  return out;
}

// Stage s: its library products, then its grouped launch (which may read them).
template <typename a_t, typename c_t, typename x_t, typename acc_t, size_t S>
void run_stage(const Stages<S>& st, const StageTables& t, size_t s, stream_t stream) {
  for (const auto& c : st.library[s]) library_gemm(c.A, c.ta, c.B, c.tb, c.C);
  if (st.tiles[s] == 0) return;
  launch_stage<a_t, c_t, x_t, acc_t>(t.stage(s), static_cast<int>(t.count[s]), st.tiles[s], stream);
}

}  // namespace
}  // namespace NATGRAD_KERNEL_NS
}  // namespace natgrad
