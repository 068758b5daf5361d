// factor_update_: F_i <- decay * F_i + scale_i * X~_i^T X~_i for many layers in one call,
// X~_i = [X_i, 1] when append_ones_i. The math shared by the CPU and CUDA kernels; each kernel file
// registers its own entry point with the dispatcher.
#pragma once

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/ArrayRef.h>
#include <c10/util/Exception.h>

#include <ATen/MemoryOverlap.h>
#include <c10/core/StorageImpl.h>

#include <algorithm>
#include <cstdint>
#include <unordered_map>
#include <vector>

#include "common.h"

namespace natgrad {

namespace factor_update {

// Host-side checks of every kernel entry point (ops.py checks first, with friendlier messages;
// these guard direct torch.ops calls).
inline void check_lengths(at::TensorList factors, at::TensorList inputs, at::ArrayRef<double> scales,
                          const c10::List<bool>& append_ones) {
  TORCH_CHECK(inputs.size() == factors.size() && scales.size() == factors.size() &&
                  append_ones.size() == factors.size(),
              "factor_update_: factors, inputs, scales and append_ones must have the same length");
}

// The inputs the kernels may read while they write the factors: every tensor on factors[0]'s
// device (a host pointer in a CUDA kernel would poison the context), no factor overlapping itself or
// another (the result would depend on the write order), and a copy of any input that shares memory
// with a factor (F_i <- X^T X with X = F_i would read what it already overwrote). Factors are
// grouped by storage first, so the usual call (every tensor its own storage) costs one lookup per input.
inline std::vector<at::Tensor> unaliased_inputs(at::TensorList factors, at::TensorList inputs) {
  std::unordered_map<const c10::StorageImpl*, std::vector<size_t>> by_storage;
  for (size_t i = 0; i < factors.size(); ++i) {
    const at::Tensor& F = factors[i];
    TORCH_CHECK(F.device() == factors[0].device() && inputs[i].device() == F.device(), "factor_update_: factors[",
                i, "] and inputs[", i, "] must be on ", factors[0].device(), ", got ", F.device(), " and ",
                inputs[i].device());
    TORCH_CHECK(at::has_internal_overlap(F) != at::MemOverlap::Yes, "factor_update_: factors[", i,
                "] has elements sharing memory (an expanded view?)");
    auto& same = by_storage[F.storage().unsafeGetStorageImpl()];
    for (size_t j : same)
      TORCH_CHECK(at::get_overlap_status(F, factors[j]) == at::MemOverlapStatus::No, "factor_update_: factors[", i,
                  "] and factors[", j, "] share memory");
    same.push_back(i);
  }
  std::vector<at::Tensor> out(inputs.begin(), inputs.end());
  for (auto& X : out) {
    const auto found = by_storage.find(X.storage().unsafeGetStorageImpl());
    if (found == by_storage.end()) continue;
    for (size_t j : found->second)
      if (at::get_overlap_status(X, factors[j]) != at::MemOverlapStatus::No) {
        X = X.clone();
        break;
      }
  }
  return out;
}

// The width d + ones of X~_i = [X_i, 1?] (X_i of width d), checked against factors[i]'s shape and dtype.
inline int64_t checked_width(const at::Tensor& F, int64_t d, bool ones, size_t i) {
  const int64_t dim = d + (ones ? 1 : 0);
  TORCH_CHECK(F.dim() == 2 && F.size(0) == dim && F.size(1) == dim, "factor_update_: factors[", i,
              "] must be (", dim, ", ", dim, ")");
  TORCH_CHECK(F.scalar_type() == at::kFloat || F.scalar_type() == at::kDouble, "factor_update_: factors[", i,
              "] must be float32 or float64");
  return dim;
}

inline int64_t checked_dim(const at::Tensor& F, const at::Tensor& X, bool ones, size_t i) {
  return checked_width(F, X.size(1), ones, i);
}

// Element (row k, column c) of X~ = [X, 1] without materialising the ones column; rows past n
// and columns past the width read as zero so that partial tiles need no branches in the inner loop.
// ptr_t: a pointer to the input's elements (a checked pointer in the emulated build).
template <typename acc_t, typename ptr_t>
NATGRAD_HOST_DEVICE inline acc_t load_augmented(const ptr_t& x, int64_t n, int64_t d,
                                                int64_t stride0, int64_t stride1, bool ones,
                                                int64_t k, int64_t c) {
  if (k >= n) return acc_t(0);
  if (c < d) return static_cast<acc_t>(x[k * stride0 + c * stride1]);
  return (ones && c == d) ? acc_t(1) : acc_t(0);
}

// decay * f, except that decay 0 does not read f (as BLAS's beta = 0): a factor may start
// uninitialised, and a NaN in it is not carried over.
template <typename T>
NATGRAD_HOST_DEVICE inline T decayed(T decay, T f) {
  return decay == T(0) ? T(0) : decay * f;
}

// Upper-triangle tile number t (row-major over tiles with ti <= tj) of a T x T tile grid.
NATGRAD_HOST_DEVICE inline void upper_tile(int64_t t, int64_t T, int64_t* ti, int64_t* tj) {
  int64_t row = 0;
  while (t >= T - row) {
    t -= T - row;
    ++row;
  }
  *ti = row;
  *tj = row + t;
}

NATGRAD_HOST_DEVICE inline int64_t upper_tile_count(int64_t T) { return T * (T + 1) / 2; }

// Split-K on CUDA: into how many row slices a layer of n rows is cut when its launch holds `tiles`
// tiles in all, on a GPU of `sms` multiprocessors. Enough slices for about two blocks per SM, none
// shorter than kMinSliceRows rows (below that the partial tiles' traffic outweighs the gain).
constexpr int64_t kMinSliceRows = 512;
inline int64_t row_slices(int64_t n, int64_t tiles, int64_t sms) {
  const int64_t target = 2 * sms;
  if (tiles >= target) return 1;
  return std::min((target + tiles - 1) / tiles, std::max<int64_t>(1, n / kMinSliceRows));
}

// ---- conv_factor_update_: the rows of X are the patches of a convolution's input, never unfolded ----

// Per layer, 10 ints: kernel (kh, kw), stride (sh, sw), dilation (dh, dw), top and left zero padding
// (pt, pl), output positions (oh, ow). Row r = (b, y, x) of the virtual X is the patch at output
// position (y, x) of image b, in F.unfold's column order (channel, kernel row, kernel column).
constexpr int kConvGeometry = 10;

struct ConvGeometry {
  int64_t kh, kw, sh, sw, dh, dw, pt, pl, oh, ow;
};

inline ConvGeometry conv_geometry(at::IntArrayRef g, size_t i) {
  TORCH_CHECK(g.size() >= (i + 1) * kConvGeometry, "conv_factor_update_: geometry must hold ", kConvGeometry,
              " ints per layer");
  const int64_t* v = g.data() + i * kConvGeometry;
  const ConvGeometry c{v[0], v[1], v[2], v[3], v[4], v[5], v[6], v[7], v[8], v[9]};
  TORCH_CHECK(c.kh > 0 && c.kw > 0 && c.sh > 0 && c.sw > 0 && c.dh > 0 && c.dw > 0 && c.pt >= 0 && c.pl >= 0 &&
                  c.oh >= 0 && c.ow >= 0,
              "conv_factor_update_: layer ", i, ": kernel, stride and dilation must be positive, padding and output "
              "size non-negative");
  return c;
}

// The image row under kernel row ky at output row oy, and the image column under kernel column kx
// at output column ox; outside [0, H) or [0, W) they fall in the zero padding.
NATGRAD_HOST_DEVICE inline int64_t patch_y(const ConvGeometry& g, int64_t oy, int64_t ky) {
  return oy * g.sh + ky * g.dh - g.pt;
}
NATGRAD_HOST_DEVICE inline int64_t patch_x(const ConvGeometry& g, int64_t ox, int64_t kx) {
  return ox * g.sw + kx * g.dw - g.pl;
}

// The input under tap (ky, kx) of channel ch at output position (oy, ox) of image b, for image x
// (B, C, H, W; strides xs): zero outside the image (the zero padding).
template <typename acc_t, typename ptr_t>
NATGRAD_HOST_DEVICE inline acc_t patch_value(const ptr_t& x, const int64_t* shape, const int64_t* xs,
                                             const ConvGeometry& g, int64_t b, int64_t oy, int64_t ox, int64_t ch,
                                             int64_t ky, int64_t kx) {
  const int64_t y = patch_y(g, oy, ky);
  const int64_t xx = patch_x(g, ox, kx);
  if (y < 0 || y >= shape[2] || xx < 0 || xx >= shape[3]) return acc_t(0);
  return static_cast<acc_t>(x[b * xs[0] + ch * xs[1] + y * xs[2] + xx * xs[3]]);
}

// Element (row k, column c) of [X, 1] for the patches of image x without materialising them: rows
// are (image, output position), columns (channel, ky, kx) as in the weight's flattening; zero past
// the last row.
template <typename acc_t, typename ptr_t>
NATGRAD_HOST_DEVICE inline acc_t load_patch(const ptr_t& x, int64_t n, int64_t d, const int64_t* shape,
                                            const int64_t* xs, const ConvGeometry& g, bool ones, int64_t k,
                                            int64_t c) {
  if (k >= n) return acc_t(0);
  if (c >= d) return (ones && c == d) ? acc_t(1) : acc_t(0);
  const int64_t positions = g.oh * g.ow, pos = k % positions, taps = g.kh * g.kw, tap = c % taps;
  return patch_value<acc_t>(x, shape, xs, g, k / positions, pos / g.ow, pos % g.ow, c / taps, tap / g.kw,
                            tap % g.kw);
}

}  // namespace factor_update
}  // namespace natgrad
