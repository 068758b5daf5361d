// Many layers in one launch: the host lays the layers' tiles end to end in the grid and passes a
// table of per-layer descriptors, each with `tile_begin`, its first block. A block finds its layer
// by binary search. Also the tiled product step the grouped kernels share.
#pragma once

#include "cuda/runtime.h"

namespace natgrad {

// The last entry whose tile_begin is <= block (entries sorted by tile_begin, the first at 0).
template <typename Entry>
__device__ __forceinline__ int entry_of_block(const dev_ptr<const Entry>& table, int count, int64_t block) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) / 2;
    if (table[mid].tile_begin <= block) lo = mid; else hi = mid - 1;
  }
  return lo;
}

// The inner product of a staged slab pair: acc[q] += sum over r of As[r][ty + q * kRows] * Bs[r][tx],
// the thread (tx, ty) owning rows ty, ty + kRows, ... of column tx of a kTile x kTile output tile.
// As and Bs are kChunk x (kTile + 1) __shared__ arrays (NATGRAD_SHARED).
template <int kChunk, int kTile, int kRows, typename acc_t, typename Slab>
__device__ __forceinline__ void slab_multiply(const Slab& As, const Slab& Bs, acc_t (&acc)[kTile / kRows], int tx,
                                              int ty) {
#pragma unroll 8
  for (int r = 0; r < kChunk; ++r) {
    const acc_t bv = Bs[r][tx];
#pragma unroll
    for (int q = 0; q < kTile / kRows; ++q) acc[q] += As[r][ty + q * kRows] * bv;
  }
}

}  // namespace natgrad
