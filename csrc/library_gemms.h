// Which products the CUDA ops hand to the GPU's BLAS library (cuBLAS) instead of computing them in
// their own grouped kernels, and in what arithmetic. Process-wide, set from Python
// (natgrad_cuda.ops.set_library_gemms); plain C++ so that the module code can use it.
//
// A product C = A B of m x n x k multiply-adds goes to the library when m n k >= min_macs: large
// enough that one library call, near the GPU's peak, beats a share of a grouped launch whose inner
// loop runs at a fraction of it. Smaller products stay in the grouped kernels, many layers per
// launch. Float64 factors always multiply in float64; for float32 factors the library may use
// tensor cores:
//   kTorch  what torch.matmul does for float32 on CUDA: TF32 when torch allows it
//           (torch.backends.cuda.matmul.allow_tf32 / fp32_precision), else IEEE float32
//   kIeee   IEEE float32 products and sums
//   kTf32   TF32 tensor cores: operands rounded to 10 mantissa bits, float32 sums
//   kBf16   BF16 tensor cores: operands rounded to 7 mantissa bits, float32 sums
#pragma once

#include <cstdint>

namespace natgrad {

enum class GemmPrecision : int { kTorch = 0, kIeee = 1, kTf32 = 2, kBf16 = 3 };

struct LibraryGemms {
  int64_t min_macs = int64_t(1) << 25;  // about 323^3: a 512 x 512 layer's products go, 256 x 256 stay
  GemmPrecision precision = GemmPrecision::kTorch;
};

LibraryGemms library_gemms();  // the current setting
void set_library_gemms(const LibraryGemms& s);

}  // namespace natgrad
