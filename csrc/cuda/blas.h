// The cuBLAS calls our CUDA host code makes. Under nvcc they are cuBLAS itself; in the emulated
// build (NATGRAD_EMULATE) they are CPU functions with the same names, signatures and column-major
// semantics, which check their arguments as cuBLAS does (a wrong leading dimension returns
// CUBLAS_STATUS_INVALID_VALUE, an unsupported type combination CUBLAS_STATUS_NOT_SUPPORTED) and
// count as library calls. The emulated cublasGemmEx rounds its operands as the requested compute
// type does (TF32: 10 mantissa bits, BF16: 7, to nearest even) and sums in float32 (float64 for
// CUBLAS_COMPUTE_64F), so that reduced-precision results are tested for what they are.
#pragma once

#include <cstring>

#include "cuda/runtime.h"

#ifdef NATGRAD_EMULATE
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

enum cublasStatus_t { CUBLAS_STATUS_SUCCESS = 0, CUBLAS_STATUS_INVALID_VALUE = 7, CUBLAS_STATUS_NOT_SUPPORTED = 15 };
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 };
enum cublasFillMode_t { CUBLAS_FILL_MODE_LOWER = 0, CUBLAS_FILL_MODE_UPPER = 1 };
enum cudaDataType { CUDA_R_32F = 0, CUDA_R_64F = 1, CUDA_R_16F = 2, CUDA_R_16BF = 14 };  // cuda's values
enum cublasComputeType_t {
  CUBLAS_COMPUTE_32F = 68,
  CUBLAS_COMPUTE_64F = 70,
  CUBLAS_COMPUTE_32F_FAST_16BF = 75,
  CUBLAS_COMPUTE_32F_FAST_TF32 = 77,
};
enum cublasGemmAlgo_t { CUBLAS_GEMM_DEFAULT = -1 };
enum cublasMath_t { CUBLAS_DEFAULT_MATH = 0 };
using cublasHandle_t = struct natgrad_emu_blas_handle*;

namespace natgrad {
namespace emu {
// The offset of op(X)[i][l] in a column-major X of leading dimension ld.
inline int64_t op_offset(cublasOperation_t op, int i, int l, int ld) {
  return op == CUBLAS_OP_N ? i + int64_t(l) * ld : l + int64_t(i) * ld;
}

// C[i][j] = alpha sum_l a(i, l) b(l, j) + beta C[i][j] (column-major C, sums in Acc) for the (i, j)
// of an m x n C that `stored` admits; beta = 0: C is not read, as in cuBLAS.
template <typename Acc, typename T, typename LoadA, typename LoadB, typename Stored>
void product_loop(int m, int n, int k, Acc alpha, Acc beta, T* C, int ldc, LoadA a, LoadB b, Stored stored) {
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < m; ++i) {
      if (!stored(i, j)) continue;
      Acc acc = Acc(0);
      for (int l = 0; l < k; ++l) acc += a(i, l) * b(l, j);
      T& c = C[i + int64_t(j) * ldc];
      c = static_cast<T>(alpha * acc + (beta == Acc(0) ? Acc(0) : beta * static_cast<Acc>(c)));
    }
}

// C = alpha op(A) op(B) + beta C, all column-major; op(A) is m x k, op(B) k x n, C m x n.
template <typename T>
cublasStatus_t gemm(const char* name, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                    const T* alpha, const T* A, int lda, const T* B, int ldb, const T* beta, T* C, int ldc) {
  count_library_call(name);
  const int rows_a = ta == CUBLAS_OP_N ? m : k, rows_b = tb == CUBLAS_OP_N ? k : n;
  if (m < 0 || n < 0 || k < 0 || lda < std::max(1, rows_a) || ldb < std::max(1, rows_b) || ldc < std::max(1, m))
    return CUBLAS_STATUS_INVALID_VALUE;
  product_loop<T>(m, n, k, *alpha, *beta, C, ldc, [&](int i, int l) { return A[op_offset(ta, i, l, lda)]; },
                  [&](int l, int j) { return B[op_offset(tb, l, j, ldb)]; }, [](int, int) { return true; });
  return CUBLAS_STATUS_SUCCESS;
}

// C = alpha op(A) op(A)^T + beta C on the `uplo` triangle of C only (the other is not touched),
// column-major; op(A) is n x k (trans N: A is n x k, T: A is k x n).
template <typename T>
cublasStatus_t syrk(const char* name, cublasFillMode_t uplo, cublasOperation_t trans, int n, int k, const T* alpha,
                    const T* A, int lda, const T* beta, T* C, int ldc) {
  count_library_call(name);
  if (n < 0 || k < 0 || lda < std::max(1, trans == CUBLAS_OP_N ? n : k) || ldc < std::max(1, n))
    return CUBLAS_STATUS_INVALID_VALUE;
  const auto op_a = [&](int i, int l) { return A[op_offset(trans, i, l, lda)]; };
  product_loop<T>(n, n, k, *alpha, *beta, C, ldc, op_a, [&](int l, int j) { return op_a(j, l); },
                  [&](int i, int j) { return uplo == CUBLAS_FILL_MODE_LOWER ? i >= j : i <= j; });
  return CUBLAS_STATUS_SUCCESS;
}

// x rounded to `bits` mantissa bits, to nearest even (as a tensor core's operand conversion).
inline float round_mantissa(float x, int bits) {
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  if ((u & 0x7F800000u) == 0x7F800000u) return x;  // inf, NaN
  const int drop = 23 - bits;
  u += ((uint32_t(1) << (drop - 1)) - 1) + ((u >> drop) & 1);
  u &= ~((uint32_t(1) << drop) - 1);
  std::memcpy(&x, &u, sizeof(u));
  return x;
}

inline double load_element(const void* p, cudaDataType t, int64_t i) {
  switch (t) {
    case CUDA_R_64F: return static_cast<const double*>(p)[i];
    case CUDA_R_32F: return static_cast<const float*>(p)[i];
    case CUDA_R_16F: return static_cast<float>(static_cast<const c10::Half*>(p)[i]);
    default: return static_cast<float>(static_cast<const c10::BFloat16*>(p)[i]);
  }
}

// C = alpha op(A) op(B) + beta C as cublasGemmEx, for the combinations our code uses: everything
// float64 with CUBLAS_COMPUTE_64F; float32 C with float32 A and B under any 32F compute type, or
// with bfloat16 or half A and B under CUBLAS_COMPUTE_32F.
inline cublasStatus_t gemm_ex(cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k, const void* alpha,
                              const void* A, cudaDataType at, int lda, const void* B, cudaDataType bt, int ldb,
                              const void* beta, void* C, cudaDataType ct, int ldc, cublasComputeType_t compute) {
  count_library_call("cublasGemmEx");
  const bool f64 = compute == CUBLAS_COMPUTE_64F;
  const bool ok = f64 ? (at == CUDA_R_64F && bt == CUDA_R_64F && ct == CUDA_R_64F)
                      : ct == CUDA_R_32F && at == bt &&
                            (at == CUDA_R_32F || (compute == CUBLAS_COMPUTE_32F && (at == CUDA_R_16BF || at == CUDA_R_16F)));
  if (!ok) return CUBLAS_STATUS_NOT_SUPPORTED;
  const int rows_a = ta == CUBLAS_OP_N ? m : k, rows_b = tb == CUBLAS_OP_N ? k : n;
  if (m < 0 || n < 0 || k < 0 || lda < std::max(1, rows_a) || ldb < std::max(1, rows_b) || ldc < std::max(1, m))
    return CUBLAS_STATUS_INVALID_VALUE;
  const auto all = [](int, int) { return true; };
  if (f64) {
    product_loop<double>(m, n, k, *static_cast<const double*>(alpha), *static_cast<const double*>(beta),
                         static_cast<double*>(C), ldc, [&](int i, int l) { return load_element(A, at, op_offset(ta, i, l, lda)); },
                         [&](int l, int j) { return load_element(B, bt, op_offset(tb, l, j, ldb)); }, all);
    return CUBLAS_STATUS_SUCCESS;
  }
  const int bits = compute == CUBLAS_COMPUTE_32F_FAST_TF32 ? 10 : compute == CUBLAS_COMPUTE_32F_FAST_16BF ? 7 : 23;
  const auto operand = [&](const void* p, cudaDataType t, int64_t i) {
    const float v = static_cast<float>(load_element(p, t, i));
    return bits < 23 ? round_mantissa(v, bits) : v;
  };
  product_loop<float>(m, n, k, *static_cast<const float*>(alpha), *static_cast<const float*>(beta),
                      static_cast<float*>(C), ldc, [&](int i, int l) { return operand(A, at, op_offset(ta, i, l, lda)); },
                      [&](int l, int j) { return operand(B, bt, op_offset(tb, l, j, ldb)); }, all);
  return CUBLAS_STATUS_SUCCESS;
}
}  // namespace emu
}  // namespace natgrad

namespace natgrad {
inline namespace NATGRAD_RUNTIME_NS {  // not the global names cuBLAS itself defines (runtime.h)
inline cublasStatus_t cublasSgemm(cublasHandle_t, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                  const float* alpha, const float* A, int lda, const float* B, int ldb,
                                  const float* beta, float* C, int ldc) {
  return natgrad::emu::gemm("cublasSgemm", ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
}
inline cublasStatus_t cublasDgemm(cublasHandle_t, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                  const double* alpha, const double* A, int lda, const double* B, int ldb,
                                  const double* beta, double* C, int ldc) {
  return natgrad::emu::gemm("cublasDgemm", ta, tb, m, n, k, alpha, A, lda, B, ldb, beta, C, ldc);
}

inline cublasStatus_t cublasSsyrk(cublasHandle_t, cublasFillMode_t uplo, cublasOperation_t trans, int n, int k,
                                  const float* alpha, const float* A, int lda, const float* beta, float* C, int ldc) {
  return natgrad::emu::syrk("cublasSsyrk", uplo, trans, n, k, alpha, A, lda, beta, C, ldc);
}
inline cublasStatus_t cublasDsyrk(cublasHandle_t, cublasFillMode_t uplo, cublasOperation_t trans, int n, int k,
                                  const double* alpha, const double* A, int lda, const double* beta, double* C,
                                  int ldc) {
  return natgrad::emu::syrk("cublasDsyrk", uplo, trans, n, k, alpha, A, lda, beta, C, ldc);
}
inline cublasStatus_t cublasGemmEx(cublasHandle_t, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                                   const void* alpha, const void* A, cudaDataType at, int lda, const void* B,
                                   cudaDataType bt, int ldb, const void* beta, void* C, cudaDataType ct, int ldc,
                                   cublasComputeType_t compute, cublasGemmAlgo_t) {
  return natgrad::emu::gemm_ex(ta, tb, m, n, k, alpha, A, at, lda, B, bt, ldb, beta, C, ct, ldc, compute);
}
inline cublasStatus_t cublasSetMathMode(cublasHandle_t, cublasMath_t) { return CUBLAS_STATUS_SUCCESS; }
inline cublasStatus_t cublasGetMathMode(cublasHandle_t, cublasMath_t* mode) {
  *mode = CUBLAS_DEFAULT_MATH;
  return CUBLAS_STATUS_SUCCESS;
}

inline cublasHandle_t blas_handle() { return nullptr; }
}  // namespace NATGRAD_RUNTIME_NS
}  // namespace natgrad
#else
#include <cublas_v2.h>

namespace natgrad {
inline namespace NATGRAD_RUNTIME_NS {
// torch's handle, bound to the current stream.
inline cublasHandle_t blas_handle() { return at::cuda::getCurrentCUDABlasHandle(); }
}  // namespace NATGRAD_RUNTIME_NS
}  // namespace natgrad
#endif

#define NATGRAD_CUBLAS_CHECK(call)                                                                \
  do {                                                                                            \
    const cublasStatus_t natgrad_status_ = (call);                                                \
    TORCH_CHECK(natgrad_status_ == CUBLAS_STATUS_SUCCESS, #call " failed with cuBLAS status ",  \
                static_cast<int>(natgrad_status_));                                               \
  } while (0)
