// The cuBLAS calls our CUDA host code makes. Under nvcc they are cuBLAS itself; in the emulated
// build (NATGRAD_EMULATE) they are CPU functions with the same names, signatures and column-major
// semantics, which check their arguments as cuBLAS does (a wrong leading dimension returns
// CUBLAS_STATUS_INVALID_VALUE) and count as library calls.
#pragma once

#include "cuda/runtime.h"

#ifdef NATGRAD_EMULATE
enum cublasStatus_t { CUBLAS_STATUS_SUCCESS = 0, CUBLAS_STATUS_INVALID_VALUE = 7 };
enum cublasOperation_t { CUBLAS_OP_N = 0, CUBLAS_OP_T = 1 };
using cublasHandle_t = struct natgrad_emu_blas_handle*;

namespace natgrad {
namespace emu {
// C = alpha op(A) op(B) + beta C, all column-major; op(A) is m x k, op(B) k x n, C m x n.
template <typename T>
cublasStatus_t gemm(const char* name, cublasOperation_t ta, cublasOperation_t tb, int m, int n, int k,
                    const T* alpha, const T* A, int lda, const T* B, int ldb, const T* beta, T* C, int ldc) {
  count_library_call(name);
  const int rows_a = ta == CUBLAS_OP_N ? m : k, rows_b = tb == CUBLAS_OP_N ? k : n;
  if (m < 0 || n < 0 || k < 0 || lda < std::max(1, rows_a) || ldb < std::max(1, rows_b) || ldc < std::max(1, m))
    return CUBLAS_STATUS_INVALID_VALUE;
  for (int j = 0; j < n; ++j)
    for (int i = 0; i < m; ++i) {
      T acc = T(0);
      for (int l = 0; l < k; ++l) {
        const T a = ta == CUBLAS_OP_N ? A[i + int64_t(l) * lda] : A[l + int64_t(i) * lda];
        const T b = tb == CUBLAS_OP_N ? B[l + int64_t(j) * ldb] : B[j + int64_t(l) * ldb];
        acc += a * b;
      }
      T& c = C[i + int64_t(j) * ldc];
      c = *alpha * acc + (*beta == T(0) ? T(0) : *beta * c);  // beta = 0: C is not read, as in cuBLAS
    }
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
