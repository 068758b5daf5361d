"""The whole K-FAC step side by side with ASDL's (PyPI ``asdfghjkl``), on the three models of the
inverse-phase issue: every step, amortised, and with natgrad_cuda's defaults against SGD.

    .venv/bin/pip install "natgrad_cuda[bench]"    # or: pip install asdfghjkl==0.1a5
    .venv/bin/python bench/bench_asdl.py [--reps 3] [--models autoencoder,mlp12,cnn4096] [--inverse-phase-only]

ASDL is an optional benchmark extra, never a dependency of the package: without it this prints a
message and measures natgrad_cuda against SGD only. Models (float32, batch 128, damping 1e-3, lr 1e-4 (a step that stays finite on a fixed batch), on
scikit-learn's digits, nothing downloaded): the MLP autoencoder 64-256-128-32-128-256-64 (MSE), an
MLP of 12 layers of width 256 (64 inputs, 10 classes) and a CNN whose last layer is
Linear(4096, 10) (two 3x3 convolutions to 64 channels at 8x8). Configurations:

- every step: factors and inverses every step;
- amortised: factors every 10 steps, inverses every 100;
- defaults: natgrad_cuda's own (factors every 3, inverses every 10), against SGD.

Each optimizer runs blocks of steps (10 for "every step", 100 for "amortised" and "defaults", so that
a block holds its inverse updates; for the CNN 2 and 10 for "every step" and "defaults") in turn, round robin, ``--reps`` times after a warm-up block; the
figure is the median over repetitions of the block time divided by the steps, and ratios are
medians of per-repetition ratios. ASDL's KFAC runs through KfacGradientMaker (its MC Fisher, its
exact damping: the closest to natgrad_cuda's inverse="eigen") followed by torch.optim.SGD; natgrad_cuda
runs KFAC (MC Fisher, kl_clip off, momentum 0) with inverse "eigen" and "factored". Then the inverse
phase alone (see ``inverse_phase``). Prints a table
and saves bench/results/asdl.json.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

import natgrad_cuda as ng  # noqa: E402

BATCH, DAMPING = 128, 1e-3
CONFIGS = {"every step": (1, 1, 10), "amortised": (10, 100, 100), "defaults": (3, 10, 100)}
# The CNN's 4097-wide A takes seconds to decompose: shorter blocks, each still holding its inverse update(s).
BLOCKS = {("cnn4096", "every step"): 2, ("cnn4096", "defaults"): 10}


def make(name: str) -> nn.Module:
    if name == "autoencoder":
        sizes = [64, 256, 128, 32, 128, 256, 64]
    elif name == "mlp12":
        sizes = [64] + [256] * 11 + [10]
    else:
        return nn.Sequential(nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
                             nn.Flatten(), nn.Linear(64 * 8 * 8, 10))
    layers = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers += [nn.Linear(a, b)] + ([nn.Tanh()] if i < len(sizes) - 2 else [])
    return nn.Sequential(*layers)


def data(name: str):
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data[:BATCH] / 16.0, dtype=torch.float32)
    y = torch.tensor(d.target[:BATCH], dtype=torch.long)
    if name == "cnn4096":
        x = x.reshape(-1, 1, 8, 8)
    return x, (x if name == "autoencoder" else y)


def loss_of(name: str):
    return F.mse_loss if name == "autoencoder" else F.cross_entropy


def runner(kind: str, name: str, factors: int, inverses: int):
    """A function running ``n`` steps of optimizer ``kind`` on model ``name``."""
    torch.manual_seed(0)
    model = make(name)
    x, y = data(name)
    loss_fn = loss_of(name)
    if kind == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=1e-4)

        def run(n):
            for _ in range(n):
                opt.zero_grad()
                loss_fn(model(x), y).backward()
                opt.step()
        return run
    if kind.startswith("natgrad"):
        opt = ng.KFAC(model, lr=1e-4, momentum=0.0, damping=DAMPING, kl_clip=None, factor_update_freq=factors,
                      inv_update_freq=inverses, loss="mse" if name == "autoencoder" else "cross_entropy",
                      inverse=kind.split("-")[1], seed=0)

        def run(n):
            for _ in range(n):
                opt.zero_grad()
                out = model(x)
                opt.backward(loss_fn(out, y), out)
                opt.step()
        return run
    from asdl import KfacGradientMaker, PreconditioningConfig

    # ASDL on the CPU: its MSE MC Fisher with the variance 0.5 of natgrad_cuda's convention
    config = PreconditioningConfig(data_size=BATCH, damping=DAMPING, curvature_upd_interval=factors,
                                   preconditioner_upd_interval=inverses)
    gm = KfacGradientMaker(model, config, loss_type="mse" if name == "autoencoder" else "cross_entropy",
                           var=0.5)
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)

    def run(n):
        for _ in range(n):
            opt.zero_grad()
            dummy = gm.setup_model_call(model, x)
            gm.setup_loss_call(loss_fn, dummy, y)
            gm.forward_and_backward()
            opt.step()
    return run


def measure(name: str, config: str, kinds, reps: int) -> dict:
    factors, inverses, block = CONFIGS[config]
    block = BLOCKS.get((name, config), block)
    runs = {k: runner(k, name, factors, inverses) for k in kinds}
    for run in runs.values():  # warm-up: the first factors and inverses
        run(block)
    times = {k: [] for k in kinds}
    for _ in range(reps):
        for k, run in runs.items():
            t0 = time.perf_counter()
            run(block)
            times[k].append((time.perf_counter() - t0) / block)
    return times


def inverse_phase(name: str, reps: int) -> dict:
    """The inverse update alone on the factors of a few every-step K-FAC steps: natgrad_cuda's (the
    per-factor methods, warm-started as in training, for both ``inverse``) against a loop of
    torch.linalg.eigh over the factors and against ops.eigh_batched, the eigendecomposition part of
    bench_floor's bound (the faster of the two). Medians of ``reps`` round-robin repetitions, ms."""
    from natgrad_cuda import ops
    from natgrad_cuda._directions import decompose  # the optimizer's inverse update, called alone

    torch.manual_seed(0)
    model = make(name)
    x, y = data(name)
    states = {}
    for inverse in ("eigen", "factored"):
        opt = ng.KFAC(model, lr=1e-4, momentum=0.0, damping=DAMPING, kl_clip=None, factor_update_freq=1,
                      inv_update_freq=1, loss="mse" if name == "autoencoder" else "cross_entropy", inverse=inverse,
                      seed=0)
        for _ in range(3):
            opt.zero_grad()
            out = model(x)
            opt.backward(loss_of(name)(out, y), out)
            opt.step()
        states[inverse] = opt.state_dict()["kfac"]["layers"]
    factors = [st[k] for st in states["eigen"].values() for k in ("A", "G") if st[k].dim() == 2]

    def ours(inverse):
        return lambda: decompose({n: dict(st) for n, st in states[inverse].items()}, None, damping=DAMPING,
                                 inverse=inverse)

    fns = {"torch.linalg.eigh loop": lambda: [torch.linalg.eigh(F) for F in factors],
           "ops.eigh_batched": lambda: ops.eigh_batched(factors),
           "natgrad eigen": ours("eigen"), "natgrad factored": ours("factored")}
    times = common.interleaved(fns, reps, warmup=1)
    ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    bound = min(ms["torch.linalg.eigh loop"], ms["ops.eigh_batched"])
    return {"model": name, "ms": ms, "ratio_to_floor_eigendecompositions": {k: v / bound for k, v in ms.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--models", default="autoencoder,mlp12,cnn4096")
    ap.add_argument("--inverse-phase-only", action="store_true",
                    help="measure the inverse phase alone and update that part of the saved results")
    args = ap.parse_args()
    import importlib.util

    have_asdl = importlib.util.find_spec("asdl") is not None
    if not have_asdl:
        print("ASDL (pip install asdfghjkl==0.1a5) is not installed: natgrad_cuda against SGD only")
    torch.set_num_threads(os.cpu_count() or 1)
    rows = []
    for name in args.models.split(",") if not args.inverse_phase_only else []:
        for config in CONFIGS:
            kinds = ["natgrad-eigen", "natgrad-factored"]
            kinds += ["sgd"] if config == "defaults" else (["asdl"] if have_asdl else [])
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                times = measure(name, config, kinds, args.reps)
            base = "sgd" if config == "defaults" else ("asdl" if have_asdl else None)
            row = {"model": name, "config": config,
                   "ms_per_step": {k: 1e3 * statistics.median(v) for k, v in times.items()},
                   "spread_ms": {k: [1e3 * min(v), 1e3 * max(v)] for k, v in times.items()}}
            if base is not None:
                row["ratio_to_" + base] = {k: statistics.median([a / b for a, b in zip(v, times[base])])
                                           for k, v in times.items() if k != base}
            rows.append(row)
            ms = ", ".join(f"{k} {v:.1f}" for k, v in row["ms_per_step"].items())
            ratios = ", ".join(f"{k} {v:.2f}x" for k, v in row.get("ratio_to_" + str(base), {}).items())
            print(f"{name:12s} {config:11s} ms/step: {ms}; ratio to {base}: {ratios}", flush=True)
    phase = []
    for name in args.models.split(","):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            phase.append(inverse_phase(name, args.reps))
        print(f"{name:12s} inverse phase alone, ms: " + ", ".join(f"{k} {v:.1f}" for k, v in phase[-1]["ms"].items()),
              flush=True)
    path = os.path.join(HERE, "results", "asdl.json")
    saved = {}
    if args.inverse_phase_only and os.path.exists(path):
        with open(path) as f:
            saved = json.load(f)
    saved.update({"environment": common.environment(), "reps": args.reps, "batch": BATCH, "damping": DAMPING,
                  "asdl": have_asdl, "inverse_phase": phase})
    if not args.inverse_phase_only:
        saved["rows"] = rows
    with open(path, "w") as f:
        json.dump(saved, f, indent=1)
    print("saved", path)


if __name__ == "__main__":
    main()
