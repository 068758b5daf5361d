// CUDA execution model on the CPU, for running our .cu kernel sources in tests (NATGRAD_EMULATE).
//
// The kernel source is compiled by the host compiler with this header standing in for the CUDA
// built-ins. A launch runs the grid one block at a time; a block's threads are cooperative fibers
// (ucontext) on the calling thread, switched only at __syncthreads() and warp collectives, so that
// __shared__ memory (static thread_local here, one copy for the block being run) behaves as on a GPU.
// Checked: a barrier not every thread of the block reaches, warp collectives whose lanes do not all
// arrive, out-of-bounds global and dynamic-shared accesses (checked_ptr), out-of-bounds indexing of
// static __shared__ and local arrays (-fsanitize=bounds, whose handler is ours). Every failure
// aborts the launch with an exception naming the kernel, block and thread. Launches and library
// calls are counted (counters()).
#pragma once

#ifndef NATGRAD_EMULATE
#error "emu.h is for the emulated build of the CUDA sources only"
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <map>
#include <string>
#include <type_traits>

#include "emu/counters.h"

// ---- qualifiers ----------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// One copy per OS thread; blocks run one at a time on it, so this is the block's shared memory.
#define __shared__ static thread_local

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  constexpr dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};
using uint3 = dim3;

namespace natgrad {
namespace emu {

// ---- the running thread's view -------------------------------------------------------------------
struct ThreadState {
  dim3 thread_idx, block_idx, block_dim, grid_dim;
  int linear = 0;  // linear thread index within the block
};
ThreadState& current();

[[noreturn]] void fail(const std::string& what);  // aborts the running launch from kernel code
void syncthreads(const char* file, int line);
// Warp collective: lane deposits `bytes` of its value, waits for the lanes in `mask`, then copies
// out the value of lane `src` (or keeps its own if src is outside the warp). Returns the ballot of
// `pred` over the arrived lanes.
unsigned warp_exchange(unsigned mask, const void* value, void* out, int bytes, int src, bool pred,
                       const char* what);
void* dynamic_shared_base();
size_t dynamic_shared_bytes();

// ---- checked pointers ----------------------------------------------------------------------------
// A pointer that knows the allocation it may touch. Kernel code uses dev_ptr<T> (T* under nvcc).
template <typename T>
struct checked_ptr {
  T* p = nullptr;
  const char* lo = nullptr;  // bytes [lo, hi) may be accessed
  const char* hi = nullptr;
  const char* space = "global";

  checked_ptr() = default;
  checked_ptr(T* p_, const void* lo_, const void* hi_, const char* space_)
      : p(p_), lo(static_cast<const char*>(lo_)), hi(static_cast<const char*>(hi_)), space(space_) {}
  template <typename U, typename = std::enable_if_t<std::is_convertible_v<U*, T*>>>
  checked_ptr(const checked_ptr<U>& o) : p(o.p), lo(o.lo), hi(o.hi), space(o.space) {}

  T& at(int64_t i) const {
    const char* a = reinterpret_cast<const char*>(p + i);
    if (a < lo || a + sizeof(T) > hi) report(a);
    return p[i];
  }
  T& operator[](int64_t i) const { return at(i); }
  T& operator*() const { return at(0); }
  T* operator->() const { return &at(0); }
  checked_ptr operator+(int64_t i) const { return {p + i, lo, hi, space}; }
  checked_ptr operator-(int64_t i) const { return {p - i, lo, hi, space}; }
  checked_ptr& operator+=(int64_t i) { p += i; return *this; }
  checked_ptr& operator++() { ++p; return *this; }
  bool operator==(const checked_ptr& o) const { return p == o.p; }
  bool operator!=(const checked_ptr& o) const { return p != o.p; }
  explicit operator bool() const { return p != nullptr; }
  T* raw() const { return p; }

  [[noreturn]] void report(const char* a) const {
    fail(std::string("out-of-bounds ") + space + " memory access: byte offset " +
         std::to_string(a - lo) + " (access of " + std::to_string(sizeof(T)) + " bytes) in an allocation of " +
         std::to_string(hi - lo) + " bytes");
  }
};

template <typename U, typename T>
checked_ptr<U> ptr_cast(const checked_ptr<T>& p) {
  return {reinterpret_cast<U*>(const_cast<std::remove_const_t<T>*>(p.p)), p.lo, p.hi, p.space};
}

// ---- launches ------------------------------------------------------------------------------------
void run_grid(const char* name, dim3 grid, dim3 block, size_t shared_bytes, const std::function<void()>& body);

template <typename... Params, typename... Args>
void launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
            Args&&... args) {
  // Arguments are copied once, as a CUDA launch copies them into the kernel's parameter space.
  auto bound = std::make_tuple(static_cast<std::decay_t<Params>>(std::forward<Args>(args))...);
  run_grid(name, grid, block, shared_bytes, [&] { std::apply(kernel, bound); });
}

// ---- warp collectives ----------------------------------------------------------------------------
constexpr int kWarpSize = 32;
inline int lane_id() { return current().linear % kWarpSize; }

template <typename T>
T shfl(unsigned mask, T v, int src_lane, int width, const char* what) {
  const int lane = lane_id();
  const int base = lane - lane % width;
  T out = v;
  warp_exchange(mask, &v, &out, sizeof(T), base + (src_lane % width), false, what);
  return out;
}

}  // namespace emu
}  // namespace natgrad

// ---- built-in variables --------------------------------------------------------------------------
#define threadIdx (::natgrad::emu::current().thread_idx)
#define blockIdx (::natgrad::emu::current().block_idx)
#define blockDim (::natgrad::emu::current().block_dim)
#define gridDim (::natgrad::emu::current().grid_dim)
#define warpSize (::natgrad::emu::kWarpSize)

// ---- synchronisation -----------------------------------------------------------------------------
#define __syncthreads() ::natgrad::emu::syncthreads(__FILE__, __LINE__)
inline void __syncwarp(unsigned mask = 0xffffffffu) {
  ::natgrad::emu::warp_exchange(mask, nullptr, nullptr, 0, 0, false, "__syncwarp");
}
inline void __threadfence() {}
inline void __threadfence_block() {}

template <typename T>
T __shfl_sync(unsigned mask, T v, int src_lane, int width = 32) {
  return ::natgrad::emu::shfl(mask, v, src_lane, width, "__shfl_sync");
}
template <typename T>
T __shfl_down_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::natgrad::emu::lane_id(), in_seg = lane % width;
  const int src = in_seg + static_cast<int>(delta) < width ? in_seg + static_cast<int>(delta) : in_seg;
  return ::natgrad::emu::shfl(mask, v, src, width, "__shfl_down_sync");
}
template <typename T>
T __shfl_up_sync(unsigned mask, T v, unsigned delta, int width = 32) {
  const int lane = ::natgrad::emu::lane_id(), in_seg = lane % width;
  const int src = in_seg - static_cast<int>(delta) >= 0 ? in_seg - static_cast<int>(delta) : in_seg;
  return ::natgrad::emu::shfl(mask, v, src, width, "__shfl_up_sync");
}
template <typename T>
T __shfl_xor_sync(unsigned mask, T v, int lane_mask, int width = 32) {
  const int lane = ::natgrad::emu::lane_id(), in_seg = lane % width;
  const int src = (in_seg ^ lane_mask) < width ? (in_seg ^ lane_mask) : in_seg;
  return ::natgrad::emu::shfl(mask, v, src, width, "__shfl_xor_sync");
}
inline unsigned __ballot_sync(unsigned mask, int pred) {
  return ::natgrad::emu::warp_exchange(mask, nullptr, nullptr, 0, 0, pred != 0, "__ballot_sync") & mask;
}
inline int __any_sync(unsigned mask, int pred) { return __ballot_sync(mask, pred) != 0; }
inline int __all_sync(unsigned mask, int pred) {
  const unsigned arrived = ::natgrad::emu::warp_exchange(mask, nullptr, nullptr, 0, 0, true, "__all_sync");
  return __ballot_sync(mask, pred) == (arrived & mask);
}

// ---- atomics (real atomics: harmless for one block at a time, right if blocks ever run in parallel)
namespace natgrad {
namespace emu {
template <typename T, typename F>
T atomic_update(T* address, F f) {  // CAS loop: old -> f(old); returns old
  T old, desired;
  __atomic_load(address, &old, __ATOMIC_RELAXED);
  do {
    desired = f(old);
  } while (!__atomic_compare_exchange(address, &old, &desired, false, __ATOMIC_RELAXED, __ATOMIC_RELAXED));
  return old;
}
}  // namespace emu
}  // namespace natgrad

template <typename T>
T atomicAdd(T* address, T val) {
  return ::natgrad::emu::atomic_update(address, [&](T old) { return static_cast<T>(old + val); });
}
template <typename T>
T atomicMax(T* address, T val) {
  return ::natgrad::emu::atomic_update(address, [&](T old) { return old < val ? val : old; });
}
template <typename T>
T atomicMin(T* address, T val) {
  return ::natgrad::emu::atomic_update(address, [&](T old) { return val < old ? val : old; });
}
template <typename T>
T atomicCAS(T* address, T compare, T val) {
  return ::natgrad::emu::atomic_update(address, [&](T old) { return old == compare ? val : old; });
}
template <typename T>
T atomicExch(T* address, T val) {
  return ::natgrad::emu::atomic_update(address, [&](T) { return val; });
}

// ---- math intrinsics -----------------------------------------------------------------------------
inline float rsqrtf(float x) { return 1.0f / std::sqrt(x); }
inline double rsqrt(double x) { return 1.0 / std::sqrt(x); }
inline float __expf(float x) { return std::exp(x); }
inline float __logf(float x) { return std::log(x); }
inline float __fdividef(float a, float b) { return a / b; }
inline float __frcp_rn(float x) { return 1.0f / x; }
inline double __drcp_rn(double x) { return 1.0 / x; }
inline float __saturatef(float x) { return std::min(1.0f, std::max(0.0f, x)); }
inline int __popc(unsigned x) { return __builtin_popcount(x); }
inline int __ffs(int x) { return __builtin_ffs(x); }
inline int __clz(int x) { return x == 0 ? 32 : __builtin_clz(static_cast<unsigned>(x)); }
inline float __int_as_float(int x) { float f; std::memcpy(&f, &x, 4); return f; }
inline int __float_as_int(float f) { int x; std::memcpy(&x, &f, 4); return x; }
// fmaf, sqrtf, expf, fabsf, fminf, ... come from <math.h> as they are.
