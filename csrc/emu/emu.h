// CUDA execution model on the CPU, for running our .cu kernel sources in tests (NATGRAD_EMULATE).
//
// The kernel source is compiled by the host compiler with this header standing in for the CUDA
// built-ins. A launch runs the grid one block at a time; a block's threads are cooperative fibers
// (ucontext) on the calling thread, switched at __syncthreads(), warp collectives and, under the
// "preempt" schedule, at memory accesses. The order of blocks and threads follows the schedule
// (control.h): a kernel whose result depends on it has a race.
// Checked, each failure aborting the launch with an exception naming kernel, block and thread:
//   - a barrier not every thread of the block reaches; warp collectives whose lanes do not all arrive;
//   - out-of-bounds and misaligned global and shared accesses (checked_ptr, shared_array), and
//     out-of-bounds indexing of local arrays (-fsanitize=bounds, whose handler is ours);
//   - with race detection on, conflicting accesses to one element (shadow memory, emu.cpp);
//   - more than 48 KiB of static shared memory, more than 48 KiB of dynamic shared memory without
//     set_max_dynamic_shared, more than 227 KiB in all.
// Shared memory is filled with NaN bytes (0xFF) at the start of every block, so that a read of an
// element no thread wrote shows. Launches and library calls are counted (counters()).
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

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include "emu/control.h"

// ---- qualifiers ----------------------------------------------------------------------------------
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
// Kernel code declares static shared memory with NATGRAD_SHARED (runtime.h), which the emulator
// can poison and watch; a bare __shared__ does not compile here.
#define __shared__ natgrad_emulation_needs_NATGRAD_SHARED_instead_of___shared__

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

// ---- memory accesses -----------------------------------------------------------------------------
// 64 bits: a checked_ptr then has no padding bytes, which would make descriptor tables holding it
// differ from call to call (upload() in cuda/runtime.h caches tables by their bytes).
enum class Space : uint64_t { Global, Shared };

// Whether the running launch watches accesses (race detection or preemption); set per launch.
extern thread_local bool g_watch;
// Records an access for the race detector and, under "preempt", may switch threads. Out of line on
// purpose: its return address is the access's place in the kernel, for the report.
void record_access(const void* addr, Space space, bool write);
__attribute__((always_inline)) inline void watch(const void* addr, Space space, bool write) {
  if (g_watch) record_access(addr, space, write);
}

// Accessors are forced inline so that record_access's return address lies in the kernel's code.
#define NATGRAD_EMU_INLINE inline __attribute__((always_inline))

// Value types are returned by reference through this proxy, which tells reads from writes.
// `&ref` gives the raw address, for atomics, which are not watched (they do not race).
template <typename T>
struct elem_ref {
  T* p;
  Space space;
  NATGRAD_EMU_INLINE operator T() const {
    watch(p, space, false);
    return *p;
  }
  // static_cast<float>(half_ref): a class element type (c10::Half) needs two conversions.
  template <typename U, std::enable_if_t<std::is_arithmetic_v<U> && !std::is_arithmetic_v<T>, int> = 0>
  NATGRAD_EMU_INLINE explicit operator U() const {
    return static_cast<U>(static_cast<T>(*this));
  }
  NATGRAD_EMU_INLINE const elem_ref& operator=(T v) const {
    watch(p, space, true);
    *p = v;
    return *this;
  }
  NATGRAD_EMU_INLINE const elem_ref& operator=(const elem_ref& o) const { return *this = static_cast<T>(o); }
  template <typename U>
  NATGRAD_EMU_INLINE const elem_ref& operator+=(U v) const { return *this = static_cast<T>(static_cast<T>(*this) + v); }
  template <typename U>
  NATGRAD_EMU_INLINE const elem_ref& operator-=(U v) const { return *this = static_cast<T>(static_cast<T>(*this) - v); }
  template <typename U>
  NATGRAD_EMU_INLINE const elem_ref& operator*=(U v) const { return *this = static_cast<T>(static_cast<T>(*this) * v); }
  template <typename U>
  NATGRAD_EMU_INLINE const elem_ref& operator/=(U v) const { return *this = static_cast<T>(static_cast<T>(*this) / v); }
  T* operator&() const { return p; }
};

template <typename T>
constexpr bool is_value_v = std::is_arithmetic_v<T> || std::is_same_v<T, c10::Half> ||
                            std::is_same_v<T, c10::BFloat16>;

// A pointer that knows the allocation it may touch. Kernel code uses dev_ptr<T> (T* under nvcc).
// Indexing a non-const value type gives an elem_ref; a const or struct element (descriptor tables)
// is returned by reference and watched as a read.
template <typename T>
struct checked_ptr {
  T* p = nullptr;
  const char* lo = nullptr;  // bytes [lo, hi) may be accessed
  const char* hi = nullptr;
  const char* name = "global";
  Space space = Space::Global;

  checked_ptr() = default;
  checked_ptr(T* p_, const void* lo_, const void* hi_, const char* name_, Space space_ = Space::Global)
      : p(p_), lo(static_cast<const char*>(lo_)), hi(static_cast<const char*>(hi_)), name(name_), space(space_) {}
  template <typename U, typename = std::enable_if_t<std::is_convertible_v<U*, T*>>>
  checked_ptr(const checked_ptr<U>& o) : p(o.p), lo(o.lo), hi(o.hi), name(o.name), space(o.space) {}

  NATGRAD_EMU_INLINE T* locate(int64_t i) const {
    const char* a = reinterpret_cast<const char*>(p + i);
    if (a < lo || a + sizeof(T) > hi) report(a);
    if (reinterpret_cast<uintptr_t>(a) % alignof(T) != 0) misaligned(a);
    return p + i;
  }
  NATGRAD_EMU_INLINE decltype(auto) at(int64_t i) const {
    T* a = locate(i);
    if constexpr (!std::is_const_v<T> && is_value_v<T>) {
      return elem_ref<T>{a, space};
    } else {
      watch(a, space, false);
      return *a;
    }
  }
  NATGRAD_EMU_INLINE decltype(auto) operator[](int64_t i) const { return at(i); }
  NATGRAD_EMU_INLINE decltype(auto) operator*() const { return at(0); }
  T* operator->() const { return locate(0); }
  checked_ptr operator+(int64_t i) const { return {p + i, lo, hi, name, space}; }
  checked_ptr operator-(int64_t i) const { return {p - i, lo, hi, name, space}; }
  checked_ptr& operator+=(int64_t i) { p += i; return *this; }
  checked_ptr& operator++() { ++p; return *this; }
  bool operator==(const checked_ptr& o) const { return p == o.p; }
  bool operator!=(const checked_ptr& o) const { return p != o.p; }
  explicit operator bool() const { return p != nullptr; }
  T* raw() const { return p; }

  [[noreturn]] void report(const char* a) const {
    fail(std::string("out-of-bounds ") + name + " memory access: byte offset " +
         std::to_string(a - lo) + " (access of " + std::to_string(sizeof(T)) + " bytes) in an allocation of " +
         std::to_string(hi - lo) + " bytes");
  }
  [[noreturn]] void misaligned(const char* a) const {
    fail(std::string("misaligned ") + name + " memory access: a " + std::to_string(sizeof(T)) +
         "-byte element at byte offset " + std::to_string(a - lo) + " (address " +
         std::to_string(reinterpret_cast<uintptr_t>(a) % 256) + " mod 256) needs " + std::to_string(alignof(T)) +
         "-byte alignment");
  }
};

template <typename U, typename T>
checked_ptr<U> ptr_cast(const checked_ptr<T>& p) {
  return {reinterpret_cast<U*>(const_cast<std::remove_const_t<T>*>(p.p)), p.lo, p.hi, p.name, p.space};
}

// ---- static shared memory ------------------------------------------------------------------------
uint64_t block_serial();                 // changes with every block run
void declare_static_shared(size_t bytes);  // counts an array against the block's limits

// A __shared__ array (rank 1 or 2) of a kernel: one per OS thread (blocks run one at a time on it),
// poisoned with NaN bytes when a new block first touches it. Indexing is bounds-checked and watched.
template <typename Arr>
class shared_array {
  static_assert(std::is_array_v<Arr> && (std::rank_v<Arr> == 1 || std::rank_v<Arr> == 2),
                "NATGRAD_SHARED declares arrays of rank 1 or 2");
  using Elem = std::remove_all_extents_t<Arr>;
  static constexpr int64_t kRows = std::extent_v<Arr, 0>;
  static constexpr int64_t kCols = std::rank_v<Arr> == 2 ? std::extent_v<Arr, 1> : 1;
  alignas(16) mutable unsigned char bytes_[sizeof(Arr)];
  mutable uint64_t block_ = 0;

  Elem* base() const {
    if (block_ != block_serial()) {
      block_ = block_serial();
      std::memset(bytes_, 0xFF, sizeof(Arr));
      declare_static_shared(sizeof(Arr));
    }
    return reinterpret_cast<Elem*>(bytes_);
  }

 public:
  NATGRAD_EMU_INLINE decltype(auto) operator[](int64_t i) const {
    Elem* b = base();
    if constexpr (std::rank_v<Arr> == 1) {
      return checked_ptr<Elem>(b, b, b + kRows, "shared", Space::Shared)[i];
    } else {
      if (i < 0 || i >= kRows)
        fail("index " + std::to_string(i) + " out of bounds for __shared__ array [" + std::to_string(kRows) + "][" +
             std::to_string(kCols) + "]");
      return checked_ptr<Elem>(b + i * kCols, b + i * kCols, b + (i + 1) * kCols, "shared", Space::Shared);
    }
  }
};

// ---- launches ------------------------------------------------------------------------------------
// `kernel` identifies the function for its dynamic shared memory opt-in (set_max_dynamic_shared).
void run_grid(const char* name, const void* kernel, dim3 grid, dim3 block, size_t shared_bytes,
              const std::function<void()>& body);
void set_max_dynamic_shared(const void* kernel, size_t bytes);

template <typename... Params>
const void* kernel_id(void (*kernel)(Params...)) {
  return reinterpret_cast<const void*>(kernel);
}

template <typename... Params, typename... Args>
void launch(const char* name, void (*kernel)(Params...), dim3 grid, dim3 block, size_t shared_bytes,
            Args&&... args) {
  // Arguments are copied once, as a CUDA launch copies them into the kernel's parameter space.
  auto bound = std::make_tuple(static_cast<std::decay_t<Params>>(std::forward<Args>(args))...);
  run_grid(name, kernel_id(kernel), grid, block, shared_bytes, [&] { std::apply(kernel, bound); });
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
