// Every op schema, once. registry.cpp defines each in the `natgrad` namespace (CPU and CUDA
// kernels) and again in `natgrad_emu`, where the CUDA source compiled for the CPU registers (the
// emulated backend); testing-only kernels live in `natgrad_testing` / `natgrad_testing_emu`.
#pragma once

namespace natgrad {

inline constexpr const char* kOpSchemas[] = {
    "factor_update_(Tensor(a!)[] factors, Tensor[] inputs, float decay, float[] scales, "
    "bool[] append_ones) -> ()",
    "conv_factor_update_(Tensor(a!)[] factors, Tensor[] images, int[] geometry, float decay, float[] scales, "
    "bool[] append_ones) -> ()",
    "eigh_batched(Tensor[] mats) -> (Tensor[], Tensor[])",
    "damped_inverse(Tensor[] mats, float[] shifts) -> Tensor[]",
    "kron_matmul(Tensor[] grads, Tensor[] IA, Tensor[] IG) -> Tensor[]",
    "precondition(Tensor[] grads, Tensor[] QA, Tensor[] dA, Tensor[] QG, Tensor[] dG, float damping, "
    "bool factored) -> Tensor[]",
    "ekfac_precondition(Tensor[] grads, Tensor[] QA, Tensor[] QG, Tensor[] S, float damping) -> Tensor[]",
    "kfac_update_(Tensor(a!)[] params, Tensor[] directions, Tensor[] grads, Tensor(b!)[] momentum_buffers, "
    "bool[] clipped, float lr, float momentum, float weight_decay, float kl_clip) -> Tensor",
};

// Ops that wait for the device on the host (to redo failed factorisations in float64): a CUDA graph
// cannot hold them, and their schemas say so (torch.Tag.cudagraph_unsafe) to torch.compile.
inline constexpr const char* kHostSyncOps[] = {"eigh_batched", "damped_inverse"};

// Kernels that exercise the CUDA features the emulation layer must get right (tests only).
inline constexpr const char* kTestingSchemas[] = {
    "thread_indices(Tensor like, int[] grid, int[] block) -> Tensor",
    "block_sum(Tensor x, int threads) -> Tensor",
    "warp_ops(Tensor x) -> Tensor",
    "reverse_blocks(Tensor x, int block) -> Tensor",
    "histogram(Tensor idx, int bins) -> Tensor",
    "divergent_barrier(Tensor x) -> Tensor",
    "read_at(Tensor x, int offset) -> Tensor",
    "shared_read_at(Tensor x, int offset) -> Tensor",
    "gemm(Tensor a, Tensor b, bool miswire) -> Tensor",
    "lost_update(Tensor like, int threads) -> Tensor",
    "missing_barrier(Tensor x) -> Tensor",
    "block_race(Tensor like, int blocks) -> Tensor",
    "uninitialized_shared(Tensor like) -> Tensor",
    "unwritten_output(Tensor like, int n) -> Tensor",
    "dynamic_shared(Tensor like, int bytes, bool opt_in) -> Tensor",
    "static_shared_overflow(Tensor like) -> Tensor",
    "misaligned_read(Tensor like) -> Tensor",
    "solver_batches(Tensor like, int count, int n, int limit) -> int[]",
    "library_choice(Tensor factor, Tensor operand, int m, int n, int k) -> bool",
};

}  // namespace natgrad
