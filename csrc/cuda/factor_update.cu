// factor_update_ and conv_factor_update_ on CUDA: one launch for all layers of a (factor dtype,
// input dtype) group; for conv_factor_update_ the rows are patches read straight from the image.
// Each block owns one 32x32 tile of the upper triangle of one layer's factor, stages 32-row slabs
// of the two column panels of X~ = [X, 1] in shared memory, accumulates in acc_t (fp32 or fp64),
// and writes the tile and its mirror, so only one triangle is computed.
// Split-K: when a group has too few tiles to fill the GPU (a narrow factor of many rows: a conv
// layer's patches), a layer's rows are cut into slices, one block per (tile, slice) writes its
// partial tile to a workspace, and a second launch sums each tile's slices in a fixed order (the
// same bits on every run, unlike atomics) before the decay and the mirror.
// Library path: a dense layer whose X~^T X~ is at least min_macs multiply-adds (library_gemms.h)
// has its upper triangle computed by cuBLAS before the launch (library_gram: a SYRK, or a GEMM for
// the tensor cores); its blocks then loop over no rows and read their sums from that triangle
// (both (i, j) and (j, i) of a diagonal tile from S[min][max]: the same bits), so the decay, the
// scale and the mirror are the kernel's as for any layer. Conv
// layers always take the kernel: their patches are never unfolded in memory.
#include <ATen/Dispatch.h>

#include <vector>

#include "cuda/grouped.cuh"
#include "cuda/library_gemm.h"
#include "cuda/runtime.h"
#include "factor_update.h"

namespace natgrad {
namespace NATGRAD_KERNEL_NS {
namespace {

// 8 x 8 threads per 32x32 tile, 4 x 4 outputs each; 32 rows of X staged per step (TileShape).
constexpr int kTile = TileShape::kTile, kEdge = TileShape::kEdge, kMicro = TileShape::kMicro;
constexpr int kChunk = TileShape::kChunk;

struct Layer {  // no padding bytes: upload() caches tables by their bytes
  dev_ptr<char> F;  // typed by the kernel's template arguments
  dev_ptr<const char> X;       // rows (n, d), or the conv input (B, C, H, W) whose patches are the rows
  int64_t n, d, dim;           // rows of X, width of X, width of X~
  int64_t xs[4], fs0, fs1;     // strides of X (2 or 4 used) and F
  int64_t tile_begin, T;       // first block of this layer in the grid; tiles per edge
  int64_t splits, slice_rows;  // row slices (1: no split-K) and rows per slice
  dev_ptr<char> work;          // split-K: the partial tiles, [tile][slice][kTile * kTile] acc_t
  double scale;
  int64_t conv;                // rows are patches of the image X (conv_factor_update_)
  int64_t shape[4];            // the image's shape
  factor_update::ConvGeometry g;
  dev_ptr<const char> S;       // library: X~^T X~'s upper triangle (dim x dim, row stride dim, acc_t), n = 0
  int64_t library;
};

// F[i][j] <- decay F[i][j] + scale v for the thread's kMicro x kMicro elements of tile (ti, tj),
// and the mirror outside a diagonal tile (which holds every (i, j) and its mirror, from the same
// sums).
template <typename acc_t>
__device__ __forceinline__ void store_tile(const Layer& L, int64_t ti, int64_t tj, const acc_t (&acc)[kMicro][kMicro],
                                           acc_t decay, int tx, int ty) {
  const dev_ptr<acc_t> F = ptr_cast<acc_t>(L.F);
  const acc_t scale = static_cast<acc_t>(L.scale);
  for_each_output(tx, ty, [&](int q, int p, int row, int col) {
    const int64_t i = ti * kTile + row, j = tj * kTile + col;
    if (i >= L.dim || j >= L.dim) return;
    const acc_t v = factor_update::decayed<acc_t>(decay, F[i * L.fs0 + j * L.fs1]) + scale * acc[q][p];
    F[i * L.fs0 + j * L.fs1] = v;
    if (ti != tj) F[j * L.fs0 + i * L.fs1] = v;
  });
}

template <typename scalar_t, typename acc_t>
__global__ void factor_update_kernel(dev_ptr<const Layer> layers, int num_layers, acc_t decay) {
  const int64_t b = blockIdx.x;
  const Layer L = layers[entry_of_block(layers, num_layers, b)];
  const int64_t tile = (b - L.tile_begin) / L.splits, slice = (b - L.tile_begin) % L.splits;
  int64_t ti, tj;
  factor_update::upper_tile(tile, L.T, &ti, &tj);
  const int64_t i0 = ti * kTile, j0 = tj * kTile;
  const int64_t row_begin = slice * L.slice_rows, row_end = std::min(L.n, row_begin + L.slice_rows);
  const dev_ptr<const scalar_t> x = ptr_cast<const scalar_t>(L.X);
  const bool ones = L.dim > L.d;

  NATGRAD_SHARED(acc_t, As, [kChunk][kTile + 1]);  // +1: no bank conflicts on the transposed read
  NATGRAD_SHARED(acc_t, Bs, [kChunk][kTile + 1]);
  const int tx = threadIdx.x, ty = threadIdx.y, tid = tx + kEdge * ty, lane = tid % 32, warp = tid / 32;
  acc_t acc[kMicro][kMicro] = {};

  for (int64_t k0 = row_begin; k0 < row_end; k0 += kChunk) {
    // A warp stages one row of both panels per step, lane = column: rows at or past row_end read as zeros.
    for (int r = warp; r < kChunk; r += TileShape::kLoadGroups) {
      if (L.conv) {  // uniform over the block
        As[r][lane] = factor_update::load_patch<acc_t>(x, row_end, L.d, L.shape, L.xs, L.g, ones, k0 + r, i0 + lane);
        Bs[r][lane] = factor_update::load_patch<acc_t>(x, row_end, L.d, L.shape, L.xs, L.g, ones, k0 + r, j0 + lane);
      } else {
        As[r][lane] = factor_update::load_augmented<acc_t>(x, row_end, L.d, L.xs[0], L.xs[1], ones, k0 + r, i0 + lane);
        Bs[r][lane] = factor_update::load_augmented<acc_t>(x, row_end, L.d, L.xs[0], L.xs[1], ones, k0 + r, j0 + lane);
      }
    }
    __syncthreads();
    slab_multiply(As, Bs, acc, tx, ty);
    __syncthreads();
  }

  if (L.library) {
    const dev_ptr<const acc_t> S = ptr_cast<const acc_t>(L.S);
    for_each_output(tx, ty, [&](int q, int p, int row, int col) {
      const int64_t i = i0 + row, j = j0 + col;
      if (i < L.dim && j < L.dim) acc[q][p] += S[std::min(i, j) * L.dim + std::max(i, j)];
    });
  }
  if (L.splits == 1) {
    store_tile(L, ti, tj, acc, decay, tx, ty);
    return;
  }
  const dev_ptr<acc_t> part = ptr_cast<acc_t>(L.work) + (tile * L.splits + slice) * (kTile * kTile);
  for_each_output(tx, ty, [&](int q, int p, int row, int col) { part[row * kTile + col] = acc[q][p]; });
}

// Split-K's second launch: one block per tile of the split layers (numbered by tile_begin in this
// table), the slices summed in order.
template <typename acc_t>
__global__ void factor_reduce_kernel(dev_ptr<const Layer> layers, int num_layers, acc_t decay) {
  const int64_t b = blockIdx.x;
  const Layer L = layers[entry_of_block(layers, num_layers, b)];
  const int64_t tile = b - L.tile_begin;
  int64_t ti, tj;
  factor_update::upper_tile(tile, L.T, &ti, &tj);
  const int tx = threadIdx.x, ty = threadIdx.y;
  const dev_ptr<const acc_t> parts = ptr_cast<const acc_t>(L.work) + tile * L.splits * (kTile * kTile);
  acc_t acc[kMicro][kMicro] = {};
  for_each_output(tx, ty, [&](int q, int p, int row, int col) {
    for (int64_t s = 0; s < L.splits; ++s) acc[q][p] += parts[s * (kTile * kTile) + row * kTile + col];
  });
  store_tile(L, ti, tj, acc, decay, tx, ty);
}

// One launch per (factor dtype, input dtype) group of layers; in practice every layer shares one.
// make(i, &layer) fills layer i's F, X, sizes, strides and conv fields.
template <typename Make>
void launch_groups(at::TensorList factors, at::TensorList inputs, double decay, at::ArrayRef<double> scales,
                   Make make) {
  if (factors.empty()) return;
  const DeviceGuard guard(factors[0].device());
  const stream_t stream = current_stream();
  std::vector<bool> done(factors.size(), false);
  for (size_t first = 0; first < factors.size(); ++first) {
    if (done[first]) continue;
    const auto fdt = factors[first].scalar_type(), xdt = inputs[first].scalar_type();
    std::vector<Layer> layers;
    std::vector<at::Tensor> products;  // the library layers' X~^T X~, alive until the launch is queued
    int64_t tiles = 0;
    for (size_t i = first; i < factors.size(); ++i) {
      if (done[i] || factors[i].scalar_type() != fdt || inputs[i].scalar_type() != xdt) continue;
      done[i] = true;
      Layer L{};
      L.S = device_ptr<const char>(factors[i]);
      make(i, &L);
      if (L.dim == 0) continue;
      if (!L.conv && use_library(L.dim, L.dim, L.n, fdt, xdt)) {
        const at::Tensor& X = inputs[i];
        const at::Tensor Xt = L.dim > L.d ? at::cat({X, at::ones({L.n, 1}, X.options())}, 1) : X;
        const at::Tensor S = uninitialized({L.dim, L.dim}, factors[i].options());
        library_gram(Xt, S);
        products.push_back(S);
        L.S = device_ptr<const char>(S);
        L.library = 1;
        L.n = 0;
      }
      L.fs0 = factors[i].stride(0);
      L.fs1 = factors[i].stride(1);
      L.scale = scales[i];
      L.T = (L.dim + kTile - 1) / kTile;
      tiles += factor_update::upper_tile_count(L.T);
      layers.push_back(L);
    }
    if (layers.empty()) continue;
    // Split-K where the group's tiles leave SMs idle; slices are whole slabs of rows.
    int64_t blocks = 0, work_elems = 0;
    for (Layer& L : layers) {
      const int64_t t = factor_update::upper_tile_count(L.T);
      L.splits = factor_update::row_slices(L.n, tiles, multiprocessors(factors[first]));
      L.slice_rows = L.splits == 1 ? L.n : (L.n + L.splits - 1) / L.splits;
      L.splits = L.splits == 1 ? 1 : (L.n + L.slice_rows - 1) / L.slice_rows;  // no empty slice
      L.tile_begin = blocks;
      blocks += t * L.splits;
      if (L.splits > 1) work_elems += t * L.splits * kTile * kTile;
    }
    TORCH_CHECK(blocks < (int64_t(1) << 31), "factor_update_: too many tiles for one launch");
    const at::Tensor work = uninitialized({work_elems}, factors[first].options());
    std::vector<Layer> split;  // the split layers again, numbered by tile for the second launch
    int64_t offset = 0, reduce_blocks = 0;
    for (Layer& L : layers) {
      if (L.splits == 1) continue;
      const int64_t t = factor_update::upper_tile_count(L.T);
      L.work = device_ptr<char>(work.narrow(0, offset, t * L.splits * kTile * kTile));
      offset += t * L.splits * kTile * kTile;
      split.push_back(L);
      split.back().tile_begin = reduce_blocks;
      reduce_blocks += t;
    }
    // The layer tables travel with the launches: async host-to-device copies (cached by content).
    const at::Tensor table = upload(layers.data(), layers.size() * sizeof(Layer), factors[first]);
    const dev_ptr<const Layer> table_ptr = device_ptr<const Layer>(table);
    const int num_layers = static_cast<int>(layers.size());
    at::Tensor split_table;
    if (!split.empty()) split_table = upload(split.data(), split.size() * sizeof(Layer), factors[first]);

    const dim3 block(kEdge, kEdge), grid(static_cast<unsigned>(blocks));
    AT_DISPATCH_SWITCH(xdt, "factor_update_",
        AT_DISPATCH_CASE_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, [&] {
          using x_t = scalar_t;
          if (fdt == at::kDouble) {
            NATGRAD_LAUNCH((factor_update_kernel<x_t, double>), grid, block, 0, stream, table_ptr,
                           num_layers, decay);
          } else {  // float32: checked_width admits no other factor dtype
            NATGRAD_LAUNCH((factor_update_kernel<x_t, float>), grid, block, 0, stream, table_ptr,
                           num_layers, static_cast<float>(decay));
          }
          NATGRAD_KERNEL_LAUNCH_CHECK();
        }));
    if (split.empty()) continue;
    const dev_ptr<const Layer> split_ptr = device_ptr<const Layer>(split_table);
    const int num_split = static_cast<int>(split.size());
    if (fdt == at::kDouble)
      NATGRAD_LAUNCH((factor_reduce_kernel<double>), dim3(static_cast<unsigned>(reduce_blocks)), block, 0, stream,
                     split_ptr, num_split, decay);
    else
      NATGRAD_LAUNCH((factor_reduce_kernel<float>), dim3(static_cast<unsigned>(reduce_blocks)), block, 0, stream,
                     split_ptr, num_split, static_cast<float>(decay));
    NATGRAD_KERNEL_LAUNCH_CHECK();
  }
}

void factor_update_(at::TensorList factors, at::TensorList given, double decay,
                    at::ArrayRef<double> scales, const c10::List<bool>& append_ones) {
  factor_update::check_lengths(factors, given, scales, append_ones);
  const std::vector<at::Tensor> inputs = factor_update::unaliased_inputs(factors, given);
  launch_groups(factors, inputs, decay, scales, [&](size_t i, Layer* L) {
    const at::Tensor& X = inputs[i];
    L->dim = factor_update::checked_dim(factors[i], X, append_ones.get(i), i);
    L->F = device_ptr<char>(factors[i]);
    L->X = device_ptr<const char>(X);
    L->n = X.size(0);
    L->d = X.size(1);
    L->xs[0] = X.stride(0);
    L->xs[1] = X.stride(1);
  });
}

// The patches of each image, read straight from it by the kernel's loader: no unfold in memory.
void conv_factor_update_(at::TensorList factors, at::TensorList given, at::IntArrayRef geometry, double decay,
                         at::ArrayRef<double> scales, const c10::List<bool>& append_ones) {
  factor_update::check_lengths(factors, given, scales, append_ones);
  const std::vector<at::Tensor> images = factor_update::unaliased_inputs(factors, given);
  TORCH_CHECK(geometry.size() == factors.size() * factor_update::kConvGeometry, "conv_factor_update_: geometry must "
              "hold ", factor_update::kConvGeometry, " ints per layer");
  launch_groups(factors, images, decay, scales, [&](size_t i, Layer* L) {
    const at::Tensor& x = images[i];
    TORCH_CHECK(x.dim() == 4, "conv_factor_update_: images[", i, "] must be (B, C, H, W), got ", x.sizes());
    L->g = factor_update::conv_geometry(geometry, i);
    L->conv = 1;
    L->d = x.size(1) * L->g.kh * L->g.kw;
    L->n = x.size(0) * L->g.oh * L->g.ow;
    L->dim = factor_update::checked_width(factors[i], L->d, append_ones.get(i), i);
    L->F = device_ptr<char>(factors[i]);
    L->X = device_ptr<const char>(x);
    for (int k = 0; k < 4; ++k) {
      L->shape[k] = x.size(k);
      L->xs[k] = x.stride(k);
    }
  });
}

}  // namespace

NATGRAD_CUDA_IMPL(natgrad, m) {
  m.impl("factor_update_", &factor_update_);
  m.impl("conv_factor_update_", &conv_factor_update_);
}

}  // namespace NATGRAD_KERNEL_NS
}  // namespace natgrad
