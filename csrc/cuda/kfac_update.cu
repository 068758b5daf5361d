// kfac_update_ on CUDA, in the manner of apex's multi_tensor_apply: every parameter's elements cut
// into chunks, one block per chunk, a table of chunks travelling with the launch. Two launches per
// dtype group, none per layer and no host synchronisation:
//   1. the KL-clip dot product sum <d, g> over the clipped tensors: a block reduction per chunk,
//      atomically added into one float64 on the device;
//   2. the update: every block derives nu from that sum (kfac_update.h) and applies scale, weight
//      decay, momentum and the step to its chunk; block 0 also stores nu for the caller.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <algorithm>

#include <vector>

#include "cuda/reduce.cuh"
#include "cuda/runtime.h"
#include "kfac_update.h"

namespace natgrad {
namespace NATGRAD_KERNEL_NS {
namespace {

constexpr int kThreads = 256;

struct Chunk {
  dev_ptr<char> p, buf;          // typed by the kernel
  dev_ptr<const char> d, g;
  int64_t begin, end;            // element range of this chunk in its tensor
  int64_t clipped;  // 64 bits: no padding bytes in the table, which upload() compares byte for byte
};

template <typename scalar_t>
__global__ void kl_dot_kernel(dev_ptr<const Chunk> chunks, dev_ptr<double> vg) {
  const Chunk C = chunks[blockIdx.x];
  NATGRAD_SHARED(double, scratch, [32]);
  const dev_ptr<const scalar_t> d = ptr_cast<const scalar_t>(C.d), g = ptr_cast<const scalar_t>(C.g);
  double s = 0.0;
  if (C.clipped)
    for (int64_t k = C.begin + threadIdx.x; k < C.end; k += blockDim.x) s += double(d[k]) * double(g[k]);
  s = block_reduce_sum(s, scratch);
  if (threadIdx.x == 0 && C.clipped) atomicAdd(&vg[0], s);
}

template <typename scalar_t>
__global__ void kfac_update_kernel(dev_ptr<const Chunk> chunks, dev_ptr<const double> vg, dev_ptr<double> nu_out,
                                   double lr, double momentum, double weight_decay, double kl_clip, bool has_momentum) {
  using acc_t = typename acc_type<scalar_t>::type;
  const Chunk C = chunks[blockIdx.x];
  const double nu = kfac_update::kl_nu(vg[0], lr, kl_clip);
  if (blockIdx.x == 0 && threadIdx.x == 0) nu_out[0] = nu;
  const dev_ptr<scalar_t> p = ptr_cast<scalar_t>(C.p), buf = ptr_cast<scalar_t>(C.buf);
  const dev_ptr<const scalar_t> d = ptr_cast<const scalar_t>(C.d);
  const acc_t scale = C.clipped ? static_cast<acc_t>(nu) : acc_t(1);
  for (int64_t k = C.begin + threadIdx.x; k < C.end; k += blockDim.x) {
    acc_t bv = has_momentum ? static_cast<acc_t>(buf[k]) : acc_t(0);
    p[k] = static_cast<scalar_t>(kfac_update::step<acc_t>(static_cast<acc_t>(p[k]), static_cast<acc_t>(d[k]), &bv,
                                                          scale, acc_t(lr), acc_t(momentum), acc_t(weight_decay),
                                                          has_momentum));
    if (has_momentum) buf[k] = static_cast<scalar_t>(bv);
  }
}

at::Tensor kfac_update_(at::TensorList params, at::TensorList directions, at::TensorList grads,
                        at::TensorList buffers, const c10::List<bool>& clipped, double lr, double momentum,
                        double weight_decay, double kl_clip) {
  kfac_update::check_args(params, directions, grads, buffers, clipped, lr, momentum, weight_decay, kl_clip);
  const at::TensorOptions f64 = at::TensorOptions().dtype(at::kDouble);
  if (params.empty()) return at::ones({}, f64);
  const DeviceGuard guard(params[0].device());
  const stream_t stream = current_stream();
  const bool has_momentum = !buffers.empty();
  at::Tensor vg = at::zeros({1}, f64.device(params[0].device()));
  at::Tensor nu = at::ones({1}, f64.device(params[0].device()));

  // Chunk tables per dtype; all dot products land in the one vg before any update reads it.
  std::vector<std::pair<at::ScalarType, std::vector<Chunk>>> groups;
  for (size_t i = 0; i < params.size(); ++i) {
    const auto t = params[i].scalar_type();
    auto it = std::find_if(groups.begin(), groups.end(), [&](const auto& g) { return g.first == t; });
    if (it == groups.end()) {
      groups.push_back({t, {}});
      it = groups.end() - 1;
    }
    const at::Tensor& b = has_momentum ? buffers[i] : params[i];
    for (int64_t s = 0; s < params[i].numel(); s += kfac_update::kChunk)
      it->second.push_back(Chunk{device_ptr<char>(params[i]), device_ptr<char>(b), device_ptr<const char>(directions[i]),
                                 device_ptr<const char>(grads[i]), s,
                                 std::min(params[i].numel(), s + kfac_update::kChunk), clipped.get(i) ? 1 : 0});
  }
  std::vector<at::Tensor> tables;
  for (const auto& [t, chunks] : groups) {
    if (chunks.empty()) {
      tables.emplace_back();
      continue;
    }
    tables.push_back(upload(chunks.data(), chunks.size() * sizeof(Chunk), params[0]));
    if (kl_clip > 0.0) {
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "kfac_update_", [&] {
        NATGRAD_LAUNCH((kl_dot_kernel<scalar_t>), dim3(static_cast<unsigned>(chunks.size())), dim3(kThreads), 0, stream,
                       device_ptr<const Chunk>(tables.back()), device_ptr<double>(vg));
        NATGRAD_KERNEL_LAUNCH_CHECK();
      });
    }
  }
  for (size_t gi = 0; gi < groups.size(); ++gi) {
    const auto& [t, chunks] = groups[gi];
    if (chunks.empty()) continue;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t, "kfac_update_", [&] {
      NATGRAD_LAUNCH((kfac_update_kernel<scalar_t>), dim3(static_cast<unsigned>(chunks.size())), dim3(kThreads), 0,
                     stream, device_ptr<const Chunk>(tables[gi]), device_ptr<const double>(vg), device_ptr<double>(nu),
                     lr, momentum, weight_decay, kl_clip, has_momentum);
      NATGRAD_KERNEL_LAUNCH_CHECK();
    });
  }
  return nu.reshape({});
}

}  // namespace

NATGRAD_CUDA_IMPL(natgrad, m) { m.impl("kfac_update_", &kfac_update_); }

}  // namespace NATGRAD_KERNEL_NS
}  // namespace natgrad
