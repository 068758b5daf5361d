// Which products the CUDA ops hand to the GPU's BLAS library (cuBLAS) instead of computing them in
// their own grouped kernels, and in what arithmetic. Process-wide, set from Python
// (natgrad_cuda.ops.set_library_gemms); plain C++ so that the module code can use it.
//
// A product C = A B of m x n x k multiply-adds goes to the library when m n k >= min_macs: large
// enough that one library call, near the GPU's peak, beats a share of a grouped launch whose inner
// loop runs at half of FP32's at best. Smaller products stay in the grouped kernels, many layers
// per launch. min_macs = kAuto takes the threshold from the arithmetic: kAutoIeee for IEEE float32
// and float64 products, kAutoTensorCores for TF32, BF16 and bf16/fp16 operands, which the library
// runs several times faster (where bench/gpu_cost_model.py finds the library faster for MLPs of
// equal layers; estimates until a GPU run measures them). Float64 factors always multiply in
// float64; for float32 factors the library may use tensor cores:
//   kTorch  what torch.matmul does for float32 on CUDA: TF32 when torch allows it
//           (torch.backends.cuda.matmul.allow_tf32 / fp32_precision), else IEEE float32
//   kIeee   IEEE float32 products and sums
//   kTf32   TF32 tensor cores: operands rounded to 10 mantissa bits, float32 sums
//   kBf16   BF16 tensor cores: operands rounded to 7 mantissa bits, float32 sums
#pragma once

#include <cstdint>

namespace natgrad {

enum class GemmPrecision : int { kTorch = 0, kIeee = 1, kTf32 = 2, kBf16 = 3 };

constexpr int64_t kAuto = -1;
constexpr int64_t kAutoIeee = int64_t(1) << 28;         // about 645^3
constexpr int64_t kAutoTensorCores = int64_t(1) << 26;  // about 406^3

struct LibraryGemms {
  int64_t min_macs = kAuto;
  GemmPrecision precision = GemmPrecision::kTorch;
};

LibraryGemms library_gemms();  // the current setting
void set_library_gemms(const LibraryGemms& s);

}  // namespace natgrad
