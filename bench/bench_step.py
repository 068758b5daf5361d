"""The K-FAC optimizer step on kernels: native against reference against plain SGD on the CPU, per
phase and whole, and launches per step on the CUDA path (counted in emulation) with H100 estimates.

1. MLP of 16 layers of width 256, batch 128, factors and inverses every step (the worst case) and
   with the defaults (factors every 3 steps, inverses every 10): whole steps of KFAC(backend="reference"),
   KFAC(backend="native") and momentum SGD side by side (round robin, median of per-repetition
   ratios); each phase's op (factor_update_, eigh_batched, precondition, kfac_update_) on that
   step's shapes, reference against native.
2. MLPs of 4, 16 and 64 equal layers: kernel launches and library calls of one full step on the
   emulated CUDA path, and the H100 time of the width-256 step ESTIMATED by bench/gpu_cost_model.py
   (no GPU has run this code; scripts/gpu_check.sh times the ops on a GPU and replaces it).

    python bench/bench_step.py [--reps 7]
"""
from __future__ import annotations

import argparse
import os
import sys

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402
import gpu_cost_model  # noqa: E402

import natgrad_cuda as ng  # noqa: E402
from natgrad_cuda import emulation  # noqa: E402

DEPTH, WIDTH, BATCH = 16, 256, 128


def mlp(depth, width):
    layers = []
    for _ in range(depth):
        layers += [nn.Linear(width, width), nn.Tanh()]
    return nn.Sequential(*layers[:-1])


def whole_steps(reps, **kfac):
    x, y = torch.randn(BATCH, WIDTH), torch.randint(0, WIDTH, (BATCH,))
    states = {}
    for name in ("reference", "native", "sgd"):
        torch.manual_seed(0)
        m = mlp(DEPTH, WIDTH)
        opt = (torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9) if name == "sgd"
               else ng.KFAC(m, loss="cross_entropy", backend=name, **kfac))
        states[name] = (m, opt)

    def step(name):
        m, opt = states[name]

        def run():
            for _ in range(10):  # a block of 10: the defaults' inverse interval
                opt.zero_grad()
                out = m(x)
                loss = F.cross_entropy(out, y)
                if name == "sgd":
                    loss.backward()
                else:
                    opt.backward(loss, out)
                opt.step()

        return run

    t = common.interleaved({k: step(k) for k in states}, reps=reps, warmup=1)
    return {"ms_per_step": {k: 1000 * common.summary(v)["median"] / 10 for k, v in t.items()},
            "native_over_reference": common.ratio_summary(t["native"], t["reference"])["median"],
            "native_over_sgd": common.ratio_summary(t["native"], t["sgd"])["median"]}


def phases(reps):
    g = torch.Generator().manual_seed(0)
    d = WIDTH + 1
    A = [torch.zeros(d, d) for _ in range(DEPTH)]
    G = [torch.zeros(WIDTH, WIDTH) for _ in range(DEPTH)]
    xs = [torch.randn(BATCH, WIDTH, generator=g) for _ in range(DEPTH)]
    gs = [torch.randn(BATCH, WIDTH, generator=g) for _ in range(DEPTH)]
    for F_, X, ones in ((A, xs, True), (G, gs, False)):
        ng.ops.factor_update_(F_, X, 0.0, [1.0 / BATCH] * DEPTH, [ones] * DEPTH, impl="reference")
    eig = ng.ops.eigh_batched(A + G, impl="reference")
    QA, dA = [e[1] for e in eig[:DEPTH]], [e[0].clamp_min(0) for e in eig[:DEPTH]]
    QG, dG = [e[1] for e in eig[DEPTH:]], [e[0].clamp_min(0) for e in eig[DEPTH:]]
    Ms = [torch.randn(WIDTH, d, generator=g) for _ in range(DEPTH)]
    params = [torch.randn(WIDTH, d, generator=g) for _ in range(DEPTH)]
    bufs = [torch.zeros_like(p) for p in params]
    calls = {
        "factors (factor_update_ x 2)": lambda impl: [ng.ops.factor_update_(F_, X, 0.95, [1.0 / BATCH] * DEPTH,
                                                                           [o] * DEPTH, impl=impl)
                                                     for F_, X, o in ((A, xs, True), (G, gs, False))],
        "inverses (eigh_batched)": lambda impl: ng.ops.eigh_batched(A + G, impl=impl),
        "precondition": lambda impl: ng.ops.precondition(Ms, QA, dA, QG, dG, 0.03, impl=impl),
        "update (kfac_update_)": lambda impl: ng.ops.kfac_update_(params, Ms, Ms, bufs, [True] * DEPTH, 1e-6, 0.9,
                                                                  0.0, 1e-3, impl=impl),
    }
    loop_eigh = lambda: [torch.linalg.eigh(M) for M in A + G]  # noqa: E731
    out = {}
    for name, call in calls.items():
        fns = {"reference": lambda c=call: c("reference"), "native": lambda c=call: c("native")}
        if name.startswith("inverses"):
            fns["torch.linalg.eigh loop"] = loop_eigh
        t = common.interleaved(fns, reps=reps)
        out[name] = {k: 1000 * common.summary(v)["median"] for k, v in t.items()}
        out[name]["native_over_reference"] = common.ratio_summary(t["native"], t["reference"])["median"]
        if "torch.linalg.eigh loop" in t:
            out[name]["native_over_loop"] = common.ratio_summary(t["native"], t["torch.linalg.eigh loop"])["median"]
    return out


def launches():
    out = {}
    for depth in (4, 16, 64):
        torch.manual_seed(0)
        model = mlp(depth, 16)
        opt = ng.KFAC(model, loss="mse", backend="emulated", inv_update_freq=1)
        x = torch.randn(8, 16)
        opt.zero_grad()
        o = model(x)
        with emulation.count() as c:
            opt.backward(F.mse_loss(o, x), o)
            opt.step()
        out[depth] = {"launches": c.launches, "library_calls": c.library_calls, "by_name": c.by_name}
    return out


def h100_estimate():
    """The width-256 step's ops on an H100, factors and inverses every step: ESTIMATES of
    bench/gpu_cost_model.py (each kernel's structure), next to the peak-FLOP bound, in ms."""
    ops = gpu_cost_model.step_estimates(DEPTH, WIDTH, BATCH)
    return {"note": gpu_cost_model.NOTE,
            "model_ms": 1000 * sum(e.model_s for e in ops.values()),
            "peak_flop_bound_ms": 1000 * sum(e.peak_flop_bound_s for e in ops.values()),
            "ops": {k: e.as_dict() for k, e in ops.items()}}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "step.json"))
    args = ap.parse_args(argv)
    every = whole_steps(args.reps, inv_update_freq=1, factor_update_freq=1)
    default = whole_steps(args.reps)
    ph = phases(args.reps)
    ln = launches()
    est = h100_estimate()
    print(f"MLP {DEPTH} x {WIDTH}, batch {BATCH}, CPU threads {torch.get_num_threads()}")
    for label, r in (("factors and inverses every step", every), ("defaults (factors every 3 steps, inverses every 10)", default)):
        ms = r["ms_per_step"]
        print(f"  {label}: reference {ms['reference']:.1f} ms, native {ms['native']:.1f} ms, SGD {ms['sgd']:.1f} ms;"
              f" native/reference {r['native_over_reference']:.2f}, native/SGD {r['native_over_sgd']:.1f}")
    print("| phase | reference ms | native ms | native / reference |")
    print("|---|---|---|---|")
    for name, r in ph.items():
        extra = f" (torch.linalg.eigh loop {r['torch.linalg.eigh loop']:.1f} ms, native/loop " \
                f"{r['native_over_loop']:.2f})" if "native_over_loop" in r else ""
        print(f"| {name} | {r['reference']:.2f} | {r['native']:.2f} | {r['native_over_reference']:.2f}{extra} |")
    print("| MLP depth | launches per step | library calls per step |")
    print("|---|---|---|")
    for depth, r in ln.items():
        print(f"| {depth} | {r['launches']} | {r['library_calls']} |")
    print(f"H100 time of the width-256 step's ops (factors and inverses every step), ESTIMATED by "
          f"bench/gpu_cost_model.py: {est['model_ms']:.2f} ms (peak-FLOP bound {est['peak_flop_bound_ms']:.3f} ms): "
          + ", ".join(f"{k} {v['model_s'] * 1e3:.2f}" for k, v in est["ops"].items()))
    print(f"  {est['note']}")
    common.save_json(args.out, {"environment": common.environment(), "every_step": every, "defaults": default,
                                "phases": ph, "launches": ln, "h100_estimate": est,
                                "config": {"depth": DEPTH, "width": WIDTH, "batch": BATCH}})


if __name__ == "__main__":
    main()
