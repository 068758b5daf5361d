// eigh_batched on CUDA: the eigendecompositions of all factors of a step in a handful of calls.
//   n <= kJacobiMax: one launch of a one-block-per-matrix cyclic Jacobi kernel for all of them
//                    (per dtype), the matrix and its rotations in shared memory;
//   larger, >= 2 of one size and dtype, n <= kBatchedMax: one cusolverDnXsyevBatched call per group
//                    (split where batch * n^2 would pass cuSOLVER's 32-bit limit);
//   otherwise: cusolverDnXsyevd per matrix.
// Results that are not finite (or that cuSOLVER reports as failed) are redone in float64 with
// syevd and cast back; deciding that costs one host synchronisation per call, none per matrix.
#include <ATen/ATen.h>

#include <algorithm>
#include <limits>
#include <map>
#include <tuple>
#include <vector>

#include "cuda/reduce.cuh"
#include "cuda/runtime.h"
#include "cuda/solver.h"
#include "eigh_batched.h"

namespace natgrad {
namespace NATGRAD_KERNEL_NS {
namespace {

constexpr int kJacobiMax = 64;     // largest n for the Jacobi kernel (2 n^2 values in shared memory)
constexpr int kBatchedMax = 512;   // largest n for cusolverDnXsyevBatched
// cusolverDnXsyevBatched indexes the batch with 32-bit ints: batch * n * n must stay below 2^31.
constexpr int64_t kSolverBatchElements = (int64_t(1) << 31) - 1;
constexpr int kThreads = 256;
constexpr int kMaxSweeps = 30;

struct Job {
  dev_ptr<const char> in;  // typed by the kernel's template argument
  dev_ptr<char> W;         // n eigenvalues
  dev_ptr<char> V;         // n x n, column-major (as LAPACK and torch), eigenvectors as columns
  int64_t n, s0, s1;       // size and strides of the input
};

template <typename T>
__global__ void eigh_jacobi_kernel(dev_ptr<const Job> jobs) {
  const Job J = jobs[blockIdx.x];
  const int n = static_cast<int>(J.n);
  const int m = n + (n & 1);  // even: an odd n gets a dummy index that pairs with nothing
  const int ld = eigh_batched::jacobi_ld(n);
  const int tid = threadIdx.x, nt = blockDim.x;
  NATGRAD_DYNAMIC_SHARED(T, smem);
  dev_ptr<T> A = smem;                // n x n, rows ld apart
  dev_ptr<T> V = smem + n * ld;       // n x n, rows ld apart
  dev_ptr<T> cs = smem + 2 * n * ld;  // (c, s) of each of the m / 2 pairs of a round
  NATGRAD_SHARED(T, scratch, [32]);
  NATGRAD_SHARED(int, done, [1]);
  const dev_ptr<const T> in = ptr_cast<const T>(J.in);

  for (int e = tid; e < n * n; e += nt) {  // symmetric from the lower triangle
    const int i = e / n, j = e % n;
    A[i * ld + j] = i >= j ? in[i * J.s0 + j * J.s1] : in[j * J.s0 + i * J.s1];
    V[i * ld + j] = i == j ? T(1) : T(0);
  }
  __syncthreads();

  T total = T(0);
  T rotations = T(0);  // rotations this thread applied in the last sweep
  for (int sweep = 0; sweep <= kMaxSweeps; ++sweep) {
    T off = T(0), all = T(0);
    for (int e = tid; e < n * n; e += nt) {
      const int i = e / n, j = e % n;
      const T a2 = A[i * ld + j] * A[i * ld + j];
      all += a2;
      if (i != j) off += a2;
    }
    off = block_reduce_sum(off, scratch);
    all = block_reduce_sum(all, scratch);
    rotations = block_reduce_sum(rotations, scratch);
    if (tid == 0) {
      if (sweep == 0) scratch[31] = all;  // ||A||_F^2 is invariant under the rotations
      // converged (no off-diagonal mass, or a whole sweep found every pair negligible), a sweep
      // budget spent, or not finite (no rotation will mend that)
      done[0] = !(off > std::numeric_limits<T>::epsilon() * std::numeric_limits<T>::epsilon() * scratch[31]) ||
                (sweep > 0 && rotations == T(0)) || sweep == kMaxSweeps || !(all <= std::numeric_limits<T>::max());
    }
    __syncthreads();
    total = scratch[31];
    if (done[0]) break;  // uniform: every thread reads the same flag
    rotations = T(0);
    for (int r = 0; r < m - 1; ++r) {
      for (int k = tid; k < m / 2; k += nt) {
        int p, q;
        eigh_batched::round_robin_pair(r, k, m, &p, &q);
        T c = T(1), s = T(0);
        if (p < n && q < n &&
            eigh_batched::jacobi_rotation<T>(A[p * ld + p], A[q * ld + q], A[p * ld + q], &c, &s))
          rotations += T(1);
        cs[2 * k] = c;
        cs[2 * k + 1] = s;
      }
      __syncthreads();
      for (int e = tid; e < (m / 2) * n; e += nt) {  // rows: A <- J^T A
        const int k = e / n, j = e % n;
        int p, q;
        eigh_batched::round_robin_pair(r, k, m, &p, &q);
        if (p >= n || q >= n) continue;
        const T c = cs[2 * k], s = cs[2 * k + 1], a = A[p * ld + j], b = A[q * ld + j];
        A[p * ld + j] = c * a - s * b;
        A[q * ld + j] = s * a + c * b;
      }
      __syncthreads();
      for (int e = tid; e < (m / 2) * n; e += nt) {  // columns: A <- A J, V <- V J (rows ld apart: no bank conflicts)
        const int k = e / n, i = e % n;
        int p, q;
        eigh_batched::round_robin_pair(r, k, m, &p, &q);
        if (p >= n || q >= n) continue;
        const T c = cs[2 * k], s = cs[2 * k + 1];
        const T a = A[i * ld + p], b = A[i * ld + q];
        A[i * ld + p] = c * a - s * b;
        A[i * ld + q] = s * a + c * b;
        const T u = V[i * ld + p], w = V[i * ld + q];
        V[i * ld + p] = c * u - s * w;
        V[i * ld + q] = s * u + c * w;
      }
      __syncthreads();
    }
  }

  // Ascending order: eigenvalue i goes to its rank (ties broken by index). Non-finite input gives
  // NaN throughout, which the host then retries in float64.
  const dev_ptr<T> W = ptr_cast<T>(J.W), out = ptr_cast<T>(J.V);
  const bool finite = total <= std::numeric_limits<T>::max();
  for (int i = tid; i < n; i += nt) {
    const T d = A[i * ld + i];
    int rank = 0;
    for (int j = 0; j < n; ++j) {
      const T dj = A[j * ld + j];
      rank += (dj < d || (dj == d && j < i)) ? 1 : 0;
    }
    if (!finite) rank = i;
    W[rank] = finite ? d : std::numeric_limits<T>::quiet_NaN();
    for (int r = 0; r < n; ++r) out[rank * n + r] = finite ? V[r * ld + i] : std::numeric_limits<T>::quiet_NaN();
  }
}

cudaDataType solver_type(at::ScalarType t) { return t == at::kDouble ? CUDA_R_64F : CUDA_R_32F; }

// syevd / syevBatched on a (batch, n, n) contiguous copy of symmetric row-major matrices. Row-major
// lower = column-major upper, and column-major eigenvectors read row-major are their transpose.
std::tuple<at::Tensor, at::Tensor> solver_eigh(const at::Tensor& stacked) {
  const int64_t batch = stacked.size(0), n = stacked.size(1);
  at::Tensor A = stacked.contiguous().clone();
  at::Tensor W = uninitialized({batch, n}, A.options());
  at::Tensor info = at::zeros({batch}, A.options().dtype(at::kInt));
  const cudaDataType t = solver_type(A.scalar_type());
  const SolverParams params;
  const cusolverDnHandle_t h = solver_handle();
  size_t dev_bytes = 0, host_bytes = 0;
  void* a = A.data_ptr();
  void* w = W.data_ptr();
  const bool batched = batch > 1;
  if (batched)
    NATGRAD_CUSOLVER_CHECK(cusolverDnXsyevBatched_bufferSize(h, params.params, CUSOLVER_EIG_MODE_VECTOR,
                                                             CUBLAS_FILL_MODE_UPPER, n, t, a, n, t, w, t, &dev_bytes,
                                                             &host_bytes, batch));
  else
    NATGRAD_CUSOLVER_CHECK(cusolverDnXsyevd_bufferSize(h, params.params, CUSOLVER_EIG_MODE_VECTOR,
                                                       CUBLAS_FILL_MODE_UPPER, n, t, a, n, t, w, t, &dev_bytes,
                                                       &host_bytes));
  at::Tensor dev_work = at::empty({static_cast<int64_t>(std::max<size_t>(dev_bytes, 1))},
                                  A.options().dtype(at::kByte));
  std::vector<char> host_work(std::max<size_t>(host_bytes, 1));
  int* info_ptr = info.data_ptr<int>();
  if (batched)
    NATGRAD_CUSOLVER_CHECK(cusolverDnXsyevBatched(h, params.params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER,
                                                  n, t, a, n, t, w, t, dev_work.data_ptr(), dev_bytes,
                                                  host_work.data(), host_bytes, info_ptr, batch));
  else
    NATGRAD_CUSOLVER_CHECK(cusolverDnXsyevd(h, params.params, CUSOLVER_EIG_MODE_VECTOR, CUBLAS_FILL_MODE_UPPER, n,
                                            t, a, n, t, w, t, dev_work.data_ptr(), dev_bytes, host_work.data(),
                                            host_bytes, info_ptr));
  // A failed solve (info != 0) reads as NaN, so that the caller's single finiteness check sees it.
  W.masked_fill_(info.ne(0).unsqueeze(1), std::numeric_limits<double>::quiet_NaN());
  return {W, A.transpose(1, 2)};
}

std::tuple<std::vector<at::Tensor>, std::vector<at::Tensor>> eigh_batched(at::TensorList mats) {
  eigh_batched::check_mats(mats);
  const size_t count = mats.size();
  std::vector<at::Tensor> evals(count), evecs(count);
  if (count == 0) return {evals, evecs};
  const DeviceGuard guard(mats[0].device());
  const stream_t stream = current_stream();

  // Small matrices: one Jacobi launch per dtype.
  for (const at::ScalarType dt : {at::kFloat, at::kDouble}) {
    std::vector<Job> jobs;
    std::vector<size_t> which;
    int64_t max_n = 0;
    for (size_t i = 0; i < count; ++i) {
      const at::Tensor& M = mats[i];
      if (M.scalar_type() != dt || M.size(0) > kJacobiMax) continue;
      const int64_t n = M.size(0);
      evals[i] = uninitialized({n}, M.options());
      evecs[i] = uninitialized({n, n}, M.options()).t();  // column-major: the kernel writes column after column
      if (n == 0) continue;
      jobs.push_back(Job{device_ptr<const char>(M), device_ptr<char>(evals[i]), device_ptr<char>(evecs[i]), n,
                         M.stride(0), M.stride(1)});
      which.push_back(i);
      max_n = std::max(max_n, n);
    }
    if (jobs.empty()) continue;
    const at::Tensor table = upload(jobs.data(), jobs.size() * sizeof(Job), mats[which[0]]);
    const dev_ptr<const Job> table_ptr = device_ptr<const Job>(table);
    AT_DISPATCH_FLOATING_TYPES(dt, "eigh_batched", [&] {
      const size_t smem = static_cast<size_t>(2 * max_n * eigh_batched::jacobi_ld(static_cast<int>(max_n)) + max_n + 1) *
                          sizeof(scalar_t);
      set_max_dynamic_shared((eigh_jacobi_kernel<scalar_t>), smem);
      NATGRAD_LAUNCH((eigh_jacobi_kernel<scalar_t>), dim3(static_cast<unsigned>(jobs.size())), dim3(kThreads), smem,
                     stream, table_ptr);
      NATGRAD_KERNEL_LAUNCH_CHECK();
    });
  }

  // Larger ones: groups of one size and dtype to the batched solver, single ones to syevd.
  std::map<std::pair<int64_t, int>, std::vector<size_t>> groups;
  for (size_t i = 0; i < count; ++i)
    if (mats[i].size(0) > kJacobiMax) groups[{mats[i].size(0), static_cast<int>(mats[i].scalar_type())}].push_back(i);
  for (const auto& [key, idx] : groups) {
    const int64_t n = key.first, size = static_cast<int64_t>(idx.size());
    const std::vector<int64_t> calls = n <= kBatchedMax ? eigh_batched::solver_batches(size, n, kSolverBatchElements)
                                                        : std::vector<int64_t>(size, 1);
    int64_t b = 0;
    for (const int64_t step : calls) {
      std::vector<at::Tensor> part;
      for (int64_t k = b; k < b + step; ++k) part.push_back(mats[idx[k]]);
      auto [W, V] = solver_eigh(at::stack(part));
      for (int64_t k = b; k < b + step; ++k) {
        evals[idx[k]] = W[k - b];
        evecs[idx[k]] = V[k - b];  // column-major, as on every path
      }
      b += step;
    }
  }

  // One synchronisation for all: redo the non-finite ones in float64. The flags come from one
  // multi-tensor max-norm per dtype (NaN and Inf propagate into it, finite values cannot overflow
  // it; an empty matrix's is 0), not from a handful of ops per matrix. evecs[i].t() is the
  // contiguous buffer the kernels wrote, which keeps the norms on the multi-tensor fast path.
  // (An empty matrix has no norm and nothing to redo.)
  std::vector<at::Tensor> finite;
  std::vector<size_t> order;  // matrix of each flag
  for (const at::ScalarType dt : {at::kFloat, at::kDouble}) {
    std::vector<at::Tensor> parts;
    for (size_t i = 0; i < count; ++i) {
      if (mats[i].scalar_type() != dt || mats[i].size(0) == 0) continue;  // empty: nothing to redo
      parts.push_back(evals[i]);
      parts.push_back(evecs[i].t());
      order.push_back(i);
    }
    if (parts.empty()) continue;
    const at::Tensor norms = at::stack(at::_foreach_norm(parts, std::numeric_limits<double>::infinity()));
    finite.push_back(at::isfinite(norms).view({-1, 2}).all(1));
  }
  const at::Tensor flags = finite.empty() ? at::empty({0}, at::kBool) : at::cat(finite).cpu();
  std::vector<uint8_t> ok_by_matrix(count, 1);
  for (size_t k = 0; k < order.size(); ++k) ok_by_matrix[order[k]] = flags.data_ptr<bool>()[k];
  for (size_t i = 0; i < count; ++i) {
    if (ok_by_matrix[i]) continue;
    const at::Tensor M = mats[i].to(at::kDouble);
    if (!at::isfinite(M).all().item<bool>()) {
      evals[i].fill_(std::numeric_limits<double>::quiet_NaN());
      evecs[i].fill_(std::numeric_limits<double>::quiet_NaN());
      continue;
    }
    auto [W, V] = solver_eigh(M.tril().unsqueeze(0));
    evals[i] = W[0].to(mats[i].scalar_type());
    evecs[i] = V[0].to(mats[i].scalar_type()).t().contiguous().t();
  }
  return {evals, evecs};
}

}  // namespace

NATGRAD_CUDA_IMPL(natgrad, m) { m.impl("eigh_batched", &eigh_batched); }

}  // namespace NATGRAD_KERNEL_NS
}  // namespace natgrad
