// Products handed to cuBLAS (library_gemms.h says which, and in what precision): C = alpha op(A)
// op(B) + beta C for torch tensors of any strides, C of the factors' dtype (float32 or float64),
// and the symmetric X^T X (library_gram).
// Row-major C is cuBLAS's column-major C^T = op(B)^T op(A)^T, so the call swaps the operands; an
// operand cuBLAS cannot read in place (no unit stride, or not the factors' dtype) is copied first.
// Used by the grouped ops (cuda/grouped_gemm.cuh) and factor_update_.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>

#include "cuda/blas.h"
#include "cuda/runtime.h"
#include "library_gemms.h"

namespace natgrad {
inline namespace NATGRAD_RUNTIME_NS {

// The compute type for a product into C of dtype `dt`, operands of dtype `in`.
inline cublasComputeType_t compute_type(at::ScalarType dt, at::ScalarType in) {
  if (dt == at::kDouble) return CUBLAS_COMPUTE_64F;
  if (in != at::kFloat) return CUBLAS_COMPUTE_32F;  // bf16 and half operands: exact products, float32 sums
  switch (library_gemms().precision) {
    case GemmPrecision::kIeee: return CUBLAS_COMPUTE_32F;
    case GemmPrecision::kTf32: return CUBLAS_COMPUTE_32F_FAST_TF32;
    case GemmPrecision::kBf16: return CUBLAS_COMPUTE_32F_FAST_16BF;
    default: return at::globalContext().allowTF32CuBLAS() ? CUBLAS_COMPUTE_32F_FAST_TF32 : CUBLAS_COMPUTE_32F;
  }
}

// Whether a product of m x n x k multiply-adds into the factors' dtype `dt`, operands of dtype
// `in`, goes to the library (never an empty one); min_macs = kAuto: by the arithmetic it would get.
inline bool use_library(int64_t m, int64_t n, int64_t k, at::ScalarType dt, at::ScalarType in) {
  if (m <= 0 || n <= 0 || k <= 0) return false;
  int64_t min_macs = library_gemms().min_macs;
  if (min_macs == kAuto) {
    const cublasComputeType_t c = compute_type(dt, in);
    const bool tensor_cores = c == CUBLAS_COMPUTE_32F_FAST_TF32 || c == CUBLAS_COMPUTE_32F_FAST_16BF ||
                              (dt == at::kFloat && in != at::kFloat);
    min_macs = tensor_cores ? kAutoTensorCores : kAutoIeee;
  }
  return static_cast<double>(m) * static_cast<double>(n) * static_cast<double>(k) >= static_cast<double>(min_macs);
}

inline cudaDataType data_type(at::ScalarType t) {
  switch (t) {
    case at::kDouble: return CUDA_R_64F;
    case at::kFloat: return CUDA_R_32F;
    case at::kHalf: return CUDA_R_16F;
    default: return CUDA_R_16BF;
  }
}

// The handle in the default math mode for one call, its mode restored after: torch configures its
// handle for TF32 when torch.backends.cuda.matmul.allow_tf32 is set, and under that mode cuBLAS may
// run a CUBLAS_COMPUTE_32F product on TF32 tensor cores; the compute type alone is to decide.
struct DefaultMath {
  explicit DefaultMath(cublasHandle_t h) : handle(h) {
    NATGRAD_CUBLAS_CHECK(cublasGetMathMode(handle, &saved));
    NATGRAD_CUBLAS_CHECK(cublasSetMathMode(handle, CUBLAS_DEFAULT_MATH));
  }
  ~DefaultMath() { cublasSetMathMode(handle, saved); }
  DefaultMath(const DefaultMath&) = delete;
  DefaultMath& operator=(const DefaultMath&) = delete;
  cublasHandle_t handle;
  cublasMath_t saved;
};

// X (r x c) as cuBLAS reads it: op N on a column-major r x c matrix (X[i][j] at i + j ld) or op T
// on a column-major c x r one (X[i][j] at j + i ld); ok = false when neither fits its strides.
struct ColumnMajor {
  bool ok = false;
  cublasOperation_t op = CUBLAS_OP_N;
  int64_t ld = 1;
};
inline ColumnMajor column_major(const at::Tensor& X) {
  const int64_t r = X.size(0), c = X.size(1);
  ColumnMajor out;
  if (X.stride(0) == 1 || r == 1) {
    out.ld = c == 1 ? std::max<int64_t>(1, r) : X.stride(1);
    if (out.ld >= std::max<int64_t>(1, r)) {
      out.ok = true;
      return out;
    }
  }
  if (X.stride(1) == 1 || c == 1) {
    out.op = CUBLAS_OP_T;
    out.ld = r == 1 ? std::max<int64_t>(1, c) : X.stride(0);
    out.ok = out.ld >= std::max<int64_t>(1, c);
  }
  return out;
}

// Whether cuBLAS can write C (m x n) in place as row-major (column-major C^T).
inline bool row_major(const at::Tensor& C) {
  const int64_t m = C.size(0), n = C.size(1);
  return (C.stride(1) == 1 || n == 1) && (C.stride(0) >= std::max<int64_t>(1, n) || m == 1);
}

// C = alpha op(A) op(B) + beta C (beta = 0: C is not read). C must be row-major-strided
// (stride(1) == 1, stride(0) >= its columns) and of the factors' dtype; A and B may be anything.
inline void library_gemm(const at::Tensor& A, bool ta, const at::Tensor& B, bool tb, const at::Tensor& C,
                         double alpha = 1.0, double beta = 0.0) {
  const at::ScalarType dt = C.scalar_type();
  const int64_t m = C.size(0), n = C.size(1);
  TORCH_CHECK((dt == at::kFloat || dt == at::kDouble) && row_major(C),
              "library_gemm: C must be a row-major float32 or float64 matrix");
  // Operands in C's dtype, except bf16 and half into float32 (cuBLAS multiplies those as they are).
  const auto operand = [&](const at::Tensor& X) {
    const bool narrow = dt == at::kFloat && A.scalar_type() == B.scalar_type() &&
                        (X.scalar_type() == at::kBFloat16 || X.scalar_type() == at::kHalf);
    at::Tensor x = narrow || X.scalar_type() == dt ? X : X.to(dt);
    return column_major(x).ok ? x : x.contiguous();
  };
  const at::Tensor a = operand(A), b = operand(B);
  // C^T (n x m) = P Q with P = op(B)^T (n x k), Q = op(A)^T (k x m).
  const at::Tensor P = (tb ? b.t() : b).t(), Q = (ta ? a.t() : a).t();
  const int64_t k = P.size(1);
  TORCH_CHECK(Q.size(0) == k && Q.size(1) == m && P.size(0) == n, "library_gemm: shapes do not chain");
  const ColumnMajor p = column_major(P), q = column_major(Q);
  const int64_t ldc = m == 1 ? std::max<int64_t>(1, n) : C.stride(0);
  constexpr int64_t kInt = int64_t(1) << 31;
  TORCH_CHECK(m < kInt && n < kInt && k < kInt && p.ld < kInt && q.ld < kInt && ldc < kInt,
              "library_gemm: a dimension exceeds cuBLAS's 32-bit int");
  if (m == 0 || n == 0) return;
  const cublasComputeType_t compute = compute_type(dt, a.scalar_type());
  const cublasHandle_t handle = blas_handle();
  const DefaultMath math(handle);
  const double alpha64 = alpha, beta64 = beta;
  const float alpha32 = static_cast<float>(alpha), beta32 = static_cast<float>(beta);
  const void* al = dt == at::kDouble ? static_cast<const void*>(&alpha64) : &alpha32;
  const void* be = dt == at::kDouble ? static_cast<const void*>(&beta64) : &beta32;
  NATGRAD_CUBLAS_CHECK(cublasGemmEx(handle, p.op, q.op, static_cast<int>(n), static_cast<int>(m), static_cast<int>(k),
                                    al, P.data_ptr(), data_type(P.scalar_type()), static_cast<int>(p.ld),
                                    Q.data_ptr(), data_type(Q.scalar_type()), static_cast<int>(q.ld), be,
                                    C.data_ptr(), data_type(dt), static_cast<int>(ldc), compute, CUBLAS_GEMM_DEFAULT));
}

// The upper triangle (i <= j) of C = X^T X (C dim x dim, row-major, of the factors' dtype; the lower
// triangle is left unwritten or holds the same sums). Where the arithmetic is IEEE (float64, or
// float32 without tensor cores) and X is of C's dtype, one SYRK: half a GEMM's products. Otherwise a
// GEMM of the whole square, for the tensor cores (or bf16 and half operands as they are).
inline void library_gram(const at::Tensor& X, const at::Tensor& C) {
  const at::ScalarType dt = C.scalar_type();
  const cublasComputeType_t compute = compute_type(dt, X.scalar_type());
  if (X.scalar_type() != dt || !(compute == CUBLAS_COMPUTE_32F || compute == CUBLAS_COMPUTE_64F)) {
    library_gemm(X, true, X, false, C);
    return;
  }
  const int64_t dim = X.size(1), rows = X.size(0);
  TORCH_CHECK(C.size(0) == dim && C.size(1) == dim && C.is_contiguous(), "library_gram: C must be a dense dim x dim matrix");
  // Row-major C's upper triangle is column-major C's lower. X^T as cuBLAS reads it is op(A), dim x rows.
  const at::Tensor Xc = column_major(X.t()).ok ? X : X.contiguous();
  const ColumnMajor a = column_major(Xc.t());
  constexpr int64_t kInt = int64_t(1) << 31;
  TORCH_CHECK(dim < kInt && rows < kInt && a.ld < kInt, "library_gram: a dimension exceeds cuBLAS's 32-bit int");
  if (dim == 0) return;
  const cublasHandle_t handle = blas_handle();
  const DefaultMath math(handle);
  const int n = static_cast<int>(dim), k = static_cast<int>(rows), lda = static_cast<int>(a.ld);
  const int ldc = static_cast<int>(std::max<int64_t>(1, dim));
  if (dt == at::kDouble) {
    const double one = 1.0, zero = 0.0;
    NATGRAD_CUBLAS_CHECK(cublasDsyrk(handle, CUBLAS_FILL_MODE_LOWER, a.op, n, k, &one, Xc.data_ptr<double>(), lda,
                                     &zero, C.data_ptr<double>(), ldc));
  } else {
    const float one = 1.0f, zero = 0.0f;
    NATGRAD_CUBLAS_CHECK(cublasSsyrk(handle, CUBLAS_FILL_MODE_LOWER, a.op, n, k, &one, Xc.data_ptr<float>(), lda,
                                     &zero, C.data_ptr<float>(), ldc));
  }
}

}  // namespace NATGRAD_RUNTIME_NS
}  // namespace natgrad
