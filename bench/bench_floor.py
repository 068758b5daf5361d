"""How cheap a K-FAC step could be on this machine, and so how few steps it must take to beat tuned
SGD and Adam in wall time: the lower bound behind the training benchmarks' early targets.

A K-FAC step with exact damping in the eigenbasis, (G (x) A + lambda I)^-1, cannot cost less than
  forward + backward  (the gradient itself; what an SGD step costs without its update)
+ preconditioning     (every step rotates each layer's gradient into the two eigenbases and back:
                       4 out in (out + in) FLOPs per layer, at this machine's measured SGEMM peak)
+ (curvature backward + factor products) / factor_update_freq
                      (the backward from sampled targets to the layer outputs, timed alone; the
                       factor Gram products rows d (d + 1) FLOPs each, one triangle, at the SGEMM peak)
+ eigendecompositions / inv_update_freq
                      (every factor's, timed alone: the faster of torch.linalg.eigh, MKL's syevd,
                       the fastest float32 eigensolver measured on this machine, one after another
                       and the native ops.eigh_batched, which runs them in parallel).
The forward + backward, the optimizers' steps and K-FAC's real step are timed side by side (blocks of
30 steps round-robin: 10 factor-update and 3 inverse steps of K-FAC at its default intervals;
medians), the other parts alone at their best (the fastest of their repetitions; the SGEMM peak the
best seen in the run), so that noise can only lower the bound. The steps each optimizer needs come from the saved results of
bench_training.py (targets and fine targets) and bench_heldout.py (early targets and targets, medians
over seeds). "K-FAC may take" is the best baseline's seconds to the target divided by the bound: a
K-FAC that needs more steps than that loses in wall time however well it is implemented.
Saves bench/results/floor.json.

    python bench/bench_floor.py [--problems cnn,autoencoder,wine,...] [--reps 7]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import warnings
from typing import Dict

import torch
from torch import nn

import natgrad_cuda as ng

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
import bench_heldout as H  # noqa: E402
import common  # noqa: E402
import problems as P  # noqa: E402
from natgrad_cuda.optimizer import DEFAULTS  # noqa: E402

BLOCK = 30
LAYERS = (nn.Linear, nn.Conv1d, nn.Conv2d)
RESULTS = os.path.join(HERE, "results")


def _best_time(fn, reps: int = 25) -> float:
    """Seconds of the fastest of ``reps`` calls: a part of a lower bound is timed at its best."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def sgemm_peak() -> float:
    """FLOP/s of the fastest 1024^3 float32 matrix product on all threads (the BLAS ceiling)."""
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    return 2 * 1024 ** 3 / _best_time(lambda: torch.mm(a, b), 15)


def _targets(name: str) -> dict:
    """{target label: {optimizer: steps}} and the K-FAC learning rate, from the saved results."""
    if name in P.PROBLEMS:
        with open(os.path.join(RESULTS, "training.json")) as fh:
            rows = json.load(fh)["problems"][name]["summary"]
        pr = P.PROBLEMS[name]
        labels = {f"target {pr.target_loss:g}": "steps_to_target", f"fine {pr.fine_target:g}": "steps_to_fine_target"}
    else:
        with open(os.path.join(RESULTS, "heldout.json")) as fh:
            rows = json.load(fh)["problems"][name]["summary"]
        labels = {"early target": "steps_to_coarse_target", "target": "steps_to_target"}
    by = {r["optimizer"]: r for r in rows}
    out = {label: {k: by[k][key] for k in ("sgd", "adam", "kfac")} for label, key in labels.items()}
    lrs = {k: by[k]["lr"] for k in ("sgd", "adam", "kfac")}
    return {"steps": out, "lr": lrs}


def _problem(name: str):
    if name in P.PROBLEMS:
        return P.PROBLEMS[name], P.load_digits()
    return H.PROBLEMS[name], H.load(H.DATASET[name])


def measure(name: str, reps: int, peak: float) -> dict:
    """Times and bound for one problem; ``peak`` is the best SGEMM rate seen so far in this run."""
    problem, data = _problem(name)
    saved = _targets(name)
    lrs = saved["lr"]
    gen = torch.Generator().manual_seed(0)
    n = len(data.y_train)
    batches = [torch.randint(0, n, (min(problem.batch_size, n),), generator=gen) for _ in range(BLOCK)]

    states = {}
    for kind in ("sgd", "adam", "kfac"):
        torch.manual_seed(0)
        model = problem.make_model()
        states[kind] = (model, P.make_optimizer(kind, model, lrs[kind], problem))
    torch.manual_seed(0)
    fb_model = problem.make_model()

    def block(kind):
        def run():
            if kind == "fb":
                for idx in batches:
                    x, y = data.x_train[idx], data.y_train[idx]
                    fb_model.zero_grad()
                    problem.loss_fn(fb_model(x), x, y).backward()
                return
            model, opt = states[kind]
            for idx in batches:
                P.train_step(problem, kind, model, opt, data.x_train[idx], data.y_train[idx])

        return run

    times = common.interleaved({k: block(k) for k in ("fb", "sgd", "adam", "kfac")}, reps=reps, warmup=1)
    ms = {k: 1000 * common.summary(v)["median"] / BLOCK for k, v in times.items()}

    # The parts of the bound, on the K-FAC model as trained above (its factors are real ones).
    model, opt = states["kfac"]
    engine = opt._engine
    layers = [m for m in model.modules() if isinstance(m, LAYERS)]
    outputs = []
    handles = [m.register_forward_hook(lambda m, i, o: outputs.append(o)) for m in layers]
    x = data.x_train[batches[0]]
    with engine.suspended():  # a probe forward: K-FAC records nothing
        out = model(x)
    for h in handles:
        h.remove()
    probe = torch.randn_like(out)
    # the curvature pass: a backward from (sampled) output gradients to every layer's output only
    curv_s = _best_time(lambda: torch.autograd.grad(out, outputs, grad_outputs=probe, retain_graph=True))

    prec_flops = factor_flops = 0.0
    for m, o in zip(layers, outputs):
        d_out = m.weight.shape[0]
        d_in = m.weight[0].numel() + (m.bias is not None)
        prec_flops += 4.0 * d_out * d_in * (d_out + d_in)
        n_rows = o.shape[0] * math.prod(o.shape[2:])  # one row per sample and output position
        factor_flops += n_rows * (d_in * (d_in + 1) + d_out * (d_out + 1))
    prec_s, factor_s = prec_flops / peak, factor_flops / peak

    mats = [st[k] for st in engine.state.values() if "A" in st for k in ("A", "G")]
    eigh_s = _best_time(lambda: [torch.linalg.eigh(M) for M in mats], 9)
    if "cpu" in ng.build_info()["backends"]:  # the native batched op runs factors in parallel
        eigh_s = min(eigh_s, _best_time(lambda: ng.ops.eigh_batched(mats, impl="native"), 9))

    f, i = DEFAULTS["factor_update_freq"], DEFAULTS["inv_update_freq"]
    bound_ms = ms["fb"] + 1000 * (prec_s + (curv_s + factor_s) / f + eigh_s / i)

    rows = []
    for label, steps in saved["steps"].items():
        base = {k: steps[k] * ms[k] / 1000 for k in ("sgd", "adam") if _finite(steps[k])}
        if not base:
            continue
        best = min(base, key=base.get)
        allowed = base[best] * 1000 / bound_ms
        rows.append({"target": label, "best_baseline": best, "baseline_steps": steps[best],
                     "baseline_seconds": base[best], "kfac_steps": steps["kfac"],
                     "kfac_seconds": steps["kfac"] * ms["kfac"] / 1000 if _finite(steps["kfac"]) else math.inf,
                     "kfac_may_take_at_bound": allowed, "kfac_may_take_as_implemented": base[best] * 1000 / ms["kfac"],
                     "within_bound": _finite(steps["kfac"]) and steps["kfac"] <= allowed})
    return {"ms_per_step": ms, "bound_ms_per_step": bound_ms,
            "parts_ms": {"forward_backward": ms["fb"], "precondition_at_peak": 1000 * prec_s,
                         "curvature_backward": 1000 * curv_s, "factor_products_at_peak": 1000 * factor_s,
                         "eigendecompositions": 1000 * eigh_s},
            "intervals": {"factor_update_freq": f, "inv_update_freq": i}, "lr": lrs, "targets": rows}


def _finite(v) -> bool:
    return v is not None and math.isfinite(v)


def format_table(results: Dict[str, dict]) -> str:
    lines = ["| problem | target | best baseline: steps, s | K-FAC steps, s (as implemented) | K-FAC step: measured, "
             "bound ms | K-FAC may take (at the bound) |", "|" + "---|" * 6]
    for name, r in results.items():
        for t in r["targets"]:
            ks = "never" if not _finite(t["kfac_steps"]) else f"{t['kfac_steps']:g}, {t['kfac_seconds']:.3f}"
            lines.append(f"| {name} | {t['target']} | {t['best_baseline']} {t['baseline_steps']:g}, "
                         f"{t['baseline_seconds']:.3f} | {ks} | {r['ms_per_step']['kfac']:.2f}, "
                         f"{r['bound_ms_per_step']:.2f} | {t['kfac_may_take_at_bound']:.0f} "
                         f"({'within' if t['within_bound'] else 'over'}) |")
    return "\n".join(lines)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", default="cnn,autoencoder," + ",".join(H.PROBLEMS))
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=RESULTS)
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*K-FAC does not cover.*")
    peak = 0.0
    results = {}
    for name in args.problems.split(","):
        t0 = time.perf_counter()
        peak = max(peak, sgemm_peak())  # the best rate of the run: the machine's, not a noisy moment's
        results[name] = r = measure(name, args.reps, peak)
        parts = ", ".join(f"{k} {v:.3f}" for k, v in r["parts_ms"].items())
        print(f"{name} ({time.perf_counter() - t0:.0f} s): ms per step " +
              ", ".join(f"{k} {v:.2f}" for k, v in r["ms_per_step"].items()) +
              f"; bound {r['bound_ms_per_step']:.2f} ({parts})")
    print(f"SGEMM peak {peak / 1e9:.0f} GFLOP/s on {torch.get_num_threads()} threads")
    print(format_table(results))
    payload = {"environment": common.environment(), "sgemm_flops": peak, "block_steps": BLOCK, "reps": args.reps,
               "problems": results}
    common.save_json(os.path.join(args.out, "floor.json"), payload)
    return payload


if __name__ == "__main__":
    main()
