"""ops.factor_update_: native CPU against the reference (side by side, median of per-repetition
ratios), FLOPs and bytes, launches and library calls on the CUDA path (counted in emulation), and
the H100 time ESTIMATED by bench/gpu_cost_model.py from the kernel's structure, next to the
peak-FLOP bound max(FLOPs / 67 TFLOP/s, bytes / 3 TB/s) + launches x 4 us (no GPU has run this
code; scripts/gpu_check.sh times the op on a GPU and replaces both).

    python bench/bench_factor_update.py [--reps 15] [--out bench/results/factor_update.json]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import environment, interleaved, ratio_summary, save_json, summary  # noqa: E402
import gpu_cost_model  # noqa: E402

import natgrad_cuda as ng  # noqa: E402
from natgrad_cuda import ops  # noqa: E402

# (name, [(rows, width, append_ones)], input dtype): one call's layers.
CASES = [
    ("1 layer 4096 x 1024 fp32", [(4096, 1024, True)], torch.float32),
    ("1 layer 4096 x 1024 bf16", [(4096, 1024, True)], torch.bfloat16),
    ("conv patches 8192 x 577", [(8192, 576, True)], torch.float32),
    ("16 layers 128 x 256 (MLP)", [(128, 256, True)] * 16, torch.float32),
    ("64 layers 128 x 64", [(128, 64, True)] * 64, torch.float32),
    ("200 layers 32 x 16", [(32, 16, True)] * 200, torch.float32),
    ("mixed 12 layers 1..513 wide", [(256, d, bool(i % 2)) for i, d in enumerate([1, 3, 17, 31, 64, 65, 127, 128, 129, 255, 256, 513])], torch.float32),
]


def make(layers, dtype, rows_override=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(rows_override or n, d, generator=g).to(dtype) for n, d, _ in layers]
    factors = [torch.eye(d + a) for _, d, a in layers]
    ones = [a for _, _, a in layers]
    return factors, inputs, ones


def flops_bytes(layers, dtype):
    item = torch.tensor([], dtype=dtype).element_size()
    flops = sum(2 * n * (d + a) * (d + a + 1) / 2 for n, d, a in layers)  # one triangle, multiply + add
    bytes_moved = sum(n * d * item + 2 * 4 * (d + a) ** 2 for n, d, a in layers)  # read X, read and write F
    return flops, bytes_moved


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--reps", type=int, default=15)
    p.add_argument("--out", default=os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "factor_update.json"))
    args = p.parse_args(argv)

    rows = []
    header = (f"{'case':<30}{'ref ms':>9}{'native ms':>11}{'native/ref':>12}{'GFLOP':>8}{'MB':>8}{'launch':>8}{'lib':>5}"
              f"{'model us':>10}{'peak us':>9}")
    print(header)
    print("-" * len(header))
    for name, layers, dtype in CASES:
        factors, inputs, ones = make(layers, dtype)
        scales = [1.0 / max(1, n) for n, _, _ in layers]
        t = interleaved({
            "reference": lambda: ops.factor_update_(factors, inputs, 0.95, scales, ones, impl="reference"),
            "native": lambda: ops.factor_update_(factors, inputs, 0.95, scales, ones, impl="native"),
        }, reps=args.reps)
        # Counted on the same layers with few rows, which keeps the emulated run short; split-K's
        # second launch comes with many rows, so the full shape's count is the model's (which follows
        # factor_update.h row_slices), the emulated one a check of the rest.
        # A layer's X~^T X~ goes to cuBLAS when rows x dim^2 reaches min_macs: the threshold scaled by
        # 3 / rows keeps each layer on the path it takes at the full shape (a case's layers share rows).
        ef, ei, eo = make(layers, dtype, rows_override=3)
        full = layers[0][0]
        assert all(n == full for n, _, _ in layers)
        limit = ops.library_gemms()["min_macs"]
        if limit == "auto":  # float32 factors: tensor cores for bf16 / fp16 rows, IEEE (torch's default) else
            limit = ops.AUTO_MIN_MACS["tensor cores" if dtype in (torch.bfloat16, torch.float16) else "ieee"]
        scaled = -(-limit * 3 // full)
        with ng.emulation.count() as c, ops.using_library_gemms(min_macs=scaled):
            ops.factor_update_(ef, ei, 0.95, scales, eo, impl="emulated")
        flops, bytes_moved = flops_bytes(layers, dtype)
        est = gpu_cost_model.factor_update(layers, name)
        peak = gpu_cost_model.peak_flop_bound(flops, bytes_moved, est.launches + c.library_calls)
        r = ratio_summary(t["native"], t["reference"])
        row = {"case": name, "layers": len(layers), "dtype": str(dtype), "reference_s": summary(t["reference"]),
               "native_s": summary(t["native"]), "native_over_reference": r, "flops": flops, "bytes": bytes_moved,
               "launches": est.launches, "launches_emulated_few_rows": c.launches, "library_calls": c.library_calls,
               "h100_model_s": est.model_s,
               "h100_peak_flop_bound_s": peak, "model_limiter": est.limiter}
        rows.append(row)
        print(f"{name:<30}{row['reference_s']['median'] * 1e3:>9.3f}{row['native_s']['median'] * 1e3:>11.3f}"
              f"{r['median']:>8.2f} ±{(r['q3'] - r['q1']) / 2:<3.2f}{flops / 1e9:>8.2f}{bytes_moved / 1e6:>8.1f}"
              f"{est.launches:>8}{c.library_calls:>5}{est.model_s * 1e6:>10.1f}{peak * 1e6:>9.1f}")
    # Convolutions: the covariance of the patches of a 3x3 conv's input, reference on the materialised
    # unfold against the native kernel on ops.ConvPatches (CPU: unfolds 16 MB slices of the batch).
    torch.manual_seed(0)
    image = torch.randn(128, 64, 16, 16)
    patches = ops.ConvPatches(image, (3, 3), padding=(1, 1, 1, 1))
    n, d = patches.shape
    Fr, Fn = torch.zeros(d + 1, d + 1), torch.zeros(d + 1, d + 1)
    t = interleaved({
        "reference": lambda: ops.factor_update_([Fr], [patches.unfold()], 0.95, [1.0 / n], [True], impl="reference"),
        "native": lambda: ops.factor_update_([Fn], [patches], 0.95, [1.0 / n], [True], impl="native"),
    }, reps=args.reps)
    small = ops.ConvPatches(image[:1, :, :4, :4], (3, 3), padding=(1, 1, 1, 1))
    with ng.emulation.count() as c:
        ops.factor_update_([torch.zeros(d + 1, d + 1)], [small], 0.95, [1.0], [True], impl="emulated")
    flops, _ = flops_bytes([(n, d, 1)], torch.float32)
    bytes_moved = image.numel() * 4 + 2 * 4 * (d + 1) ** 2  # the image, read once per tile row in cache
    est = gpu_cost_model.factor_update([(n, d, True)], "conv 3x3 ConvPatches", conv=True)
    peak = gpu_cost_model.peak_flop_bound(flops, bytes_moved, est.launches)
    r = ratio_summary(t["native"], t["reference"])
    conv = {"case": "conv 3x3 patches of (128, 64, 16, 16), ConvPatches", "reference_s": summary(t["reference"]),
            "native_s": summary(t["native"]), "native_over_reference": r, "flops": flops,
            "unfold_bytes": n * d * 4, "native_slice_bytes_max": 16 * 2 ** 20, "launches": est.launches,
            "launches_emulated_few_rows": c.launches,
            "h100_model_s": est.model_s, "h100_peak_flop_bound_s": peak, "model_limiter": est.limiter}
    rows.append(conv)
    print(f"{'conv 3x3 (128,64,16,16) virt.':<30}{conv['reference_s']['median'] * 1e3:>9.3f}"
          f"{conv['native_s']['median'] * 1e3:>11.3f}{r['median']:>8.2f} ±{(r['q3'] - r['q1']) / 2:<3.2f}"
          f"{flops / 1e9:>8.2f}{bytes_moved / 1e6:>8.1f}{est.launches:>8}{0:>5}{est.model_s * 1e6:>10.1f}{peak * 1e6:>9.1f}")
    print(f"  unfold {n * d * 4 / 1e6:.0f} MB materialised by the reference; the native CPU kernel unfolds at most "
          "16 MB at a time, the CUDA kernel none")
    print("\nnative/ref: median of per-repetition time ratios (± half the interquartile range); "
          "launches: the model's at the full shape (split-K adds one), checked in emulation at few rows; model us: " + gpu_cost_model.NOTE + " peak us: the peak-FLOP bound "
          "max(FLOPs / 67 TFLOP/s, bytes / 3 TB/s) + launches x 4 us")
    save_json(args.out, {"op": "factor_update_", "environment": environment(), "reps": args.reps,
                         "h100_note": gpu_cost_model.NOTE, "cases": rows})


if __name__ == "__main__":
    main()
