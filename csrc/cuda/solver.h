// The cuSOLVER calls our CUDA host code makes (the 64-bit "X" API: syevd, syevBatched, potrf,
// potrs). Under nvcc they are cuSOLVER itself; in the emulated build (NATGRAD_EMULATE) they are CPU
// functions with the same names, signatures and column-major semantics. The emulated solvers read
// only the triangle `uplo` names, check leading dimensions, data types and workspace sizes as
// cuSOLVER does (CUSOLVER_STATUS_INVALID_VALUE), write eigenvectors over A and eigenvalues ascending
// into W (syev), the Cholesky factor over the named triangle of A, leaving the other untouched, with
// info = i > 0 when the leading minor of order i is not positive definite (potrf), the solution over
// B (potrs), and count as library calls, so that a wrong triangle, leading dimension or batch
// stride fails a test. Both compute in A's own precision, as cuSOLVER does, so that a float32
// factorisation fails where float32 rounding makes the matrix indefinite and a float32
// eigendecomposition overflows where cuSOLVER's would (the callers' float64 retries).
#pragma once

#include <limits>

#include "cuda/blas.h"
#include "cuda/runtime.h"

#ifdef NATGRAD_EMULATE
#include <algorithm>
#include <vector>

enum cusolverStatus_t { CUSOLVER_STATUS_SUCCESS = 0, CUSOLVER_STATUS_INVALID_VALUE = 3 };
enum cusolverEigMode_t { CUSOLVER_EIG_MODE_NOVECTOR = 0, CUSOLVER_EIG_MODE_VECTOR = 1 };
using cusolverDnHandle_t = struct natgrad_emu_solver_handle*;
using cusolverDnParams_t = struct natgrad_emu_solver_params*;

namespace natgrad {
inline namespace NATGRAD_RUNTIME_NS {  // not the global names cuSOLVER itself defines (runtime.h)
inline cusolverStatus_t cusolverDnCreateParams(cusolverDnParams_t* params) {
  *params = nullptr;
  return CUSOLVER_STATUS_SUCCESS;
}
inline cusolverStatus_t cusolverDnDestroyParams(cusolverDnParams_t) { return CUSOLVER_STATUS_SUCCESS; }
}  // namespace NATGRAD_RUNTIME_NS
}  // namespace natgrad

namespace natgrad {
namespace emu {

inline size_t solver_item(cudaDataType t) { return t == CUDA_R_64F ? sizeof(double) : sizeof(float); }

// Workspace the emulated solver asks for (and then insists on): one n x n matrix per batch entry.
inline size_t syev_device_bytes(int64_t n, cudaDataType t, int64_t batch) {
  return static_cast<size_t>(std::max<int64_t>(n * n * batch, 1)) * solver_item(t);
}

template <typename T>
at::Tensor symmetric_from(cublasFillMode_t uplo, int64_t n, const T* A, int64_t lda);

// In A's own precision, as cuSOLVER: a float32 decomposition that overflows or fails does so here
// too, so that the caller's float64 retry is exercised.
template <typename T>
void syev_one(cusolverEigMode_t jobz, cublasFillMode_t uplo, int64_t n, T* A, int64_t lda, T* W, int* info) {
  const at::Tensor M = symmetric_from(uplo, n, A, lda);  // only the named triangle is read
  at::Tensor w, v;
  try {
    std::tie(w, v) = at::linalg_eigh(M);
  } catch (const c10::Error&) {
    *info = 1;  // did not converge, as cuSOLVER reports it
    return;
  }
  *info = 0;
  const T* wd = w.data_ptr<T>();
  const at::Tensor vc = v.contiguous();
  const T* vd = vc.data_ptr<T>();
  for (int64_t i = 0; i < n; ++i) W[i] = static_cast<T>(wd[i]);
  if (jobz == CUSOLVER_EIG_MODE_VECTOR)
    for (int64_t c = 0; c < n; ++c)
      for (int64_t r = 0; r < n; ++r) A[r + c * lda] = static_cast<T>(vd[r * n + c]);
}

inline cusolverStatus_t syev_checks(int64_t n, int64_t lda, cudaDataType ta, cudaDataType tw, cudaDataType tc,
                                    int64_t batch) {
  if (n < 0 || lda < std::max<int64_t>(1, n) || batch < 1 || ta != tw || ta != tc) return CUSOLVER_STATUS_INVALID_VALUE;
  // The batched solver indexes its batch with 32-bit ints.
  if (batch > 1 && batch * lda * n > std::numeric_limits<int32_t>::max()) return CUSOLVER_STATUS_INVALID_VALUE;
  return CUSOLVER_STATUS_SUCCESS;
}

inline cusolverStatus_t syev(const char* name, cusolverEigMode_t jobz, cublasFillMode_t uplo, int64_t n,
                             cudaDataType ta, void* A, int64_t lda, cudaDataType tw, void* W, cudaDataType tc,
                             size_t device_bytes, int* info, int64_t batch) {
  count_library_call(name);
  if (syev_checks(n, lda, ta, tw, tc, batch) != CUSOLVER_STATUS_SUCCESS ||
      device_bytes < syev_device_bytes(n, ta, batch))
    return CUSOLVER_STATUS_INVALID_VALUE;
  for (int64_t b = 0; b < batch; ++b) {  // batched matrices lie lda * n apart, eigenvalues n apart
    if (ta == CUDA_R_64F)
      syev_one(jobz, uplo, n, static_cast<double*>(A) + b * lda * n, lda, static_cast<double*>(W) + b * n, info + b);
    else
      syev_one(jobz, uplo, n, static_cast<float*>(A) + b * lda * n, lda, static_cast<float*>(W) + b * n, info + b);
  }
  return CUSOLVER_STATUS_SUCCESS;
}

// The symmetric matrix whose triangle `uplo` is stored column-major in A, as a (row-major) tensor.
template <typename T>
at::Tensor symmetric_from(cublasFillMode_t uplo, int64_t n, const T* A, int64_t lda) {
  at::Tensor M = at::empty({n, n}, at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value));
  T* m = M.data_ptr<T>();
  for (int64_t c = 0; c < n; ++c)
    for (int64_t r = 0; r < n; ++r) {
      const bool stored = uplo == CUBLAS_FILL_MODE_LOWER ? r >= c : r <= c;
      m[r * n + c] = stored ? A[r + c * lda] : A[c + r * lda];
    }
  return M;
}

inline size_t potrf_device_bytes(int64_t n, cudaDataType t) {
  return static_cast<size_t>(std::max<int64_t>(n * n, 1)) * solver_item(t);
}

inline cusolverStatus_t potrf_checks(int64_t n, int64_t lda, cudaDataType ta, cudaDataType tc) {
  if (n < 0 || lda < std::max<int64_t>(1, n) || ta != tc) return CUSOLVER_STATUS_INVALID_VALUE;
  return CUSOLVER_STATUS_SUCCESS;
}

template <typename T>
void potrf_one(cublasFillMode_t uplo, int64_t n, T* A, int64_t lda, int* info) {
  at::Tensor L, fail;
  std::tie(L, fail) = at::linalg_cholesky_ex(symmetric_from(uplo, n, A, lda));  // LAPACK, in T
  *info = fail.item<int>();
  if (*info != 0) return;  // A is left in an unspecified state, as by cuSOLVER
  const at::Tensor l = L.contiguous();
  const T* ld = l.data_ptr<T>();
  for (int64_t c = 0; c < n; ++c)  // lower: L; upper: U = L^T; the other triangle untouched
    for (int64_t r = 0; r < n; ++r) {
      if (uplo == CUBLAS_FILL_MODE_LOWER ? r >= c : r <= c)
        A[r + c * lda] = uplo == CUBLAS_FILL_MODE_LOWER ? ld[r * n + c] : ld[c * n + r];
    }
}

template <typename T>
void potrs_one(cublasFillMode_t uplo, int64_t n, int64_t nrhs, const T* A, int64_t lda, T* B, int64_t ldb) {
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  at::Tensor L = at::zeros({n, n}, opts), X = at::empty({n, nrhs}, opts);
  T* l = L.data_ptr<T>();
  T* x = X.data_ptr<T>();
  for (int64_t c = 0; c < n; ++c)  // the factor from the named triangle only, as lower L
    for (int64_t r = c; r < n; ++r) l[r * n + c] = uplo == CUBLAS_FILL_MODE_LOWER ? A[r + c * lda] : A[c + r * lda];
  for (int64_t c = 0; c < nrhs; ++c)
    for (int64_t r = 0; r < n; ++r) x[r * nrhs + c] = B[r + c * ldb];
  const at::Tensor S = at::cholesky_solve(X, L).contiguous();
  const T* s = S.data_ptr<T>();
  for (int64_t c = 0; c < nrhs; ++c)
    for (int64_t r = 0; r < n; ++r) B[r + c * ldb] = s[r * nrhs + c];
}

}  // namespace emu
}  // namespace natgrad

namespace natgrad {
inline namespace NATGRAD_RUNTIME_NS {
inline cusolverStatus_t cusolverDnXsyevd_bufferSize(cusolverDnHandle_t, cusolverDnParams_t, cusolverEigMode_t,
                                                    cublasFillMode_t, int64_t n, cudaDataType ta, const void*,
                                                    int64_t lda, cudaDataType tw, const void*, cudaDataType tc,
                                                    size_t* device_bytes, size_t* host_bytes) {
  natgrad::emu::count_library_call("cusolverDnXsyevd_bufferSize");
  if (natgrad::emu::syev_checks(n, lda, ta, tw, tc, 1) != CUSOLVER_STATUS_SUCCESS) return CUSOLVER_STATUS_INVALID_VALUE;
  *device_bytes = natgrad::emu::syev_device_bytes(n, ta, 1);
  *host_bytes = 0;
  return CUSOLVER_STATUS_SUCCESS;
}
inline cusolverStatus_t cusolverDnXsyevd(cusolverDnHandle_t, cusolverDnParams_t, cusolverEigMode_t jobz,
                                         cublasFillMode_t uplo, int64_t n, cudaDataType ta, void* A, int64_t lda,
                                         cudaDataType tw, void* W, cudaDataType tc, void*, size_t device_bytes, void*,
                                         size_t, int* info) {
  return natgrad::emu::syev("cusolverDnXsyevd", jobz, uplo, n, ta, A, lda, tw, W, tc, device_bytes, info, 1);
}
inline cusolverStatus_t cusolverDnXsyevBatched_bufferSize(cusolverDnHandle_t, cusolverDnParams_t, cusolverEigMode_t,
                                                          cublasFillMode_t, int64_t n, cudaDataType ta, const void*,
                                                          int64_t lda, cudaDataType tw, const void*, cudaDataType tc,
                                                          size_t* device_bytes, size_t* host_bytes, int64_t batch) {
  natgrad::emu::count_library_call("cusolverDnXsyevBatched_bufferSize");
  if (natgrad::emu::syev_checks(n, lda, ta, tw, tc, batch) != CUSOLVER_STATUS_SUCCESS)
    return CUSOLVER_STATUS_INVALID_VALUE;
  *device_bytes = natgrad::emu::syev_device_bytes(n, ta, batch);
  *host_bytes = 0;
  return CUSOLVER_STATUS_SUCCESS;
}
inline cusolverStatus_t cusolverDnXsyevBatched(cusolverDnHandle_t, cusolverDnParams_t, cusolverEigMode_t jobz,
                                               cublasFillMode_t uplo, int64_t n, cudaDataType ta, void* A,
                                               int64_t lda, cudaDataType tw, void* W, cudaDataType tc, void*,
                                               size_t device_bytes, void*, size_t, int* info, int64_t batch) {
  return natgrad::emu::syev("cusolverDnXsyevBatched", jobz, uplo, n, ta, A, lda, tw, W, tc, device_bytes, info,
                            batch);
}

inline cusolverStatus_t cusolverDnXpotrf_bufferSize(cusolverDnHandle_t, cusolverDnParams_t, cublasFillMode_t,
                                                    int64_t n, cudaDataType ta, const void*, int64_t lda,
                                                    cudaDataType tc, size_t* device_bytes, size_t* host_bytes) {
  natgrad::emu::count_library_call("cusolverDnXpotrf_bufferSize");
  if (natgrad::emu::potrf_checks(n, lda, ta, tc) != CUSOLVER_STATUS_SUCCESS) return CUSOLVER_STATUS_INVALID_VALUE;
  *device_bytes = natgrad::emu::potrf_device_bytes(n, ta);
  *host_bytes = 0;
  return CUSOLVER_STATUS_SUCCESS;
}
inline cusolverStatus_t cusolverDnXpotrf(cusolverDnHandle_t, cusolverDnParams_t, cublasFillMode_t uplo, int64_t n,
                                         cudaDataType ta, void* A, int64_t lda, cudaDataType tc, void*,
                                         size_t device_bytes, void*, size_t, int* info) {
  natgrad::emu::count_library_call("cusolverDnXpotrf");
  if (natgrad::emu::potrf_checks(n, lda, ta, tc) != CUSOLVER_STATUS_SUCCESS ||
      device_bytes < natgrad::emu::potrf_device_bytes(n, ta))
    return CUSOLVER_STATUS_INVALID_VALUE;
  if (ta == CUDA_R_64F)
    natgrad::emu::potrf_one(uplo, n, static_cast<double*>(A), lda, info);
  else
    natgrad::emu::potrf_one(uplo, n, static_cast<float*>(A), lda, info);
  return CUSOLVER_STATUS_SUCCESS;
}
inline cusolverStatus_t cusolverDnXpotrs(cusolverDnHandle_t, cusolverDnParams_t, cublasFillMode_t uplo, int64_t n,
                                         int64_t nrhs, cudaDataType ta, const void* A, int64_t lda, cudaDataType tb,
                                         void* B, int64_t ldb, int* info) {
  natgrad::emu::count_library_call("cusolverDnXpotrs");
  if (n < 0 || nrhs < 0 || lda < std::max<int64_t>(1, n) || ldb < std::max<int64_t>(1, n) || ta != tb)
    return CUSOLVER_STATUS_INVALID_VALUE;
  *info = 0;
  if (ta == CUDA_R_64F)
    natgrad::emu::potrs_one(uplo, n, nrhs, static_cast<const double*>(A), lda, static_cast<double*>(B), ldb);
  else
    natgrad::emu::potrs_one(uplo, n, nrhs, static_cast<const float*>(A), lda, static_cast<float*>(B), ldb);
  return CUSOLVER_STATUS_SUCCESS;
}

inline cusolverDnHandle_t solver_handle() { return nullptr; }
}  // namespace NATGRAD_RUNTIME_NS
}  // namespace natgrad
#else
#include <cusolverDn.h>

#include <unordered_map>

namespace natgrad {
inline namespace NATGRAD_RUNTIME_NS {
// One handle per device and host thread (torch keeps its own in libtorch_cuda_linalg, which is
// loaded lazily and not linked here), bound to the current stream at every use. Never destroyed:
// it lives as long as the thread, as torch's do.
inline cusolverDnHandle_t solver_handle() {
  thread_local std::unordered_map<int, cusolverDnHandle_t> handles;
  int device = 0;
  C10_CUDA_CHECK(cudaGetDevice(&device));
  cusolverDnHandle_t& h = handles[device];
  if (h == nullptr) TORCH_CHECK(cusolverDnCreate(&h) == CUSOLVER_STATUS_SUCCESS, "cusolverDnCreate failed");
  TORCH_CHECK(cusolverDnSetStream(h, current_stream()) == CUSOLVER_STATUS_SUCCESS, "cusolverDnSetStream failed");
  return h;
}
}  // namespace NATGRAD_RUNTIME_NS
}  // namespace natgrad
#endif

#define NATGRAD_CUSOLVER_CHECK(call)                                                                 \
  do {                                                                                               \
    const cusolverStatus_t natgrad_status_ = (call);                                                 \
    TORCH_CHECK(natgrad_status_ == CUSOLVER_STATUS_SUCCESS, #call " failed with cuSOLVER status ",  \
                static_cast<int>(natgrad_status_));                                                  \
  } while (0)

namespace natgrad {
inline namespace NATGRAD_RUNTIME_NS {
// cusolverDnParams_t for one call sequence, destroyed on scope exit.
struct SolverParams {
  cusolverDnParams_t params = nullptr;
  SolverParams() { NATGRAD_CUSOLVER_CHECK(cusolverDnCreateParams(&params)); }
  ~SolverParams() { cusolverDnDestroyParams(params); }
  SolverParams(const SolverParams&) = delete;
  SolverParams& operator=(const SolverParams&) = delete;
};
}  // namespace NATGRAD_RUNTIME_NS
}  // namespace natgrad
