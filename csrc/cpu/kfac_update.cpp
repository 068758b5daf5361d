// kfac_update_ on the CPU: chunks of every tensor in parallel; the KL-clip dot product from
// per-chunk partial sums added in a fixed order (deterministic), in float64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "kfac_update.h"

namespace natgrad {
namespace cpu_kernels {
namespace {

struct Chunk {
  size_t tensor;
  int64_t begin, end;
};

std::vector<Chunk> chunks_of(at::TensorList params) {
  std::vector<Chunk> out;
  for (size_t i = 0; i < params.size(); ++i)
    for (int64_t b = 0; b < params[i].numel(); b += kfac_update::kChunk)
      out.push_back({i, b, std::min(params[i].numel(), b + kfac_update::kChunk)});
  return out;
}

at::Tensor kfac_update_(at::TensorList params, at::TensorList directions, at::TensorList grads,
                        at::TensorList buffers, const c10::List<bool>& clipped, double lr, double momentum,
                        double weight_decay, double kl_clip) {
  kfac_update::check_args(params, directions, grads, buffers, clipped, lr, momentum, weight_decay, kl_clip);
  const std::vector<Chunk> chunks = chunks_of(params);
  const int64_t nc = static_cast<int64_t>(chunks.size());
  double vg = 0.0;
  if (kl_clip > 0.0) {
    std::vector<double> partial(nc, 0.0);
    at::parallel_for(0, nc, 1, [&](int64_t b, int64_t e) {
      for (int64_t c = b; c < e; ++c) {
        const Chunk& ch = chunks[c];
        if (!clipped.get(ch.tensor)) continue;
        AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[ch.tensor].scalar_type(), "kfac_update_", [&] {
          const scalar_t* d = directions[ch.tensor].data_ptr<scalar_t>();
          const scalar_t* g = grads[ch.tensor].data_ptr<scalar_t>();
          double s = 0.0;
          for (int64_t k = ch.begin; k < ch.end; ++k) s += double(d[k]) * double(g[k]);
          partial[c] = s;
        });
      }
    });
    for (double s : partial) vg += s;
  }
  const double nu = kfac_update::kl_nu(vg, lr, kl_clip);
  const bool has_momentum = !buffers.empty();
  at::parallel_for(0, nc, 1, [&](int64_t b, int64_t e) {
    for (int64_t c = b; c < e; ++c) {
      const Chunk& ch = chunks[c];
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, params[ch.tensor].scalar_type(), "kfac_update_", [&] {
        using acc_t = typename acc_type<scalar_t>::type;
        scalar_t* p = params[ch.tensor].data_ptr<scalar_t>();
        const scalar_t* d = directions[ch.tensor].data_ptr<scalar_t>();
        scalar_t* buf = has_momentum ? buffers[ch.tensor].data_ptr<scalar_t>() : nullptr;
        const acc_t scale = clipped.get(ch.tensor) ? static_cast<acc_t>(nu) : acc_t(1);
        for (int64_t k = ch.begin; k < ch.end; ++k) {
          acc_t bv = has_momentum ? static_cast<acc_t>(buf[k]) : acc_t(0);
          p[k] = static_cast<scalar_t>(kfac_update::step<acc_t>(static_cast<acc_t>(p[k]), static_cast<acc_t>(d[k]), &bv,
                                                                scale, acc_t(lr), acc_t(momentum), acc_t(weight_decay),
                                                                has_momentum));
          if (has_momentum) buf[k] = static_cast<scalar_t>(bv);
        }
      });
    }
  });
  return at::scalar_tensor(nu, at::TensorOptions().dtype(at::kDouble));
}

}  // namespace

TORCH_LIBRARY_IMPL(natgrad, CPU, m) { m.impl("kfac_update_", &kfac_update_); }

}  // namespace cpu_kernels
}  // namespace natgrad
