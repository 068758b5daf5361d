// factor_update_ on the CPU. Wide layers: one BLAS call (addmm) per layer for X^T X, the ones column
// by a column sum, so [X, 1] is never materialised. Narrow layers (where per-op overhead, not
// arithmetic, is the cost): a direct loop over one triangle. Layers run in parallel, balanced by
// their multiply-adds (schedule.h).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "factor_update.h"
#include "schedule.h"

namespace natgrad {
namespace cpu_kernels {
namespace {

// Up to this width (of X~) and this many multiply-adds (rows x width^2) the direct loop beats an
// addmm call and its ATen bookkeeping; past them BLAS wins (tall narrow X, e.g. conv rows, is BLAS's).
constexpr int64_t kDirectMaxDim = 64;
constexpr int64_t kDirectMaxWork = int64_t(1) << 18;

// Rank-1 updates of the upper triangle, row by row of X~, in acc_t; then F <- decay F + scale acc,
// written to both triangles.
template <typename x_t, typename acc_t>
void direct_update(const at::Tensor& F, const at::Tensor& X, bool ones, double decay, double scale) {
  const int64_t n = X.size(0), d = X.size(1), dim = d + (ones ? 1 : 0);
  const x_t* x = X.data_ptr<x_t>();
  const int64_t s0 = X.stride(0), s1 = X.stride(1);
  std::vector<acc_t> acc(dim * dim, acc_t(0)), row(dim);
  for (int64_t k = 0; k < n; ++k) {
    for (int64_t c = 0; c < dim; ++c) row[c] = factor_update::load_augmented<acc_t>(x, n, d, s0, s1, ones, k, c);
    for (int64_t i = 0; i < dim; ++i) {
      const acc_t a = row[i];
      acc_t* out = acc.data() + i * dim;
      for (int64_t j = i; j < dim; ++j) out[j] += a * row[j];
    }
  }
  acc_t* f = F.data_ptr<acc_t>();
  const int64_t f0 = F.stride(0), f1 = F.stride(1);
  const acc_t dec = static_cast<acc_t>(decay), sc = static_cast<acc_t>(scale);
  for (int64_t i = 0; i < dim; ++i)
    for (int64_t j = i; j < dim; ++j) {
      const acc_t v = factor_update::decayed(dec, f[i * f0 + j * f1]) + sc * acc[i * dim + j];
      f[i * f0 + j * f1] = v;
      f[j * f0 + i * f1] = v;
    }
}

void blas_update(const at::Tensor& F, const at::Tensor& input, bool ones, double decay, double scale) {
  const int64_t n = input.size(0), d = input.size(1);
  // The factor's dtype is the accumulation dtype (fp32 or fp64): half inputs are widened first.
  const at::Tensor X = input.to(F.scalar_type());
  // addmm_ with beta 0 does not read F, as factor_update::decayed
  F.narrow(0, 0, d).narrow(1, 0, d).addmm_(X.t(), X, /*beta=*/decay, /*alpha=*/scale);
  if (ones) {
    auto decay_ = [&](at::Tensor t) { return decay == 0.0 ? t.zero_() : t.mul_(decay); };
    at::Tensor col = F.select(1, d).narrow(0, 0, d);
    decay_(col).add_(X.sum(0), scale);
    F.select(0, d).narrow(0, 0, d).copy_(col);
    decay_(F.select(0, d).select(0, d)).add_(scale * static_cast<double>(n));
  }
}

}  // namespace

void factor_update_(at::TensorList factors, at::TensorList given, double decay,
                    at::ArrayRef<double> scales, const c10::List<bool>& append_ones) {
  factor_update::check_lengths(factors, given, scales, append_ones);
  const std::vector<at::Tensor> inputs = factor_update::unaliased_inputs(factors, given);
  std::vector<int64_t> layers;
  std::vector<double> work;
  for (size_t i = 0; i < factors.size(); ++i) {
    const int64_t dim = factor_update::checked_dim(factors[i], inputs[i], append_ones.get(i), i);
    if (dim == 0) continue;
    layers.push_back(static_cast<int64_t>(i));
    work.push_back(static_cast<double>(inputs[i].size(0)) * static_cast<double>(dim * dim));
  }
  // Layers balanced over the cores (schedule.h): inside a lane BLAS runs single-threaded, a layer
  // too big to balance runs alone with threaded BLAS.
  run_balanced(work, [&](int64_t k) {
    const int64_t i = layers[k];
    const at::Tensor& F = factors[i];
    const at::Tensor& X = inputs[i];
    const int64_t dim = F.size(0);
    if (dim > kDirectMaxDim || X.size(0) * dim * dim > kDirectMaxWork) {
      blas_update(F, X, append_ones.get(i), decay, scales[i]);
      return;
    }
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, X.scalar_type(), "factor_update_", [&] {
      if (F.scalar_type() == at::kDouble) {
        direct_update<scalar_t, double>(F, X, append_ones.get(i), decay, scales[i]);
      } else {
        direct_update<scalar_t, float>(F, X, append_ones.get(i), decay, scales[i]);
      }
    });
  });
}

// conv_factor_update_: the patches of a slice of the batch at a time, written straight from the
// image as rows of the factor's dtype (no padded copy, no unfold, no transpose), each slice through
// factor_update_, so memory is bounded by the slice, not the batch: the full unfold is never
// materialised.
constexpr int64_t kConvChunkValues = int64_t(1) << 22;  // 16 MB of fp32 patches

// Rows b0 * positions .. (b0 + nb) * positions of the patch matrix, (nb * positions, d), into out.
// The values of factor_update::patch_value (the CUDA loader's), with patch_y / patch_x and the
// bounds worked out once per kernel row and column instead of per value, leaving a load and a store
// per value (digits CNN conv2, 2048 x 144 patches: the per-value form took as long as the GEMM
// after it; 0.70 -> 0.52 ms for the whole update).
template <typename x_t, typename acc_t>
void write_patch_rows(const at::Tensor& x, const factor_update::ConvGeometry& g, int64_t b0, int64_t nb,
                      acc_t* out) {
  const x_t* p = x.data_ptr<x_t>();
  const int64_t H = x.size(2), W = x.size(3), channels = x.size(1);
  const int64_t xs0 = x.stride(0), xs1 = x.stride(1), xs2 = x.stride(2), xs3 = x.stride(3);
  const int64_t positions = g.oh * g.ow, d = channels * g.kh * g.kw;
  const int64_t grain = std::max<int64_t>(1, 4096 / std::max<int64_t>(d, 1));  // about 4096 values per task
  at::parallel_for(0, nb * positions, grain, [&](int64_t begin, int64_t end) {
    std::vector<int64_t> col_offset(g.kw);  // x offset of each kernel column, -1 outside the image
    for (int64_t k = begin; k < end; ++k) {
      const int64_t pos = k % positions, oy = pos / g.ow, ox = pos % g.ow, b = b0 + k / positions;
      for (int64_t kx = 0; kx < g.kw; ++kx) {
        const int64_t xx = factor_update::patch_x(g, ox, kx);
        col_offset[kx] = xx >= 0 && xx < W ? xx * xs3 : -1;
      }
      acc_t* row = out + k * d;
      for (int64_t ch = 0; ch < channels; ++ch) {
        const x_t* plane = p + b * xs0 + ch * xs1;
        for (int64_t ky = 0; ky < g.kh; ++ky) {
          const int64_t y = factor_update::patch_y(g, oy, ky);
          if (y < 0 || y >= H) {
            for (int64_t kx = 0; kx < g.kw; ++kx) *row++ = acc_t(0);
            continue;
          }
          const x_t* line = plane + y * xs2;
          for (int64_t kx = 0; kx < g.kw; ++kx)
            *row++ = col_offset[kx] < 0 ? acc_t(0) : static_cast<acc_t>(line[col_offset[kx]]);
        }
      }
    }
  });
}

void conv_factor_update_(at::TensorList factors, at::TensorList given, at::IntArrayRef geometry, double decay,
                         at::ArrayRef<double> scales, const c10::List<bool>& append_ones) {
  factor_update::check_lengths(factors, given, scales, append_ones);
  const std::vector<at::Tensor> images = factor_update::unaliased_inputs(factors, given);
  TORCH_CHECK(geometry.size() == factors.size() * factor_update::kConvGeometry, "conv_factor_update_: geometry must "
              "hold ", factor_update::kConvGeometry, " ints per layer");
  for (size_t i = 0; i < factors.size(); ++i) {
    const at::Tensor& x = images[i];
    const at::Tensor& F = factors[i];
    TORCH_CHECK(x.dim() == 4, "conv_factor_update_: images[", i, "] must be (B, C, H, W), got ", x.sizes());
    const factor_update::ConvGeometry g = factor_update::conv_geometry(geometry, i);
    const int64_t d = x.size(1) * g.kh * g.kw, positions = g.oh * g.ow;
    const bool ones = append_ones.get(i);
    factor_update::checked_width(F, d, ones, i);
    const int64_t batch = x.size(0), per_image = std::max<int64_t>(positions * d, 1);
    if (batch == 0 || positions == 0) {
      decay == 0.0 ? F.zero_() : F.mul_(decay);
      continue;
    }
    const int64_t chunk = std::max<int64_t>(1, kConvChunkValues / per_image);
    at::Tensor rows = at::empty({std::min(chunk, batch) * positions, d}, F.options());
    for (int64_t b0 = 0; b0 < batch; b0 += chunk) {
      const int64_t nb = std::min(chunk, batch - b0);
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "conv_factor_update_", [&] {
        if (F.scalar_type() == at::kDouble) {
          write_patch_rows<scalar_t, double>(x, g, b0, nb, rows.data_ptr<double>());
        } else {
          write_patch_rows<scalar_t, float>(x, g, b0, nb, rows.data_ptr<float>());
        }
      });
      factor_update_({F}, {rows.narrow(0, 0, nb * positions)}, b0 == 0 ? decay : 1.0, {scales[i]},
                     c10::List<bool>({ones}));
    }
  }
}

TORCH_LIBRARY_IMPL(natgrad, CPU, m) {
  m.impl("factor_update_", &factor_update_);
  m.impl("conv_factor_update_", &conv_factor_update_);
}

}  // namespace cpu_kernels
}  // namespace natgrad
