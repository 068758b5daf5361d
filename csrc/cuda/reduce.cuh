// Warp and block reductions for kernel code (no CUB in kernels: these run in emulation too).
#pragma once

#include "cuda/runtime.h"

namespace natgrad {

template <typename T>
__device__ __forceinline__ T warp_reduce_sum(T v) {
  for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_down_sync(0xffffffffu, v, offset);
  return v;  // the sum lands in lane 0
}

// Sum over the block; the result is valid in thread 0. blockDim.x * blockDim.y * blockDim.z must
// be a multiple of 32 (whole warps). `scratch` holds at least 32 values in shared memory.
template <typename T, typename scratch_t>
__device__ __forceinline__ T block_reduce_sum(T v, scratch_t& scratch) {
  const int tid = threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z);
  const int warps = (blockDim.x * blockDim.y * blockDim.z) / 32;
  v = warp_reduce_sum(v);
  if (tid % 32 == 0) scratch[tid / 32] = v;
  __syncthreads();
  if (tid < 32) {
    v = tid < warps ? scratch[tid] : T(0);
    v = warp_reduce_sum(v);
  }
  __syncthreads();  // scratch may be reused by the caller
  return v;
}

}  // namespace natgrad
