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

// A tiled product's threads: a block of kEdge x kEdge threads computes one kTile x kTile tile of
// C, thread (tx, ty) the kMicro x kMicro outputs (ty + q kEdge, tx + p kEdge), q, p < kMicro,
// from kChunk-deep slabs of the two operands staged in shared memory (As[r][x], Bs[r][x]: kChunk x
// (kTile + 1) arrays, NATGRAD_SHARED; the odd row length keeps transposed stores conflict-free).
struct TileShape {
  static constexpr int kTile = 32;   // output tile edge
  static constexpr int kEdge = 8;    // threads per block edge: 64 threads, two warps
  static constexpr int kMicro = kTile / kEdge;  // outputs per thread along each edge: 4 x 4
  static constexpr int kChunk = 32;  // depth of the staged slabs
  static constexpr int kThreads = kEdge * kEdge;
  static constexpr int kLoadGroups = kThreads / 32;  // warps: a slab is staged one row per warp per step
};

// f(q, p, row, col) for each of thread (tx, ty)'s outputs: acc[q][p] is the tile's (row, col).
template <typename F>
__device__ __forceinline__ void for_each_output(int tx, int ty, F&& f) {
#pragma unroll
  for (int q = 0; q < TileShape::kMicro; ++q)
#pragma unroll
    for (int p = 0; p < TileShape::kMicro; ++p) f(q, p, ty + q * TileShape::kEdge, tx + p * TileShape::kEdge);
}

// The inner product of a staged slab pair: acc[q][p] += sum over r of As[r][ty + q kEdge] *
// Bs[r][tx + p kEdge]. Per slab row a warp (4 values of ty, 8 of tx) makes 2 kMicro shared loads,
// each a broadcast over 4 or 8 distinct consecutive words (one wavefront), for kMicro^2 FMAs: 8
// loads per 16 FMAs, where a thread owning one column and 4 rows makes 5 per 4.
template <typename acc_t, typename Slab>
__device__ __forceinline__ void slab_multiply(const Slab& As, const Slab& Bs,
                                              acc_t (&acc)[TileShape::kMicro][TileShape::kMicro], int tx, int ty) {
  constexpr int E = TileShape::kEdge, U = TileShape::kMicro;
#pragma unroll 4
  for (int r = 0; r < TileShape::kChunk; ++r) {
    acc_t a[U], b[U];
#pragma unroll
    for (int q = 0; q < U; ++q) a[q] = As[r][ty + q * E];
#pragma unroll
    for (int p = 0; p < U; ++p) b[p] = Bs[r][tx + p * E];
#pragma unroll
    for (int q = 0; q < U; ++q)
#pragma unroll
      for (int p = 0; p < U; ++p) acc[q][p] += a[q] * b[p];
  }
}

}  // namespace natgrad
