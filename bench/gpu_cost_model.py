"""A per-op GPU cost model of natgrad_cuda's CUDA path on one H100 SXM, built from each kernel's
structure as the sources in csrc/cuda/ write it. Every number it gives is an ESTIMATE: no GPU has
run this code. `bash scripts/gpu_check.sh` times every op on a GPU (CUDA events); its timings
replace these estimates once it has run.

What it models, per op (the sources it reads):
  grouped GEMM (cuda/grouped_gemm.cuh, cuda/grouped.cuh slab_multiply): precondition, kron_matmul.
      A block of 8 x 8 threads computes one 32x32 tile, 4 x 4 outputs per thread (TileShape). Per
      slab row r a warp (4 values of ty, 8 of tx) loads As[r][ty + 8q] and Bs[r][tx + 8p] for
      q, p = 0..3, each load one wavefront (4 or 8 distinct words), i.e. 8 shared loads per 16 FMAs.
      One shared wavefront per clock per SM against 4 warp-FMAs per clock caps the inner loop at
      16 / (4 x 8) = 50% of FP32 peak (it was 20% with 32 x 8 threads of 4 outputs each: 5 loads per
      4 FMAs). Staging a slab adds 2 shared
      stores and 2 global loads per 32 elements; a global operand whose threads stride across rows
      (uncoalesced) costs one L1 wavefront per thread instead of one per warp; the kernel now reads
      every dense operand along its unit-stride index (GEMM_LOADS_ALONG_K), before that half of
      precondition's operand reads were strided. No double buffering:
      a block waits out a global load and two barriers per 32-deep slab, which co-resident blocks
      hide only when there are several per SM.
  factor_update_ (cuda/factor_update.cu): the same tile loop, T(T+1)/2 blocks per layer (T tiles per
      edge of 32), each looping over all n rows: with fewer blocks than SMs, one block's loop is the
      critical path. Split-K (FACTOR_SPLIT_K) cuts the rows of a launch with under 2 x SMS tiles into
      slices, one block per (tile, slice), and a second launch sums them.
  library products (cuda/library_gemm.h): a product of m n k >= LIBRARY_MIN_MACS multiply-adds (by
      the arithmetic, as ops' default min_macs="auto") goes
      to cuBLAS: tiles of the largest edge in LIBRARY_TILES that fills the SMs, in waves, each SM at
      LIBRARY_EFFICIENCY of its share of the peak of the arithmetic (IEEE FP32, TF32 or BF16 tensor
      cores, FP64), plus one call's fixed cost; the grouped launch keeps an epilogue-only entry (one
      pass over the product) where the stage has an epilogue. library_crossover() compares the two
      paths on MLPs of growing width: the basis of the default thresholds.
  eigh_batched (cuda/eigh_batched.cu): n <= 64, one block of 256 threads per matrix running cyclic
      Jacobi: sweeps x (m - 1) rounds x 3 barrier-separated phases; larger n goes to cuSOLVER
      (syevBatched per size group, syevd per lone matrix) at an assumed rate: a chain of dependent
      kernels per column of the tridiagonal reduction plus the flops at SOLVER_FLOPS. syevBatched's
      algorithm is not documented; the model assumes it steps its whole batch through one such chain.
      Per call and dtype, the host code adds 4 torch ops (the finiteness flags: one multi-tensor
      max-norm) and, per call, one synchronisation.
  damped_inverse (cuda/damped_inverse.cu): per matrix cuSOLVER potrf + potrs (assumed rates) and
      the torch ops around them, batched per group of equal sizes.
  kfac_update_ (cuda/kfac_update.cu): two multi-tensor launches, memory bound.

Each op's estimate is the sum of its launches' device times, a fixed cost per launch, library call,
torch op and host synchronisation (all added: the ops' launches depend on each other), and its
`peak_flop_bound_s` is the estimate the benches quoted before (bench/common.h100_estimate, now
gone), max(FLOPs / FP32 peak, bytes / HBM) + (launches + library calls) x launch cost, kept to show
how far the structure is from it.

    python bench/gpu_cost_model.py [--quick] [--out bench/results/gpu_cost_model.json]
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import asdict, dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

# ---- H100 SXM5: datasheet and architecture facts ----
SMS = 132  # datasheet: H100 SXM5 enables 132 SMs
CLOCK_HZ = 1.98e9  # SXM5 max boost: 132 SMs x 128 lanes x 2 x 1.98 GHz = the datasheet's 67 TFLOP/s (1.755 GHz is the PCIe card's)
FP32_LANES_PER_SM = 128  # architecture: 4 sub-partitions x 32 FP32 lanes
FP64_LANES_PER_SM = 64  # architecture: half the FP32 rate (datasheet 34 TFLOP/s FP64 non-tensor)
FP32_PEAK_FLOPS = 67e12  # datasheet FP32 (non-tensor); the peak-FLOP bound's divisor
TF32_PEAK_FLOPS = 495e12  # datasheet TF32 tensor cores, dense (989 with sparsity)
BF16_PEAK_FLOPS = 989e12  # datasheet BF16 tensor cores, dense
FP64_PEAK_FLOPS = 67e12  # datasheet FP64 tensor cores
WARP = 32  # architecture
SHARED_BANKS = 32  # architecture: 32 banks x 4 B, one wavefront (128 B) per clock per SM
SHARED_BANK_BYTES = 4
LINE_BYTES = 128  # architecture: an L1 wavefront serves one 128-byte line
MAX_THREADS_PER_SM = 2048  # CUDA occupancy limits for compute capability 9.0
MAX_BLOCKS_PER_SM = 32
REGISTERS_PER_SM = 65536
SHARED_BYTES_PER_SM = 228 * 1024  # 228 KiB per SM, of which the runtime reserves 1 KiB per block
SHARED_RESERVED_PER_BLOCK = 1024
HBM_BYTES_PER_S = 3.0e12  # measured copy bandwidth (datasheet 3.35 TB/s), the figure the benches always used

# ---- Assumptions: not measured here; a GPU run (scripts/gpu_check.sh) or a profiler replaces them ----
REGISTERS_PER_THREAD = 64  # ASSUMPTION: not compiled for sm_90 here (nvcc --resource-usage gives it): 4 blocks of 256 per SM
GLOBAL_LATENCY_CYCLES = 550  # ASSUMPTION: a load that misses L2, ~450-650 cycles in published Volta-Hopper microbenchmarks
BARRIER_CYCLES = 30  # ASSUMPTION: __syncthreads of 8 warps arriving together
UNCOALESCED_WAVEFRONTS = 32  # ASSUMPTION: a warp load whose 32 addresses lie in 32 lines takes one L1 wavefront per line
SHARED_LATENCY_CYCLES = 30  # ASSUMPTION: shared load to use, ~23-33 cycles in microbenchmarks
INDEX_CYCLES = 25  # ASSUMPTION: the int division and pair lookup per element in the Jacobi loops
ROTATION_CYCLES = 150  # ASSUMPTION: one Jacobi rotation (3 dependent shared loads, sqrt, divisions)
L2_BYTES_PER_S = 5.5e12  # ASSUMPTION: L2 to SM bandwidth, published H100 microbenchmarks
STREAM_EFFICIENCY = 0.8  # ASSUMPTION: fraction of HBM bandwidth a grid-stride elementwise kernel reaches
LAUNCH_SECONDS = 4e-6  # ASSUMPTION (the benches' old figure): launch and drain of one small kernel, also a torch op or a table upload
SYNC_SECONDS = 20e-6  # ASSUMPTION: device-to-host copy of the flags and stream synchronisation
SOLVER_KERNEL_SECONDS = 2.5e-6  # ASSUMPTION: one dependent kernel inside a cuSOLVER routine
SOLVER_KERNELS_PER_COLUMN = 2  # ASSUMPTION: the tridiagonal reduction's per-column chain (symv, then the update)
SOLVER_FLOPS = 10e12  # ASSUMPTION: syevd's flops outside that chain (BLAS3 and BLAS2 halves), ~15% of FP32 peak
SOLVER_BLAS3_FLOPS = 0.5 * FP32_PEAK_FLOPS  # ASSUMPTION: potrf / trsm blocks in FP32 SIMT at half peak (TF32 off)
POTRF_BLOCK = 64  # ASSUMPTION: panel width of cuSOLVER's blocked Cholesky and triangular solves
POTRF_KERNELS_PER_PANEL = 3  # ASSUMPTION: panel factorisation, trsm, syrk per panel
LIBRARY_EFFICIENCY = 0.7  # ASSUMPTION: fraction of peak a cuBLAS GEMM's busy SMs reach (large GEMMs: 60-80% in published runs)
LIBRARY_TILES = (128, 64, 32)  # ASSUMPTION: cuBLAS's output tile edges; the model takes the largest that fills the SMs
LIBRARY_MIN_MACS = {"ieee": 1 << 28, "f64": 1 << 28, "tf32": 1 << 26, "bf16": 1 << 26}  # library_gemms.h kAuto: products of m n k >= this go to cuBLAS
JACOBI_SWEEPS = 8  # ASSUMPTION: the stopping rule ends after 4-10 sweeps (eigh_batched.cu); the bench measures it in emulation

# ---- Kernel facts, read from the sources ----
TILE = 32  # grouped.cuh TileShape::kTile: output tile edge
EDGE = 8  # TileShape::kEdge: threads per block edge
MICRO = TILE // EDGE  # TileShape::kMicro: each thread owns MICRO x MICRO outputs (rows ty + 8q, columns tx + 8p)
CHUNK = 32  # kChunk: depth of the staged slabs
GEMM_THREADS = EDGE * EDGE  # 64
GEMM_SHARED_BYTES = 2 * CHUNK * (TILE + 1) * 4 + 32 * 4  # As, Bs (fp32) and the epilogue's scratch
FACTOR_SHARED_BYTES = 2 * CHUNK * (TILE + 1) * 4  # As, Bs
SPLIT_MIN_ROWS = 512  # factor_update.h kMinSliceRows: split-K's shortest row slice
FACTOR_SPLIT_K = True  # factor_update.cu splits a launch's rows when its tiles leave SMs idle (row_slices)
GEMM_LOADS_ALONG_K = True  # grouped_gemm.cuh reads each operand along its unit-stride index, k too (slab stored transposed)
JACOBI_MAX = 64  # eigh_batched.cu kJacobiMax
BATCHED_MAX = 512  # eigh_batched.cu kBatchedMax
JACOBI_THREADS = 256  # eigh_batched.cu kThreads
JACOBI_REDUCTIONS_PER_CHECK = 3  # off, all, rotations: block_reduce_sum (2 barriers each) + 1 barrier
UPDATE_CHUNK = 8192  # kfac_update.h kChunk: elements per block
UPDATE_THREADS = 256  # kfac_update.cu kThreads
BYTES = 4  # fp32 throughout the model

# Torch ops (device kernels or copies) the host code issues around ours, counted in the sources.
EIGH_TORCH_PER_SOLVER_CALL = 5  # solver_eigh: stack, clone, zeros(info), ne, masked_fill
EIGH_TORCH_PER_DTYPE = 4  # the finiteness flags: _foreach_norm, stack, isfinite, all
EIGH_TORCH_PER_CALL = 2  # cat of the flags, copy to the host (then one sync)
INVERSE_TORCH_PER_GROUP = 23  # cholesky_inverses per size group: stack, tril x 2, add_, tensor, to, diagonal add_, eye, contiguous, zeros, workspace, tril x 2, add_, eq, all, isfinite x 2, all x 2, logical_and_ x 2, ...
INVERSE_ELEMENTWISE_PASSES = 20  # those ops' reads and writes of each n x n fp32 matrix (the bool flags' passes counted as whole)
INVERSE_TORCH_PER_CALL = 2  # stack of the flags, copy to the host (then one sync)
UPDATE_TORCH_PER_CALL = 2  # zeros(vg), ones(nu)
UPLOADS_PER_CALL = 1  # ASSUMPTION: the descriptor table's copy; none when upload() finds it cached (same tensors as before)

NOTE = ("ESTIMATES from a cost model of the kernels' structure (bench/gpu_cost_model.py), not measurements: "
        "no GPU has run this code; scripts/gpu_check.sh times the ops on a GPU and replaces them.")


def constants() -> Dict[str, float]:
    """Every named constant of the model, for the JSON (the comments above say where each comes from)."""
    return {k: v for k, v in globals().items() if k.isupper() and isinstance(v, (int, float)) and k != "NOTE"}


# ---- Occupancy ----

def blocks_per_sm(threads: int, shared_bytes: int, registers_per_thread: int = REGISTERS_PER_THREAD) -> int:
    """Resident blocks per SM: the least of the thread, block, register and shared-memory limits."""
    if threads <= 0 or threads > 1024:
        raise ValueError(f"threads per block must be in 1..1024, got {threads}")
    if shared_bytes + SHARED_RESERVED_PER_BLOCK > SHARED_BYTES_PER_SM:
        raise ValueError(f"{shared_bytes} B of shared memory per block exceeds an SM's {SHARED_BYTES_PER_SM} B")
    warps = -(-threads // WARP)
    return max(1, min(MAX_THREADS_PER_SM // (warps * WARP), MAX_BLOCKS_PER_SM,
                      REGISTERS_PER_SM // (registers_per_thread * warps * WARP),
                      SHARED_BYTES_PER_SM // (shared_bytes + SHARED_RESERVED_PER_BLOCK)))


def grid_cycles(blocks: int, steps: float, step_pipe: float, step_latency: float, resident: int,
                fixed: float = 0.0, max_steps: Optional[float] = None) -> float:
    """Cycles of a grid of `blocks` alike blocks, each `steps` steps long, on SMS SMs holding `resident`
    blocks each. A step costs `step_pipe` cycles of a pipe the SM's co-resident blocks share and
    `step_latency` cycles of waiting (loads, barriers) that they overlap: b blocks on one SM take
    max(b x pipe, pipe + latency) per step. The busiest SM gets ceil(blocks / SMS) blocks in rounds of
    `resident`; `max_steps` (the longest block, when blocks differ) bounds it below as one block alone."""
    if blocks <= 0:
        return 0.0
    per_sm = -(-blocks // SMS)
    b = min(resident, per_sm)
    full, rest = divmod(per_sm, b)

    def round_cycles(k):
        return steps * max(k * step_pipe, step_pipe + step_latency) + fixed

    cycles = full * round_cycles(b) + (round_cycles(rest) if rest else 0.0)
    longest = (max_steps if max_steps is not None else steps) * (step_pipe + step_latency) + fixed
    return max(cycles, longest)


# ---- The tiled product loop shared by the grouped GEMM and factor_update_ ----

def slab_pipe_cycles(uncoalesced: int, acc_bytes: int = BYTES, load_bytes: int = BYTES) -> Dict[str, float]:
    """One block's cycles per 32-deep slab on the SM's shared/L1 pipe and FMA pipe (slab_multiply and
    the staging loop before it). `uncoalesced`: how many of the two operands' global loads stride
    across rows (0, 1 or 2)."""
    if uncoalesced not in (0, 1, 2):
        raise ValueError(f"uncoalesced must be 0, 1 or 2 operands, got {uncoalesced}")
    warps = GEMM_THREADS // WARP
    wave = SHARED_BANKS * SHARED_BANK_BYTES
    # Per slab row a warp loads As[r][ty + 8q] (WARP // EDGE distinct words) and Bs[r][tx + 8p]
    # (EDGE distinct words), MICRO of each.
    a_wavefronts = max(1, (WARP // EDGE) * acc_bytes // wave)
    b_wavefronts = max(1, EDGE * acc_bytes // wave)
    inner = warps * CHUNK * MICRO * (a_wavefronts + b_wavefronts)
    warp_loads = TILE * CHUNK // WARP  # per operand and slab
    stores = 2 * warp_loads * max(1, WARP * acc_bytes // wave)  # a warp stores one 32-wide slab row
    coalesced_load = max(1, WARP * load_bytes // LINE_BYTES)
    loads = warp_loads * ((2 - uncoalesced) * coalesced_load + uncoalesced * UNCOALESCED_WAVEFRONTS)
    lanes = FP32_LANES_PER_SM if acc_bytes == 4 else FP64_LANES_PER_SM
    fma = warps * CHUNK * MICRO * MICRO * WARP / lanes
    return {"inner_loop": inner, "staging": stores + loads, "fma": fma, "pipe": max(inner + stores + loads, fma)}


def inner_loop_peak_fraction(acc_bytes: int = BYTES) -> float:
    """The fraction of FP32 peak slab_multiply's inner loop alone can reach (shared-load bound): 0.5."""
    c = slab_pipe_cycles(0, acc_bytes)
    return c["fma"] / c["inner_loop"]


SLAB_LATENCY_CYCLES = GLOBAL_LATENCY_CYCLES + 2 * BARRIER_CYCLES  # per slab: a global load and two barriers, unhidden within a block
BLOCK_FIXED_CYCLES = 2 * GLOBAL_LATENCY_CYCLES  # the descriptor lookup, and the epilogue's global read and write


@dataclass(frozen=True)
class Gemm:
    """C (m x n) = A (m x k) B (k x n) in one grouped GEMM launch, with `uncoalesced` operands."""
    m: int
    n: int
    k: int
    uncoalesced: int = 0


def coalesced_a(row_major: bool, transposed: bool, along_k: bool = False) -> bool:
    """grouped_gemm_kernel reads A[(i0 + tx) a0 + kk a1]: coalesced when a0 (the stride down op(A)'s
    rows) is 1, which entry() sets from A's strides and the transpose flag. `along_k`: the kernel
    reads a dense operand along whichever index has stride 1 (GEMM_LOADS_ALONG_K)."""
    return along_k or transposed == row_major


def coalesced_b(row_major: bool, transposed: bool, along_k: bool = False) -> bool:
    """It reads B[kk b0 + (j0 + tx) b1]: coalesced when b1 (the stride along op(B)'s rows) is 1."""
    return along_k or transposed != row_major


def gemm_launch_seconds(gemms: Sequence[Gemm]) -> Dict[str, float]:
    """Device time of one grouped GEMM launch (one stage) over several layers' products."""
    tiles, work, pipe_work, bytes_moved, longest = 0, 0.0, 0.0, 0.0, 0.0
    for g in gemms:
        t = -(-g.m // TILE) * -(-g.n // TILE)
        slabs = -(-g.k // CHUNK)
        pipe = slab_pipe_cycles(g.uncoalesced)["pipe"]
        tiles += t
        work += t * slabs
        pipe_work += t * slabs * pipe
        bytes_moved += BYTES * (g.m * g.k + g.k * g.n + g.m * g.n) if g.k else 2 * BYTES * g.m * g.n
        longest = max(longest, slabs * (pipe + SLAB_LATENCY_CYCLES) + BLOCK_FIXED_CYCLES)
    if tiles == 0:
        return {"seconds": 0.0, "blocks": 0}
    if work == 0:  # epilogue-only entries (the library computed A B): one pass over Y and C
        return {"seconds": bytes_moved / (HBM_BYTES_PER_S * STREAM_EFFICIENCY), "blocks": tiles, "hbm_bytes": bytes_moved}
    resident = blocks_per_sm(GEMM_THREADS, GEMM_SHARED_BYTES)
    mean_slabs, mean_pipe = work / tiles, pipe_work / work
    cycles = grid_cycles(tiles, mean_slabs, mean_pipe, SLAB_LATENCY_CYCLES, resident, BLOCK_FIXED_CYCLES)
    cycles = max(cycles, longest)
    l2_bytes = work * 2 * TILE * CHUNK * BYTES  # each block reads its two slabs from L2 per step
    seconds = max(cycles / CLOCK_HZ, l2_bytes / L2_BYTES_PER_S, bytes_moved / HBM_BYTES_PER_S)
    return {"seconds": seconds, "blocks": tiles, "sm_cycles": cycles, "l2_bytes": l2_bytes, "hbm_bytes": bytes_moved}


PRECISION_PEAKS = {"ieee": FP32_PEAK_FLOPS, "tf32": TF32_PEAK_FLOPS, "bf16": BF16_PEAK_FLOPS, "f64": FP64_PEAK_FLOPS}


def library_gemm_seconds(m: int, n: int, k: int, precision: str = "ieee") -> Dict[str, float]:
    """Device time of one cuBLAS GEMM (cuda/library_gemm.h): tiles of the largest edge in
    LIBRARY_TILES that gives at least one per SM (else the smallest), run in waves over the SMs, each
    SM at LIBRARY_EFFICIENCY of its share of the precision's peak; never below the HBM traffic."""
    if precision not in PRECISION_PEAKS:
        raise ValueError(f"precision must be one of {sorted(PRECISION_PEAKS)}, got {precision!r}")
    for edge in LIBRARY_TILES:
        tiles = -(-m // edge) * -(-n // edge)
        if tiles >= SMS:
            break
    waves = -(-tiles // SMS)
    per_sm = PRECISION_PEAKS[precision] * LIBRARY_EFFICIENCY / SMS
    compute = waves * 2 * edge * edge * k / per_sm
    hbm = BYTES * (m * k + k * n + m * n) / HBM_BYTES_PER_S
    return {"seconds": max(compute, hbm), "tile": edge, "waves": waves}


def _library(m: int, n: int, k: int, min_macs: Optional[int], precision: str) -> bool:
    """Whether ops send the product to cuBLAS: min_macs None is the default "auto" threshold."""
    return m * n * k >= (LIBRARY_MIN_MACS[precision] if min_macs is None else min_macs) and m * n * k > 0


# ---- Per-op estimates ----

@dataclass
class Estimate:
    op: str
    shape: str
    model_s: float  # the estimate: device time + fixed costs
    peak_flop_bound_s: float  # max(FLOPs / FP32 peak, bytes / HBM) + (launches + library calls) x launch cost
    flops: float  # useful flops (one triangle for factors, 9 n^3 per eigendecomposition)
    bytes: float  # unique bytes read and written
    launches: int  # our kernels
    library_calls: int  # cuSOLVER calls that run on the device (buffer-size queries are host-only)
    torch_ops: int  # torch ops and table uploads around them
    syncs: int  # host synchronisations
    device_s: float  # the kernels' and library calls' modelled device time
    limiter: str  # what dominates: the device time's bound, or the per-call overheads
    detail: Dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict:
        d = asdict(self)
        d["model_over_peak_flop_bound"] = self.model_s / self.peak_flop_bound_s if self.peak_flop_bound_s else None
        return d


def peak_flop_bound(flops: float, bytes_moved: float, launches: int, peak_flops: float = FP32_PEAK_FLOPS) -> float:
    """The benches' former estimate: max(FLOPs / 67 TFLOP/s, bytes / 3 TB/s) + launches x 4 us (with
    tensor cores, the FLOPs over their peak instead)."""
    return max(flops / peak_flops, bytes_moved / HBM_BYTES_PER_S) + launches * LAUNCH_SECONDS


def _finish(op, shape, device_s, limiter, flops, bytes_moved, launches, library_calls, torch_ops, syncs, detail,
            peak_flops: float = FP32_PEAK_FLOPS):
    # Device time is never below the datasheet limits (the peak of the fastest arithmetic used),
    # whatever the structure says.
    device_s = max(device_s, flops / peak_flops, bytes_moved / HBM_BYTES_PER_S)
    fixed = (launches + library_calls + torch_ops) * LAUNCH_SECONDS + syncs * SYNC_SECONDS
    detail = {**detail, "fixed_s": fixed, "torch_ops_s": torch_ops * LAUNCH_SECONDS, "device_limiter": limiter,
              "peak_flops": peak_flops}
    if fixed > device_s:
        limiter = f"per-call overheads ({launches + library_calls} launches and calls, {torch_ops} torch ops)"
    return Estimate(op, shape, device_s + fixed, peak_flop_bound(flops, bytes_moved, launches + library_calls, peak_flops),
                    flops, bytes_moved, launches, library_calls, torch_ops, syncs, device_s, limiter, detail)


def _check_layers(op: str, layers, arity: int):
    if not layers:
        raise ValueError(f"{op}: no layers given")
    for L in layers:
        if len(L) != arity or any(int(v) < 0 for v in L[:2]):
            raise ValueError(f"{op}: each layer must be {arity} values with non-negative sizes, got {L!r}")


def row_slices(n: int, tiles: int, sms: int = SMS) -> int:
    """Split-K's row slices of a layer of n rows in a launch of `tiles` tiles: factor_update.h
    row_slices (about two blocks per SM, no slice under SPLIT_MIN_ROWS rows), then no empty slice."""
    target = 2 * sms
    if tiles >= target:
        return 1
    splits = min(-(-target // tiles), max(1, n // SPLIT_MIN_ROWS))
    if splits == 1:
        return 1
    slice_rows = -(-n // splits)
    return -(-n // slice_rows)


def factor_update(layers: Sequence[Tuple[int, int, bool]], shape: str = "", conv: bool = False,
                  split_k: Optional[bool] = None, min_macs: Optional[int] = None, precision: str = "ieee") -> Estimate:
    """ops.factor_update_ (one call, one dtype group): layers (rows n, width d, append_ones). `conv`:
    rows are patches read from the image (conv_factor_update_), assumed uncoalesced gathers.
    `split_k`: the row slicing of factor_update.cu's split-K (a second, reducing launch); None: FACTOR_SPLIT_K.
    A dense layer with n dim^2 >= min_macs (None: LIBRARY_MIN_MACS) has X~^T X~ from cuBLAS (a SYRK
    in IEEE arithmetic, the whole square by GEMM with tensor cores), and its blocks loop over no rows."""
    _check_layers("factor_update", layers, 3)
    split_k = FACTOR_SPLIT_K if split_k is None else split_k
    tiles_total = sum((lambda T: T * (T + 1) // 2)(-(-(d + int(bool(a))) // TILE)) for _, d, a in layers)
    blocks, work, longest, flops, bytes_moved = 0, 0.0, 0.0, 0.0, 0.0
    reduce_blocks, reduce_longest, partial_bytes = 0, 0, 0.0
    library_s, library_calls, library_torch = 0.0, 0, 0
    pipe = slab_pipe_cycles(2 if conv else 0)["pipe"]
    for n, d, ones in layers:
        dim = d + int(bool(ones))
        T = -(-dim // TILE)
        t = T * (T + 1) // 2  # factor_update::upper_tile_count
        flops += n * dim * (dim + 1)  # one triangle, multiply and add
        bytes_moved += BYTES * (n * d + 2 * dim * dim)  # X, then F read and written
        if not conv and _library(dim, dim, n, min_macs, precision):
            # IEEE arithmetic: one SYRK, assumed half the GEMM's time; tensor cores: the whole square
            gemm_s = library_gemm_seconds(dim, dim, n, precision)["seconds"]
            library_s += gemm_s / 2 if precision in ("ieee", "f64") else gemm_s
            library_s += BYTES * dim * dim / (HBM_BYTES_PER_S * STREAM_EFFICIENCY)  # the kernel reads the product
            if ones:  # X~ = [X, 1] by a torch cat: X read, X~ written
                library_s += BYTES * 2 * n * dim / (HBM_BYTES_PER_S * STREAM_EFFICIENCY)
                library_torch += 2
            library_torch += 1  # the product's allocation
            library_calls += 1
            blocks += t
            continue
        splits = row_slices(n, tiles_total) if split_k else 1
        slabs = -(-(-(-n // splits)) // CHUNK)
        blocks += t * splits
        work += t * splits * slabs
        longest = max(longest, slabs)
        if splits > 1:
            reduce_blocks += t
            reduce_longest = max(reduce_longest, splits)
            partial_bytes += 2 * t * splits * TILE * TILE * BYTES  # written, then read back
    resident = blocks_per_sm(GEMM_THREADS, FACTOR_SHARED_BYTES)
    cycles = grid_cycles(blocks, work / blocks, pipe, SLAB_LATENCY_CYCLES, resident, BLOCK_FIXED_CYCLES, longest)
    critical = longest * (pipe + SLAB_LATENCY_CYCLES) + BLOCK_FIXED_CYCLES
    l2_bytes = work * 2 * TILE * CHUNK * BYTES
    device = max(cycles / CLOCK_HZ, l2_bytes / L2_BYTES_PER_S)
    limiter = ("one block's row loop (fewer blocks than SMs)" if blocks < SMS
               else "shared-memory pipe" if cycles / CLOCK_HZ >= l2_bytes / L2_BYTES_PER_S else "L2 bandwidth")
    launches, uploads, reduce_s = 1, UPLOADS_PER_CALL, 0.0
    if reduce_blocks:
        # factor_reduce_kernel: per thread 4 sums over the slices, the 4 loads of one slice in flight together
        reduce_cycles = grid_cycles(reduce_blocks, 1, 0.0, reduce_longest * GLOBAL_LATENCY_CYCLES + BLOCK_FIXED_CYCLES,
                                    blocks_per_sm(GEMM_THREADS, 0))
        reduce_s = max(reduce_cycles / CLOCK_HZ, partial_bytes / 2 / (HBM_BYTES_PER_S * STREAM_EFFICIENCY))
        device += reduce_s + partial_bytes / 2 / L2_BYTES_PER_S
        launches, uploads = 2, 2 * UPLOADS_PER_CALL  # the split layers' own table
    if library_calls:
        device += library_s
        limiter = "cuBLAS" if library_s > device / 2 else limiter
    return _finish("factor_update_", shape, device, limiter, flops, bytes_moved, launches, library_calls,
                   uploads + library_torch, 0,
                   {"blocks": blocks, "sms_busy": min(blocks, SMS), "critical_path_s": critical / CLOCK_HZ,
                    "slab_pipe_cycles": pipe, "inner_loop_peak_fraction": inner_loop_peak_fraction(),
                    "reduce_s": reduce_s, "library_s": library_s},
                   max(FP32_PEAK_FLOPS, PRECISION_PEAKS[precision]) if library_calls else FP32_PEAK_FLOPS)


def precondition(layers: Sequence[Tuple[int, int]], shape: str = "", q_row_major: bool = False,
                 loads_along_k: Optional[bool] = None, min_macs: Optional[int] = None,
                 precision: str = "ieee") -> Estimate:
    """ops.precondition, full-rank layers (out o, in k): the four grouped GEMM stages of precondition.cu.
    The eigenvectors QA, QG come column-major from eigh_batched (q_row_major=False); M, T, V are row-major.
    `loads_along_k`: see coalesced_a; None: GEMM_LOADS_ALONG_K. A product of m n k >= min_macs (None:
    LIBRARY_MIN_MACS) is a cuBLAS call in `precision`; only stage 2's (its epilogue, the division)
    then keeps an entry in the grouped launch, with no products (float32 gradients: stage 4 stores as is)."""
    _check_layers("precondition", layers, 2)
    q, lk = q_row_major, GEMM_LOADS_ALONG_K if loads_along_k is None else loads_along_k
    stages = [[], [], [], []]
    flops, bytes_moved, library_s, library_calls, library_torch = 0.0, 0.0, 0.0, 0, 0
    for o, k in layers:
        # entry(M, F, QA, F, T); entry(QG, T, T, F, V); entry(V, F, QA, T, T); entry(QG, F, T, F, out)
        ops_ = [(o, k, k, coalesced_a(True, False, lk), coalesced_b(q, False, lk)),
                (o, k, o, coalesced_a(q, True, lk), coalesced_b(True, False, lk)),
                (o, k, k, coalesced_a(True, False, lk), coalesced_b(q, True, lk)),
                (o, k, o, coalesced_a(q, False, lk), coalesced_b(True, False, lk))]
        for s, (m, n, depth, ca, cb) in enumerate(ops_):
            if _library(m, n, depth, min_macs, precision):
                library_s += library_gemm_seconds(m, n, depth, precision)["seconds"]
                library_calls += 1
                if s == 1:  # the division by the damped eigenvalue products, from the library's Y
                    stages[s].append(Gemm(m, n, 0))
                    library_torch += 1  # Y's allocation
            else:
                stages[s].append(Gemm(m, n, depth, 2 - int(ca) - int(cb)))
        flops += 2 * o * k * (2 * k + 2 * o)
        bytes_moved += BYTES * (2 * o * k + k * k + o * o + o + k)
    parts = [gemm_launch_seconds(s) for s in stages]
    launches = sum(1 for s in stages if s)
    uncoalesced = sum(g.uncoalesced for s in stages for g in s[:1])
    grouped_s = sum(p["seconds"] for p in parts)
    limiter = "cuBLAS" if library_s > grouped_s else "shared-memory pipe (grouped GEMM)"
    return _finish("precondition", shape, grouped_s + library_s, limiter,
                   flops, bytes_moved, launches, library_calls, UPLOADS_PER_CALL + library_torch, 0,
                   {"blocks_per_stage": parts[0]["blocks"], "stage_s": [p["seconds"] for p in parts],
                    "library_s": library_s, "uncoalesced_operands_of_8": uncoalesced,
                    "inner_loop_peak_fraction": inner_loop_peak_fraction()},
                   max(FP32_PEAK_FLOPS, PRECISION_PEAKS[precision]) if library_calls else FP32_PEAK_FLOPS)


def library_crossover(widths: Sequence[int] = (128, 256, 384, 448, 512, 640, 768, 1024, 2048),
                      depth: int = 12) -> List[dict]:
    """precondition of `depth` square layers (w x w+1) all in the grouped kernels, all in cuBLAS
    (IEEE and TF32), and on the default path of each precision: the basis of LIBRARY_MIN_MACS."""
    rows = []
    for w in widths:
        layers = [(w, w + 1)] * depth
        row = {"width": w, "macs_per_product": w * (w + 1) * (w + 1),
               "grouped_s": precondition(layers, min_macs=1 << 62).model_s}
        for precision in ("ieee", "tf32"):
            row[f"library_{precision}_s"] = precondition(layers, min_macs=0, precision=precision).model_s
            row[f"default_{precision}_s"] = precondition(layers, precision=precision).model_s
            row[f"default_{precision}_path"] = "library" if _library(w, w + 1, w + 1, None, precision) else "grouped"
        rows.append(row)
    return rows


def jacobi_block_cycles(n: int, sweeps: int, resident: int) -> Dict[str, float]:
    """One eigh_jacobi_kernel block on an n x n matrix, with `resident` such blocks sharing its SM."""
    m = n + (n & 1)
    per_thread = lambda items: -(-items // JACOBI_THREADS)  # noqa: E731
    warp_iters = lambda items: -(-items // WARP)  # noqa: E731
    reduce = 2 * BARRIER_CYCLES + 2 * 5 * SHARED_LATENCY_CYCLES  # two barriers, two 5-step shuffle trees
    check_latency = per_thread(n * n) * (SHARED_LATENCY_CYCLES + INDEX_CYCLES) + JACOBI_REDUCTIONS_PER_CHECK * reduce + BARRIER_CYCLES
    check_pipe = warp_iters(n * n)
    pairs = (m // 2) * n
    # rotations: one warp, dependent loads and math; rows: 2 loads of cs (broadcast), 2 of A, 2 stores;
    # columns: 2 of cs, 2 of A, 2 of V, 4 stores
    round_latency = (ROTATION_CYCLES + BARRIER_CYCLES
                     + per_thread(pairs) * (SHARED_LATENCY_CYCLES + INDEX_CYCLES) + BARRIER_CYCLES
                     + per_thread(pairs) * (SHARED_LATENCY_CYCLES + INDEX_CYCLES) + BARRIER_CYCLES)
    round_pipe = warp_iters(pairs) * 6 + warp_iters(pairs) * 10
    rounds = m - 1
    load = GLOBAL_LATENCY_CYCLES + per_thread(n * n) * 4
    store = GLOBAL_LATENCY_CYCLES + n * n // 2  # n threads write their column of n: a serial-ish rank loop
    sweep = rounds * max(resident * round_pipe, round_latency) + max(resident * check_pipe, check_latency)
    return {"cycles": load + sweeps * sweep + max(resident * check_pipe, check_latency) + store,
            "round_latency": round_latency, "round_pipe": round_pipe, "rounds": rounds}


def eigh_batched(sizes: Sequence[int], shape: str = "", sweeps: int = JACOBI_SWEEPS) -> Estimate:
    """ops.eigh_batched on fp32 matrices of these sizes: the Jacobi kernel for n <= 64, syevBatched per
    size group of >= 2 (n <= 512), syevd per other matrix (eigh_batched.cu)."""
    if not sizes or any(n <= 0 for n in sizes):
        raise ValueError(f"eigh_batched: sizes must be positive, got {list(sizes)!r}")
    if sweeps < 1:
        raise ValueError(f"sweeps must be >= 1, got {sweeps}")
    small = [n for n in sizes if n <= JACOBI_MAX]
    device, launches, calls, torch_ops, parts = 0.0, 0, 0, 0, {}
    if small:
        n = max(small)
        shared = (2 * n * (n | 1) + n + 1) * BYTES + 33 * BYTES
        resident = blocks_per_sm(JACOBI_THREADS, shared)
        per_sm = -(-len(small) // SMS)
        b = min(resident, per_sm)
        rounds_of_blocks = -(-per_sm // b)
        block = jacobi_block_cycles(n, sweeps, b)
        t = rounds_of_blocks * block["cycles"] / CLOCK_HZ
        parts["jacobi_s"] = t
        parts["jacobi_blocks"] = len(small)
        parts["jacobi_sweeps"] = sweeps
        device += t
        launches += 1
        torch_ops += UPLOADS_PER_CALL  # the job table
    groups: Dict[int, int] = {}
    for n in sizes:
        if n > JACOBI_MAX:
            groups[n] = groups.get(n, 0) + 1
    solver_s = 0.0
    for n, count in groups.items():
        column_chain = n * SOLVER_KERNELS_PER_COLUMN * SOLVER_KERNEL_SECONDS
        if count >= 2 and n <= BATCHED_MAX:
            # ASSUMPTION: one syevBatched call steps all its matrices through their columns together
            solver_s += column_chain + count * 9 * n ** 3 / SOLVER_FLOPS
            calls += 1
        else:
            solver_s += count * (column_chain + 9 * n ** 3 / SOLVER_FLOPS)
            calls += count
    torch_ops += calls * EIGH_TORCH_PER_SOLVER_CALL + EIGH_TORCH_PER_DTYPE + EIGH_TORCH_PER_CALL
    parts["solver_s"] = solver_s
    device += solver_s
    flops = sum(9 * n ** 3 for n in sizes)
    bytes_moved = sum(BYTES * (2 * n * n + n) for n in sizes)
    limiter = ("cuSOLVER (assumed rate)" if solver_s >= parts.get("jacobi_s", 0.0)
               else "Jacobi rounds (barrier-separated phases)")
    return _finish("eigh_batched", shape, device, limiter, flops, bytes_moved, launches, calls, torch_ops, 1, parts)


def damped_inverse(sizes: Sequence[int], shape: str = "") -> Estimate:
    """ops.damped_inverse on fp32 matrices: per matrix cusolverDnXpotrf + cusolverDnXpotrs (B = I), the
    torch ops around them batched per group of equal sizes."""
    if not sizes or any(n <= 0 for n in sizes):
        raise ValueError(f"damped_inverse: sizes must be positive, got {list(sizes)!r}")
    device, chains = 0.0, 0.0
    for n in sizes:
        panels = -(-n // POTRF_BLOCK)
        potrf = panels * POTRF_KERNELS_PER_PANEL * SOLVER_KERNEL_SECONDS + (n ** 3 / 3) / SOLVER_BLAS3_FLOPS
        potrs = 2 * panels * SOLVER_KERNEL_SECONDS + (2 * n ** 3) / SOLVER_BLAS3_FLOPS  # two triangular solves, n right sides
        elementwise = INVERSE_ELEMENTWISE_PASSES * BYTES * n * n / (HBM_BYTES_PER_S * STREAM_EFFICIENCY)
        device += potrf + potrs + elementwise
        chains += (POTRF_KERNELS_PER_PANEL + 2) * panels * SOLVER_KERNEL_SECONDS
    flops = sum(n ** 3 / 3 + 2 * n ** 3 for n in sizes)
    bytes_moved = sum(BYTES * 2 * n * n for n in sizes)
    return _finish("damped_inverse", shape, device, "cuSOLVER panel chain (assumed)", flops, bytes_moved, 0,
                   2 * len(sizes), INVERSE_TORCH_PER_GROUP * len(set(sizes)) + INVERSE_TORCH_PER_CALL, 1,
                   {"solver_kernel_chain_s": chains})


def kfac_update(numels: Sequence[int], shape: str = "", momentum: bool = True, kl_clip: bool = True) -> Estimate:
    """ops.kfac_update_ on fp32 parameters: the KL dot product launch and the update launch."""
    if not numels or any(n < 0 for n in numels):
        raise ValueError(f"kfac_update: numels must be non-negative, got {list(numels)!r}")
    chunks = sum(-(-n // UPDATE_CHUNK) for n in numels)
    total = sum(numels)
    resident = blocks_per_sm(UPDATE_THREADS, 33 * 8)
    iters = UPDATE_CHUNK // UPDATE_THREADS
    # A thread's loop waits out one global load per iteration (its loads within one overlap).
    block = iters * GLOBAL_LATENCY_CYCLES + 2 * BARRIER_CYCLES
    waves = grid_cycles(chunks, 1, 0.0, block, resident) / CLOCK_HZ
    dot_bytes = BYTES * 2 * total if kl_clip else 0
    upd_bytes = BYTES * total * (5 if momentum else 3)
    dot = max(waves, dot_bytes / (HBM_BYTES_PER_S * STREAM_EFFICIENCY)) if kl_clip else 0.0
    upd = max(waves, upd_bytes / (HBM_BYTES_PER_S * STREAM_EFFICIENCY))
    limiter = "HBM bandwidth" if upd_bytes / (HBM_BYTES_PER_S * STREAM_EFFICIENCY) >= waves else "load latency (few blocks)"
    return _finish("kfac_update_", shape, dot + upd, limiter, 8.0 * total, dot_bytes + upd_bytes,
                   1 + int(kl_clip), 0, UPLOADS_PER_CALL + UPDATE_TORCH_PER_CALL, 0, {"blocks": chunks})


# ---- The shapes of the table ----

def mlp_layers(depth: int, width: int) -> List[Tuple[int, int]]:
    """(out, in + 1) of each layer of an MLP of equal Linear layers with biases."""
    return [(width, width + 1)] * depth


def step_estimates(depth: int, width: int, batch: int) -> Dict[str, Estimate]:
    """One K-FAC step of an MLP, factors and inverses every step (the worst case): the ops it calls."""
    layers = mlp_layers(depth, width)
    shape = f"MLP {depth} x {width}, batch {batch}"
    return {
        "factor_update_": factor_update([(batch, width, True)] * depth + [(batch, width, False)] * depth, shape),
        "eigh_batched": eigh_batched([width + 1] * depth + [width] * depth, shape),
        "precondition": precondition(layers, shape),
        "kfac_update_": kfac_update([o * k for o, k in layers], shape),
    }


def table(sweeps_small: int = JACOBI_SWEEPS) -> List[Estimate]:
    """Each op at a small and a large shape."""
    small, wide = "MLP 12 x 256, batch 128", "1 layer 4096 x 4096"
    return [
        factor_update([(128, 256, True)] * 12 + [(128, 256, False)] * 12, small),
        factor_update([(100_000, 300, True)], "conv factor: 1e5 rows x 300 (+1)", split_k=True, min_macs=1 << 62),
        factor_update([(100_000, 300, True)], "same, without split-K", split_k=False, min_macs=1 << 62),
        factor_update([(4096, 1024, True)] * 8, "8 dense: 4096 rows x 1024 (+1), kernel", min_macs=1 << 62),
        factor_update([(4096, 1024, True)] * 8, "same, cuBLAS (default)"),
        factor_update([(4096, 1024, True)] * 8, "same, cuBLAS TF32", precision="tf32"),
        precondition(mlp_layers(12, 256), small),
        precondition([(4096, 4097)], wide + ", grouped kernels", min_macs=1 << 62),
        precondition([(4096, 4097)], "same, strided operand reads (before)", loads_along_k=False, min_macs=1 << 62),
        precondition([(4096, 4097)], wide + ", cuBLAS (default)"),
        precondition([(4096, 4097)], wide + ", cuBLAS TF32", precision="tf32"),
        eigh_batched([257] * 12 + [256] * 12, small + " (syevBatched)"),
        eigh_batched([4097, 4096], wide + " (syevd)"),
        eigh_batched([17] * 12 + [16] * 12, "MLP 12 x 16 (Jacobi)", sweeps_small),
        eigh_batched([64] * 528, "528 matrices of 64 (Jacobi)"),
        damped_inverse([257] * 12 + [256] * 12, small),
        damped_inverse([4097, 4096], wide),
        kfac_update([256 * 257] * 12, small),
        kfac_update([4096 * 4097], wide),
    ]


def format_rows(rows: Sequence[Estimate]) -> List[str]:
    head = (f"{'op':<16}{'shape':<40}{'model us':>11}{'peak-FLOP us':>14}{'ratio':>7}{'launch':>8}{'lib':>5}"
            f"{'torch':>7}  limiter")
    out = [head, "-" * len(head)]
    for e in rows:
        out.append(f"{e.op:<16}{e.shape:<40}{e.model_s * 1e6:>11.1f}{e.peak_flop_bound_s * 1e6:>14.1f}"
                   f"{e.model_s / e.peak_flop_bound_s:>7.1f}{e.launches:>8}{e.library_calls:>5}{e.torch_ops:>7}  {e.limiter}")
    return out


# ---- Launch counts from emulation (small shapes only: the emulated kernels run on the CPU) ----

def emulated_counts(quick: bool = False) -> dict:
    """Launches per call of each op at small shapes, the Jacobi sweeps those matrices take, and
    launches per K-FAC step of small MLPs, all counted with natgrad_cuda.emulation.count()."""
    import torch
    import torch.nn.functional as F
    from torch import nn

    import natgrad_cuda as ng
    from natgrad_cuda import emulation, ops

    if not emulation.available():
        raise RuntimeError("the emulated CUDA backend is not compiled into this natgrad_cuda build")
    g = torch.Generator().manual_seed(0)

    def spd(n):
        x = torch.randn(4 * n, n, generator=g)
        return x.T @ x / (4 * n)

    out = {"per_call": {}, "per_step": []}

    def counted(name, model, fn):
        """Counts fn's launches; `model` is the model's estimate for a call of that path and layer count."""
        with emulation.count() as c:
            fn()
        device_calls = sum(v for k, v in c.by_name.items()
                           if k.startswith("cublas") or (k.startswith("cusolver") and not k.endswith("_bufferSize")))
        out["per_call"][name] = {"launches": c.launches, "library_calls": c.library_calls,
                                 "device_library_calls": device_calls, "barriers": c.barriers, "by_name": c.by_name,
                                 "model_launches": model.launches, "model_library_calls": model.library_calls}
        return c

    # Launches do not depend on the rows or (within a path) the widths: few rows, narrow layers.
    depth = 12
    counted("factor_update_ (24 factors)", factor_update([(3, 8, True)] * 24), lambda: ops.factor_update_(
        [torch.zeros(9, 9) for _ in range(depth)] + [torch.zeros(8, 8) for _ in range(depth)],
        [torch.randn(3, 8, generator=g) for _ in range(2 * depth)], 0.95, [1.0] * (2 * depth),
        [True] * depth + [False] * depth, impl="emulated"))
    # Split-K's second launch needs >= 2 x SPLIT_MIN_ROWS rows: one narrow layer keeps that cheap.
    counted("factor_update_ split-K (1 layer, 1024 x 8)", factor_update([(1024, 8, True)]), lambda: ops.factor_update_(
        [torch.zeros(9, 9)], [torch.randn(1024, 8, generator=g)], 0.95, [1.0], [True], impl="emulated"))
    mats = [spd(17) for _ in range(depth)] + [spd(16) for _ in range(depth)]
    c = counted("eigh_batched Jacobi (12 x 17 + 12 x 16)", eigh_batched([17] * 12 + [16] * 12), lambda: ops.eigh_batched(mats, impl="emulated"))
    # Barriers per block (eigh_jacobi_kernel): 1 (load) + (S + 1) checks x (3 reductions x 2 + 1) +
    # S sweeps x (m - 1) rounds x 3, so the sweeps S, if alike over the matrices, follow from the total.
    rounds = sum(3 * (n + (n & 1) - 1) + 7 for n in (M.shape[0] for M in mats))
    out["jacobi_sweeps_mean"] = (c.barriers - 8 * len(mats)) / rounds
    counted("eigh_batched solver (12 x 257 + 12 x 256)", eigh_batched([257] * 12 + [256] * 12), lambda: ops.eigh_batched(
        [spd(257) for _ in range(depth)] + [spd(256) for _ in range(depth)], impl="emulated"))
    QA = [torch.linalg.qr(torch.randn(9, 9, generator=g))[0] for _ in range(depth)]
    QG = [torch.linalg.qr(torch.randn(8, 8, generator=g))[0] for _ in range(depth)]
    counted("precondition (12 layers)", precondition([(8, 9)] * 12), lambda: ops.precondition(
        [torch.randn(8, 9, generator=g) for _ in range(depth)], QA, [torch.rand(9)] * depth, QG,
        [torch.rand(8)] * depth, 0.03, impl="emulated"))
    with ops.using_library_gemms(min_macs=0, precision="ieee"):  # every product in cuBLAS
        counted("precondition, cuBLAS (12 layers)", precondition([(8, 9)] * 12, min_macs=0), lambda: ops.precondition(
            [torch.randn(8, 9, generator=g) for _ in range(depth)], QA, [torch.rand(9)] * depth, QG,
            [torch.rand(8)] * depth, 0.03, impl="emulated"))
        counted("factor_update_, cuBLAS (24 factors)", factor_update([(3, 8, True)] * 24, min_macs=0),
                lambda: ops.factor_update_([torch.zeros(9, 9) for _ in range(2 * depth)],
                                           [torch.randn(3, 8, generator=g) for _ in range(2 * depth)], 0.95,
                                           [1.0] * (2 * depth), [True] * (2 * depth), impl="emulated"))
    counted("damped_inverse (24 matrices)", damped_inverse([9] * 12 + [8] * 12), lambda: ops.damped_inverse(
        [spd(9) for _ in range(depth)] + [spd(8) for _ in range(depth)], [0.1] * (2 * depth), impl="emulated"))
    params = [torch.randn(8, 9, generator=g) for _ in range(depth)]
    counted("kfac_update_ (12 layers)", kfac_update([72] * 12), lambda: ops.kfac_update_(
        params, [torch.randn(8, 9, generator=g) for _ in range(depth)], [torch.randn(8, 9, generator=g) for _ in range(depth)],
        [torch.zeros(8, 9) for _ in range(depth)], [True] * depth, 1e-6, 0.9, 0.0, 1e-3, impl="emulated"))

    def mlp(d, w):
        layers = []
        for _ in range(d):
            layers += [nn.Linear(w, w), nn.Tanh()]
        return nn.Sequential(*layers[:-1])

    for d, w in ((4, 16), (12, 16)) if quick else ((4, 16), (12, 16), (64, 16), (4, 80), (12, 80)):
        torch.manual_seed(0)
        model = mlp(d, w)
        opt = ng.KFAC(model, loss="mse", backend="emulated", inv_update_freq=1, factor_update_freq=1)
        x = torch.randn(8, w)
        opt.zero_grad()
        o = model(x)
        with emulation.count() as c:
            opt.backward(F.mse_loss(o, x), o)
            opt.step()
        out["per_step"].append({"depth": d, "width": w, "eigensolver": "Jacobi" if w + 1 <= JACOBI_MAX else "syevBatched",
                                "launches": c.launches, "library_calls": c.library_calls, "by_name": c.by_name})
    return out


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="count launches per step on two small MLPs only")
    p.add_argument("--no-emulation", action="store_true", help="skip the emulated launch counts (the model alone)")
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                                                 "gpu_cost_model.json"))
    args = p.parse_args(argv)
    counts = None if args.no_emulation else emulated_counts(args.quick)
    sweeps = JACOBI_SWEEPS if counts is None else max(1, round(counts["jacobi_sweeps_mean"]))
    rows = table(sweeps)
    step = step_estimates(12, 256, 128)
    print(NOTE)
    print(f"H100 SXM, {SMS} SMs at {CLOCK_HZ / 1e9:.2f} GHz; slab_multiply's inner loop reaches at most "
          f"{inner_loop_peak_fraction():.0%} of FP32 peak (8 shared loads per 16 FMAs); "
          f"{blocks_per_sm(GEMM_THREADS, GEMM_SHARED_BYTES)} GEMM blocks per SM (assumed {REGISTERS_PER_THREAD} registers)")
    for line in format_rows(rows):
        print(line)
    total = sum(e.model_s for e in step.values())
    bound = sum(e.peak_flop_bound_s for e in step.values())
    launches = {k: sum(getattr(e, k) for e in step.values()) for k in ("launches", "library_calls", "torch_ops")}
    print(f"\nK-FAC step, MLP 12 x 256, batch 128, factors and inverses every step: model {total * 1e3:.2f} ms "
          f"(peak-FLOP bound {bound * 1e3:.3f} ms); " + ", ".join(f"{k} {e.model_s * 1e3:.2f}" for k, e in step.items())
          + f"; {launches['launches']} launches, {launches['library_calls']} library calls, "
            f"{launches['torch_ops']} torch ops and uploads")
    crossover = library_crossover()
    print("\nprecondition of 12 layers w x (w+1): grouped kernels against cuBLAS (IEEE, TF32), us; "
          f"by default products of >= {LIBRARY_MIN_MACS['ieee']} (IEEE) or {LIBRARY_MIN_MACS['tf32']} (TF32) "
          "multiply-adds go to cuBLAS")
    print("| width | grouped | cuBLAS IEEE | cuBLAS TF32 | default path, IEEE | default path, TF32 |")
    print("|---|---|---|---|---|---|")
    for r in crossover:
        print(f"| {r['width']} | {r['grouped_s'] * 1e6:.0f} | {r['library_ieee_s'] * 1e6:.0f} | "
              f"{r['library_tf32_s'] * 1e6:.0f} | {r['default_ieee_path']} | {r['default_tf32_path']} |")
    if counts is not None:
        print(f"\nJacobi sweeps measured in emulation (12 x 17 + 12 x 16 SPD matrices): {counts['jacobi_sweeps_mean']:.1f}")
        print("launches per call (emulated):")
        for name, c in counts["per_call"].items():
            queries = c["library_calls"] - c["device_library_calls"]
            print(f"  {name}: {c['launches']} launches, {c['device_library_calls']} library calls"
                  + (f" (and {queries} host-only buffer-size queries)" if queries else "")
                  + f"; model {c['model_launches']} launches, {c['model_library_calls']} library calls")
        print("| MLP depth x width | eigensolver | launches per step | library calls per step |")
        print("|---|---|---|---|")
        for r in counts["per_step"]:
            print(f"| {r['depth']} x {r['width']} | {r['eigensolver']} | {r['launches']} | {r['library_calls']} |")
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    from common import environment, save_json

    save_json(args.out, {"note": NOTE, "constants": constants(), "environment": environment(),
                         "ops": [e.as_dict() for e in rows],
                         "step": {"config": {"depth": 12, "width": 256, "batch": 128}, "model_s": total,
                                  "peak_flop_bound_s": bound, **launches,
                                  "ops": {k: e.as_dict() for k, e in step.items()}},
                         "library_crossover": crossover, "emulated_counts": counts})


if __name__ == "__main__":
    main()
