// Kernels that exercise the CUDA features our kernels rely on: thread and block indices, static
// and dynamic shared memory, barriers, warp shuffles and votes, atomics; and deliberate bugs that
// the emulation must report or expose: a divergent barrier, out-of-bounds and misaligned reads,
// races (a lost update, a missing barrier, blocks writing one element), reads of memory nobody
// wrote, and shared memory beyond the limits. Registered as natgrad_testing (CUDA) and
// natgrad_testing_emu (the same source run on the CPU); tests only.
#include <vector>

#include "cuda/blas.h"
#include "cuda/library_gemm.h"
#include "cuda/reduce.cuh"
#include "cuda/runtime.h"
#include "eigh_batched.h"

namespace natgrad {
namespace NATGRAD_KERNEL_NS {
namespace {

dim3 to_dim3(at::IntArrayRef v, const char* name) {
  TORCH_CHECK(v.size() == 3, name, " must have 3 entries");
  return dim3(static_cast<unsigned>(v[0]), static_cast<unsigned>(v[1]), static_cast<unsigned>(v[2]));
}

// out[global linear thread] = (blockIdx, threadIdx, gridDim, blockDim) as 12 ints.
__global__ void thread_indices_kernel(dev_ptr<int> out) {
  const int64_t block = blockIdx.x + gridDim.x * (blockIdx.y + int64_t(gridDim.y) * blockIdx.z);
  const int64_t threads = blockDim.x * blockDim.y * blockDim.z;
  const int64_t t = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const dev_ptr<int> o = out + (block * threads + t) * 12;
  const unsigned v[12] = {blockIdx.x, blockIdx.y, blockIdx.z, threadIdx.x, threadIdx.y, threadIdx.z,
                          gridDim.x,  gridDim.y,  gridDim.z,  blockDim.x,  blockDim.y,  blockDim.z};
  for (int k = 0; k < 12; ++k) o[k] = static_cast<int>(v[k]);
}

at::Tensor thread_indices(const at::Tensor& like, at::IntArrayRef grid_v, at::IntArrayRef block_v) {
  const dim3 grid = to_dim3(grid_v, "grid"), block = to_dim3(block_v, "block");
  const int64_t n = int64_t(grid.x) * grid.y * grid.z * block.x * block.y * block.z;
  at::Tensor out = at::full({n, 12}, -1, like.options().dtype(at::kInt));
  NATGRAD_LAUNCH((thread_indices_kernel), grid, block, 0, current_stream(), device_ptr<int>(out));
  NATGRAD_KERNEL_LAUNCH_CHECK();
  return out;
}

// Grid-stride sum: block reduction through static shared memory and shuffles, then one atomic per block.
__global__ void block_sum_kernel(dev_ptr<const float> x, int64_t n, dev_ptr<float> out) {
  NATGRAD_SHARED(float, scratch, [32]);
  float v = 0.f;
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    v += x[i];
  v = block_reduce_sum(v, scratch);
  if (threadIdx.x == 0) atomicAdd(&out[0], v);
}

at::Tensor block_sum(const at::Tensor& x, int64_t threads) {
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::zeros({1}, x.options());
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(64, (x.numel() + threads - 1) / threads));
  NATGRAD_LAUNCH((block_sum_kernel), dim3(blocks), dim3(threads), 0, current_stream(),
                 device_ptr<const float>(xc), xc.numel(), device_ptr<float>(out));
  NATGRAD_KERNEL_LAUNCH_CHECK();
  return out;
}

// Per thread i (one warp per 32 elements): [xor-butterfly warp sum, inclusive shfl_up scan,
// shfl from lane 31 - lane, shfl_down by 1, ballot(x > 0), any(x > 0), all(x > 0)].
__global__ void warp_ops_kernel(dev_ptr<const float> x, dev_ptr<float> out) {
  const int i = blockIdx.x * blockDim.x + threadIdx.x;
  const int lane = threadIdx.x % 32;
  const float v = x[i];
  float sum = v;
  for (int m = 16; m > 0; m >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, m);
  float scan = v;
  for (int d = 1; d < 32; d <<= 1) {
    const float up = __shfl_up_sync(0xffffffffu, scan, d);
    if (lane >= d) scan += up;
  }
  const float mirrored = __shfl_sync(0xffffffffu, v, 31 - lane);
  const float down = __shfl_down_sync(0xffffffffu, v, 1);
  const unsigned ballot = __ballot_sync(0xffffffffu, v > 0.f);
  const int any = __any_sync(0xffffffffu, v > 0.f), all = __all_sync(0xffffffffu, v > 0.f);
  const dev_ptr<float> o = out + int64_t(i) * 7;
  o[0] = sum;
  o[1] = scan;
  o[2] = mirrored;
  o[3] = down;
  o[4] = static_cast<float>(__popc(ballot)) + (ballot >> lane & 1u) * 0.5f;  // popcount, own bit
  o[5] = static_cast<float>(any);
  o[6] = static_cast<float>(all);
}

at::Tensor warp_ops(const at::Tensor& x) {
  TORCH_CHECK(x.numel() % 64 == 0 && x.numel() > 0, "warp_ops: x.numel() must be a positive multiple of 64");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty({x.numel(), 7}, x.options());
  NATGRAD_LAUNCH((warp_ops_kernel), dim3(x.numel() / 64), dim3(64), 0, current_stream(),
                 device_ptr<const float>(xc), device_ptr<float>(out));
  NATGRAD_KERNEL_LAUNCH_CHECK();
  return out;
}

// Reverses each chunk of `block` elements through dynamic shared memory.
__global__ void reverse_blocks_kernel(dev_ptr<const float> x, int64_t n, dev_ptr<float> out) {
  NATGRAD_DYNAMIC_SHARED(float, buf);
  const int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  const int64_t base = blockIdx.x * int64_t(blockDim.x);
  const int64_t len = std::min<int64_t>(blockDim.x, n - base);
  if (threadIdx.x < len) buf[threadIdx.x] = x[i];
  __syncthreads();
  if (threadIdx.x < len) out[i] = buf[len - 1 - threadIdx.x];
}

at::Tensor reverse_blocks(const at::Tensor& x, int64_t block) {
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::empty_like(xc);
  const int64_t blocks = (x.numel() + block - 1) / block;
  NATGRAD_LAUNCH((reverse_blocks_kernel), dim3(blocks), dim3(block), block * sizeof(float), current_stream(),
                 device_ptr<const float>(xc), xc.numel(), device_ptr<float>(out));
  NATGRAD_KERNEL_LAUNCH_CHECK();
  return out;
}

// Atomics: atomicAdd counts each bin, atomicMax and atomicMin find the largest and smallest bin.
__global__ void histogram_kernel(dev_ptr<const int64_t> idx, int64_t n, dev_ptr<int> counts, dev_ptr<int> range) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    atomicAdd(&counts[idx[i]], 1);
    atomicMax(&range[1], static_cast<int>(idx[i]));
    atomicMin(&range[0], static_cast<int>(idx[i]));
  }
}

at::Tensor histogram(const at::Tensor& idx, int64_t bins) {
  const at::Tensor ic = idx.contiguous();
  at::Tensor counts = at::zeros({bins}, idx.options().dtype(at::kInt));
  at::Tensor range = at::tensor({1 << 30, -1}, idx.options().dtype(at::kInt));
  NATGRAD_LAUNCH((histogram_kernel), dim3(3), dim3(96), 0, current_stream(), device_ptr<const int64_t>(ic),
                 ic.numel(), device_ptr<int>(counts), device_ptr<int>(range));
  NATGRAD_KERNEL_LAUNCH_CHECK();
  return at::cat({counts, range});  // bins..., min, max
}

// Deliberate bug: half of the block returns before the barrier the other half waits at.
__global__ void divergent_barrier_kernel(dev_ptr<float> x) {
  if (threadIdx.x < 16) return;
  x[threadIdx.x] = 1.f;
  __syncthreads();
}

at::Tensor divergent_barrier(const at::Tensor& x) {
  at::Tensor out = x.clone();
  NATGRAD_LAUNCH((divergent_barrier_kernel), dim3(1), dim3(64), 0, current_stream(), device_ptr<float>(out));
  NATGRAD_KERNEL_LAUNCH_CHECK();
  return out;
}

// Deliberate bug when offset is large: every thread reads x[threadIdx.x + offset] from global memory.
__global__ void read_at_kernel(dev_ptr<const float> x, int64_t offset, dev_ptr<float> out) {
  out[threadIdx.x] = x[threadIdx.x + offset];
}

at::Tensor read_at(const at::Tensor& x, int64_t offset) {
  at::Tensor out = at::zeros({32}, x.options());
  NATGRAD_LAUNCH((read_at_kernel), dim3(1), dim3(32), 0, current_stream(), device_ptr<const float>(x), offset,
                 device_ptr<float>(out));
  NATGRAD_KERNEL_LAUNCH_CHECK();
  return out;
}

// The same through a static __shared__ array of 32 floats.
__global__ void shared_read_at_kernel(dev_ptr<const float> x, int64_t offset, dev_ptr<float> out) {
  NATGRAD_SHARED(float, tile, [32]);
  tile[threadIdx.x] = x[threadIdx.x];
  __syncthreads();
  out[threadIdx.x] = tile[threadIdx.x + offset];
}

at::Tensor shared_read_at(const at::Tensor& x, int64_t offset) {
  TORCH_CHECK(x.numel() >= 32, "shared_read_at: x needs 32 elements");
  at::Tensor out = at::zeros({32}, x.options());
  NATGRAD_LAUNCH((shared_read_at_kernel), dim3(1), dim3(32), 0, current_stream(), device_ptr<const float>(x),
                 offset, device_ptr<float>(out));
  NATGRAD_KERNEL_LAUNCH_CHECK();
  return out;
}

// Deliberate race: every thread increments one shared counter without an atomic (a lost update).
__global__ void lost_update_kernel(dev_ptr<float> out) {
  NATGRAD_SHARED(float, counter, [1]);
  if (threadIdx.x == 0) counter[0] = 0.f;
  __syncthreads();
  counter[0] += 1.f;
  __syncthreads();
  if (threadIdx.x == 0) out[0] = counter[0];
}

at::Tensor lost_update(const at::Tensor& like, int64_t threads) {
  at::Tensor out = at::zeros({1}, like.options().dtype(at::kFloat));
  NATGRAD_LAUNCH((lost_update_kernel), dim3(1), dim3(static_cast<unsigned>(threads)), 0, current_stream(),
                 device_ptr<float>(out));
  NATGRAD_KERNEL_LAUNCH_CHECK();
  return out;
}

// Deliberate race: thread t reads what thread t - 1 wrote to shared memory, with the barrier
// between them missing. It works when lower threads happen to run first.
__global__ void missing_barrier_kernel(dev_ptr<const float> x, dev_ptr<float> out) {
  NATGRAD_SHARED(float, buf, [1024]);
  const int t = threadIdx.x;
  buf[t] = x[t];
  // __syncthreads() belongs here
  out[t] = t > 0 ? buf[t - 1] : 0.f;
}

at::Tensor missing_barrier(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 1 && x.numel() >= 1 && x.numel() <= 1024, "missing_barrier: x must hold 1 to 1024 values");
  const at::Tensor xc = x.contiguous();
  at::Tensor out = at::zeros_like(xc);
  NATGRAD_LAUNCH((missing_barrier_kernel), dim3(1), dim3(static_cast<unsigned>(x.numel())), 0, current_stream(),
                 device_ptr<const float>(xc), device_ptr<float>(out));
  NATGRAD_KERNEL_LAUNCH_CHECK();
  return out;
}

// Deliberate race between blocks: each block's first thread writes its index to one element.
__global__ void block_race_kernel(dev_ptr<float> out) {
  if (threadIdx.x == 0) out[0] = static_cast<float>(blockIdx.x);
}

at::Tensor block_race(const at::Tensor& like, int64_t blocks) {
  at::Tensor out = at::zeros({1}, like.options().dtype(at::kFloat));
  NATGRAD_LAUNCH((block_race_kernel), dim3(static_cast<unsigned>(blocks)), dim3(32), 0, current_stream(),
                 device_ptr<float>(out));
  NATGRAD_KERNEL_LAUNCH_CHECK();
  return out;
}

// Deliberate bug: the upper half of a shared tile is read without ever being written.
__global__ void uninitialized_shared_kernel(dev_ptr<float> out) {
  NATGRAD_SHARED(float, tile, [64]);
  const int t = threadIdx.x;
  if (t < 32) tile[t] = static_cast<float>(t);
  __syncthreads();
  out[t] = tile[t];
}

at::Tensor uninitialized_shared(const at::Tensor& like) {
  at::Tensor out = at::zeros({64}, like.options().dtype(at::kFloat));
  NATGRAD_LAUNCH((uninitialized_shared_kernel), dim3(1), dim3(64), 0, current_stream(), device_ptr<float>(out));
  NATGRAD_KERNEL_LAUNCH_CHECK();
  return out;
}

// Deliberate bug: the kernel fills only the first half of a fresh output.
__global__ void fill_half_kernel(dev_ptr<float> out, int64_t n) {
  for (int64_t i = threadIdx.x; i < n / 2; i += blockDim.x) out[i] = 1.f;
}

at::Tensor unwritten_output(const at::Tensor& like, int64_t n) {
  at::Tensor out = uninitialized({n}, like.options().dtype(at::kFloat));
  NATGRAD_LAUNCH((fill_half_kernel), dim3(1), dim3(64), 0, current_stream(), device_ptr<float>(out), n);
  NATGRAD_KERNEL_LAUNCH_CHECK();
  return out;
}

// `bytes` of dynamic shared memory, every float of it written and summed; opted in or not.
__global__ void dynamic_shared_kernel(dev_ptr<float> out, int64_t floats) {
  NATGRAD_DYNAMIC_SHARED(float, buf);
  NATGRAD_SHARED(float, scratch, [32]);
  for (int64_t i = threadIdx.x; i < floats; i += blockDim.x) buf[i] = 1.f;
  __syncthreads();
  float v = 0.f;
  for (int64_t i = threadIdx.x; i < floats; i += blockDim.x) v += buf[i];
  v = block_reduce_sum(v, scratch);
  if (threadIdx.x == 0) out[0] = v;
}

at::Tensor dynamic_shared(const at::Tensor& like, int64_t bytes, bool opt_in) {
  at::Tensor out = at::zeros({1}, like.options().dtype(at::kFloat));
  if (opt_in) set_max_dynamic_shared((dynamic_shared_kernel), static_cast<size_t>(bytes));
  NATGRAD_LAUNCH((dynamic_shared_kernel), dim3(1), dim3(256), static_cast<size_t>(bytes), current_stream(),
                 device_ptr<float>(out), bytes / static_cast<int64_t>(sizeof(float)));
  NATGRAD_KERNEL_LAUNCH_CHECK();
  return out;
}

// Deliberate bug: a double read from dynamic shared memory at a 4-byte offset.
__global__ void misaligned_read_kernel(dev_ptr<float> out) {
  NATGRAD_DYNAMIC_SHARED(float, buf);
  buf[threadIdx.x] = 0.f;
  buf[threadIdx.x + 32] = 0.f;
  __syncthreads();
  const dev_ptr<double> d = ptr_cast<double>(buf + 1);
  out[threadIdx.x] = static_cast<float>(d[0]);
}

at::Tensor misaligned_read(const at::Tensor& like) {
  at::Tensor out = at::zeros({32}, like.options().dtype(at::kFloat));
  NATGRAD_LAUNCH((misaligned_read_kernel), dim3(1), dim3(32), 64 * sizeof(float), current_stream(),
                 device_ptr<float>(out));
  NATGRAD_KERNEL_LAUNCH_CHECK();
  return out;
}

#ifdef NATGRAD_EMULATE
// Deliberate bug: 56 KiB of static shared memory, over the 48 KiB limit (ptxas rejects it, so it
// exists in the emulated build only).
__global__ void static_shared_overflow_kernel(dev_ptr<float> out) {
  NATGRAD_SHARED(float, a, [7168]);
  NATGRAD_SHARED(float, b, [7168]);
  a[threadIdx.x] = 1.f;
  b[threadIdx.x] = 2.f;
  __syncthreads();
  out[threadIdx.x] = a[threadIdx.x] + b[threadIdx.x];
}
#endif

at::Tensor static_shared_overflow(const at::Tensor& like) {
  at::Tensor out = at::zeros({32}, like.options().dtype(at::kFloat));
#ifdef NATGRAD_EMULATE
  NATGRAD_LAUNCH((static_shared_overflow_kernel), dim3(1), dim3(32), 0, current_stream(), device_ptr<float>(out));
#else
  TORCH_CHECK(false, "static_shared_overflow: this deliberate bug exists in the emulated build only");
#endif
  return out;
}

// eigh_batched's split of `count` matrices of order n into batched solver calls.
std::vector<int64_t> solver_batches(const at::Tensor& like, int64_t count, int64_t n, int64_t limit) {
  return eigh_batched::solver_batches(count, n, limit);
}

// Whether a product of m x n x k multiply-adds into a factor of `factor`'s dtype, operands of
// `operand`'s dtype, goes to cuBLAS under the current setting (ops.set_library_gemms).
bool library_choice(const at::Tensor& factor, const at::Tensor& operand, int64_t m, int64_t n, int64_t k) {
  return use_library(m, n, k, factor.scalar_type(), operand.scalar_type());
}

// Row-major a @ b through column-major cuBLAS: C^T = B^T A^T, i.e. gemm on the same buffers with the
// operands swapped. `miswire` passes them in row-major order instead, a wiring mistake that cuBLAS
// (and its emulation) must reject through the leading dimensions.
at::Tensor gemm(const at::Tensor& a, const at::Tensor& b, bool miswire) {
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(0), "gemm: shapes do not fit");
  TORCH_CHECK(a.scalar_type() == b.scalar_type(), "gemm: a and b must share a dtype");
  const at::Tensor A = a.contiguous(), B = b.contiguous();
  const int m = static_cast<int>(A.size(0)), k = static_cast<int>(A.size(1)), n = static_cast<int>(B.size(1));
  at::Tensor C = at::empty({m, n}, A.options());
  const DeviceGuard guard(A.device());
  AT_DISPATCH_SWITCH(A.scalar_type(), "gemm", AT_DISPATCH_CASE(at::kFloat, [&] {
    const float one = 1.f, zero = 0.f;
    if (miswire) {
      NATGRAD_CUBLAS_CHECK(cublasSgemm(blas_handle(), CUBLAS_OP_N, CUBLAS_OP_N, m, n, k, &one, A.data_ptr<float>(), k,
                                       B.data_ptr<float>(), n, &zero, C.data_ptr<float>(), n));
    } else {
      NATGRAD_CUBLAS_CHECK(cublasSgemm(blas_handle(), CUBLAS_OP_N, CUBLAS_OP_N, n, m, k, &one, B.data_ptr<float>(), n,
                                       A.data_ptr<float>(), k, &zero, C.data_ptr<float>(), n));
    }
  }) AT_DISPATCH_CASE(at::kDouble, [&] {
    // The transposed operands: read as column-major, A's buffer is A^T (k x m) and B's is B^T
    // (n x k); op T turns them back, and the column-major m x n result is C^T in row-major order.
    const double one = 1., zero = 0.;
    NATGRAD_CUBLAS_CHECK(cublasDgemm(blas_handle(), CUBLAS_OP_T, CUBLAS_OP_T, m, n, k, &one, A.data_ptr<double>(),
                                     std::max(1, k), B.data_ptr<double>(), std::max(1, n), &zero,
                                     C.data_ptr<double>(), std::max(1, m)));
    C = C.view({n, m}).t().contiguous();
  }));
  return C;
}

}  // namespace

NATGRAD_CUDA_IMPL(natgrad_testing, m) {
  m.impl("gemm", &gemm);
  m.impl("thread_indices", &thread_indices);
  m.impl("block_sum", &block_sum);
  m.impl("warp_ops", &warp_ops);
  m.impl("reverse_blocks", &reverse_blocks);
  m.impl("histogram", &histogram);
  m.impl("divergent_barrier", &divergent_barrier);
  m.impl("read_at", &read_at);
  m.impl("shared_read_at", &shared_read_at);
  m.impl("lost_update", &lost_update);
  m.impl("missing_barrier", &missing_barrier);
  m.impl("block_race", &block_race);
  m.impl("uninitialized_shared", &uninitialized_shared);
  m.impl("unwritten_output", &unwritten_output);
  m.impl("dynamic_shared", &dynamic_shared);
  m.impl("static_shared_overflow", &static_shared_overflow);
  m.impl("misaligned_read", &misaligned_read);
  m.impl("solver_batches", &solver_batches);
  m.impl("library_choice", &library_choice);
}

}  // namespace NATGRAD_KERNEL_NS
}  // namespace natgrad
