// What the .cu sources use from CUDA and ATen's CUDA layer, behind names that compile twice: with
// nvcc for GPUs, and with the host compiler for the emulated backend (NATGRAD_EMULATE), which runs
// the same kernel and host code on CPU tensors. Every .cu includes this instead of CUDA headers.
//
//   dev_ptr<T>                 a global-memory pointer in kernel code (checked in emulation)
//   device_ptr<T>(tensor)      the dev_ptr to a tensor's data
//   ptr_cast<U>(p)             reinterpret a dev_ptr
//   NATGRAD_LAUNCH((kernel), grid, block, smem, stream, args...)   kernel launch (the kernel in
//                              parentheses, so template arguments may hold commas); counted in emulation
//   NATGRAD_SHARED(T, name, [n] or [n][m])                 a static __shared__ array (rank 1 or 2)
//   NATGRAD_DYNAMIC_SHARED(T, name)                        dynamic shared memory as dev_ptr<T>
//   current_stream(), DeviceGuard, upload(host bytes, like) stream, device and host-to-device copy
//   set_max_dynamic_shared(kernel, bytes)                  opt in to more than 48 KiB of it
//   uninitialized(sizes, options)                          at::empty (NaN-filled in emulation)
//   NATGRAD_CUDA_IMPL(ns, m)   TORCH_LIBRARY_IMPL for ns/CUDA, or ns_emu/CPU in emulation
//   NATGRAD_KERNEL_NS          namespace for the entry points, distinct in the two builds
#pragma once

#include <ATen/ATen.h>
#include <torch/library.h>

#include <cstring>
#include <list>
#include <mutex>
#include <string>
#include <unordered_map>

#include "common.h"

#ifdef NATGRAD_EMULATE
#include "emu/emu.h"
#else
#include <ATen/cuda/CUDAContext.h>
#include <c10/cuda/CUDAGuard.h>
#include <cuda_runtime.h>
#endif

#define NATGRAD_UNPAREN(...) __VA_ARGS__

// Both builds of these helpers are linked into one module, with different bodies: each lives in
// its own inline namespace, so that neither can bind the other's calls (the one definition rule),
// while code still says natgrad::upload. blas.h and solver.h do the same.
#ifdef NATGRAD_EMULATE
#define NATGRAD_RUNTIME_NS emulated_runtime
#else
#define NATGRAD_RUNTIME_NS cuda_runtime
#endif

namespace natgrad {
inline namespace NATGRAD_RUNTIME_NS {

#ifdef NATGRAD_EMULATE
#define NATGRAD_KERNEL_NS emulated_kernels
template <typename T>
using dev_ptr = emu::checked_ptr<T>;
using emu::ptr_cast;
using stream_t = int;
inline stream_t current_stream() { return 0; }
struct DeviceGuard {
  explicit DeviceGuard(const at::Device& device) {
    TORCH_CHECK(device.is_cpu(), "the emulated CUDA backend runs on CPU tensors, got a tensor on ", device);
  }
};
// The accessible bytes of a tensor: those its sizes and strides reach, nothing more of its storage.
template <typename T>
dev_ptr<T> device_ptr(const at::Tensor& t) {
  auto* p = static_cast<T*>(t.data_ptr());
  int64_t lo = 0, hi = t.numel() > 0 ? 1 : 0;
  for (int64_t d = 0; d < t.dim() && t.numel() > 0; ++d) {
    const int64_t reach = (t.size(d) - 1) * t.stride(d);
    (reach < 0 ? lo : hi) += reach;
  }
  const auto* base = reinterpret_cast<const char*>(t.data_ptr());
  const int64_t item = static_cast<int64_t>(t.element_size());
  return dev_ptr<T>(p, base + lo * item, base + hi * item, "global");
}
#define NATGRAD_LAUNCH(kernel, grid, block, smem, stream, ...) \
  ::natgrad::emu::launch(#kernel, NATGRAD_UNPAREN kernel, grid, block, smem, __VA_ARGS__)
#define NATGRAD_SHARED(T, name, ...) static thread_local ::natgrad::emu::shared_array<T __VA_ARGS__> name
#define NATGRAD_DYNAMIC_SHARED(T, name)                                                             \
  ::natgrad::dev_ptr<T> name(static_cast<T*>(::natgrad::emu::dynamic_shared_base()),                \
                             ::natgrad::emu::dynamic_shared_base(),                                 \
                             static_cast<char*>(::natgrad::emu::dynamic_shared_base()) +            \
                                 ::natgrad::emu::dynamic_shared_bytes(),                            \
                             "dynamic shared", ::natgrad::emu::Space::Shared)
#define NATGRAD_CUDA_IMPL(ns, m) TORCH_LIBRARY_IMPL(ns##_emu, CPU, m)
#define NATGRAD_KERNEL_LAUNCH_CHECK()
#else
#define NATGRAD_KERNEL_NS cuda_kernels
template <typename T>
using dev_ptr = T*;
template <typename U, typename T>
NATGRAD_HOST_DEVICE inline U* ptr_cast(T* p) {
  return reinterpret_cast<U*>(const_cast<std::remove_const_t<T>*>(p));
}
using stream_t = cudaStream_t;
inline stream_t current_stream() { return at::cuda::getCurrentCUDAStream(); }
using DeviceGuard = c10::cuda::CUDAGuard;
template <typename T>
dev_ptr<T> device_ptr(const at::Tensor& t) {
  return static_cast<T*>(t.data_ptr());
}
#define NATGRAD_LAUNCH(kernel, grid, block, smem, stream, ...) \
  NATGRAD_UNPAREN kernel<<<grid, block, smem, stream>>>(__VA_ARGS__)
#define NATGRAD_SHARED(T, name, ...) __shared__ T name __VA_ARGS__
#define NATGRAD_DYNAMIC_SHARED(T, name)                 \
  extern __shared__ unsigned char natgrad_dyn_smem_[]; \
  T* name = reinterpret_cast<T*>(natgrad_dyn_smem_)
#define NATGRAD_CUDA_IMPL(ns, m) TORCH_LIBRARY_IMPL(ns, CUDA, m)
#define NATGRAD_KERNEL_LAUNCH_CHECK() C10_CUDA_KERNEL_LAUNCH_CHECK()
#endif

// Opt a kernel in to more than the default 48 KiB of dynamic shared memory (up to the 227 KiB of an
// H100 block); the emulator rejects a launch above 48 KiB without it, as a GPU does.
template <typename Kernel>
inline void set_max_dynamic_shared(Kernel kernel, size_t bytes) {
#ifdef NATGRAD_EMULATE
  emu::set_max_dynamic_shared(emu::kernel_id(kernel), bytes);
#else
  if (bytes > 48 * 1024)
    C10_CUDA_CHECK(cudaFuncSetAttribute(reinterpret_cast<const void*>(kernel),
                                        cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes)));
#endif
}

// Streaming multiprocessors of the tensor's GPU (132, an H100's, in emulation: launch shapes are
// then those of that GPU).
inline int64_t multiprocessors(const at::Tensor& like) {
#ifdef NATGRAD_EMULATE
  (void)like;
  return 132;
#else
  return at::cuda::getDeviceProperties(like.device().index())->multiProcessorCount;
#endif
}

// Memory a kernel is to fill: at::empty on a GPU. In emulation every byte is 0xFF (NaN for floating
// types), so that an element the kernel leaves unwritten shows in the tests.
inline at::Tensor uninitialized(at::IntArrayRef sizes, const at::TensorOptions& options) {
  at::Tensor out = at::empty(sizes, options);
#ifdef NATGRAD_EMULATE
  if (out.numel() > 0) std::memset(out.data_ptr(), 0xFF, out.numel() * out.element_size());
#endif
  return out;
}

// Host bytes (a table of per-layer descriptors, say) as a device tensor like `like`. Tables are
// cached by content, device and stream: a call whose table is byte for byte one seen before (the
// same tensors again, as in optimizer steps that reuse their buffers) copies nothing. A miss copies
// asynchronously on the current stream from pinned memory (a plain CPU tensor in emulation). A
// table used while the stream is captured into a CUDA graph stays cached for good, so that a
// replay never reads freed memory (neither the device table nor the pinned source of its copy).
inline at::Tensor upload(const void* data, size_t bytes, const at::Tensor& like) {
  struct Entry {
    std::string key;
    at::Tensor host, device;
    bool captured = false;
  };
  // Never destroyed (as torch's own caches): tensors must not be freed after the allocators at exit.
  static auto& mutex = *new std::mutex;
  static auto& recent = *new std::list<Entry>;  // most recently used first
  static auto& index = *new std::unordered_map<std::string, std::list<Entry>::iterator>;
  constexpr size_t kMaxEntries = 512;

  const stream_t stream = current_stream();
#ifdef NATGRAD_EMULATE
  const int64_t device = -1;
  const bool capturing = false;
#else
  const int64_t device = like.device().index();
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream, &status));
  const bool capturing = status != cudaStreamCaptureStatusNone;
#endif
  std::string key(reinterpret_cast<const char*>(data), bytes);
  key.append(reinterpret_cast<const char*>(&device), sizeof(device));
  key.append(reinterpret_cast<const char*>(&stream), sizeof(stream));

  const std::lock_guard<std::mutex> lock(mutex);
  const auto found = index.find(key);
  if (found != index.end()) {
    recent.splice(recent.begin(), recent, found->second);
    found->second->captured |= capturing;
    return found->second->device;
  }
  Entry e;
  e.key = std::move(key);
  e.captured = capturing;
  auto opts = at::TensorOptions().dtype(at::kByte);
#ifdef NATGRAD_EMULATE
  emu::count_upload();
  e.device = at::empty({static_cast<int64_t>(bytes)}, opts);
  std::memcpy(e.device.data_ptr(), data, bytes);
#else
  e.host = at::empty({static_cast<int64_t>(bytes)}, opts.pinned_memory(true));
  std::memcpy(e.host.data_ptr(), data, bytes);
  e.device = e.host.to(like.device(), /*non_blocking=*/true);
#endif
  recent.push_front(std::move(e));
  index[recent.front().key] = recent.begin();
  // Evict the least recently used entries no graph holds.
  for (auto it = std::prev(recent.end()); recent.size() > kMaxEntries && it != recent.begin();) {
    auto victim = it--;
    if (victim->captured) continue;
    index.erase(victim->key);
    recent.erase(victim);
  }
  return recent.front().device;
}

}  // namespace NATGRAD_RUNTIME_NS
}  // namespace natgrad
