"""Iterate (Polyak) averaging of a noisy K-FAC run with torch.optim.swa_utils.AveragedModel.

Martens ("New insights and perspectives on the natural gradient method", JMLR 2020) recommends
averaging the iterates of stochastic second-order methods: at a fixed learning rate the iterates
keep bouncing around the minimum, at a distance set by the gradient noise, and their average sits
closer to it. This benchmark trains an MLP (64-64-10, ReLU, cross-entropy) on scikit-learn's bundled
digits (nothing is downloaded; the fixed 80/20 split of examples/problems.py) with KFAC on
minibatches of 16 at a fixed learning rate, and compares, on the final full-training-set loss and
the held-out accuracy:

- the last iterate;
- exponential moving averages, ``AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(decay))``
  with decay 0.9 and 0.98, updated after every step;
- the uniform average of the last half of the iterates, ``AveragedModel(model)`` whose
  ``update_parameters`` is called from step T/2 on (AveragedModel has no start step of its own).

Three settings:

- "noisy": lr 0.3, damping 1e-2 and a trust region about 30x looser than the default's (kl_clip
  1e-2): the late steps stay long, and the last iterate's loss stalls and jumps while the averages
  keep falling (the setting that shows what averaging is for), 600 steps;
- "defaults": the package's defaults (lr 0.1, damping 1e-3, kl_clip 3e-4, whose trust region keeps
  the steps short, so less noise), 600 steps;
- "defaults-short": the same runs stopped after 150 steps, while the loss is still falling fast:
  there an average drags older, worse iterates along and can end above the last iterate.

Over 3 seeds (initialisation, minibatch order and KFAC's sampled targets): median [min, max], and in
how many seeds each average ends below the last iterate. The "late noise" column is the last
iterate's relative spread (std / mean) of the training loss over the last 20% of the run. Prints a
table; saves bench/results/averaging.json and bench/results/averaging.png (training loss against
steps, the median over the seeds with the min-max band).

    .venv/bin/python bench/bench_averaging.py [--seeds 3] [--out bench/results]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
import common  # noqa: E402
import problems as P  # noqa: E402

import natgrad_cuda as ng  # noqa: E402

BATCH = 16
HIDDEN = 64
EVAL_EVERY = 10
DECAYS = (0.9, 0.98)
SETTINGS = {
    "noisy": dict(steps=600, kfac=dict(lr=0.3, damping=1e-2, kl_clip=1e-2)),
    "defaults": dict(steps=600, kfac=dict()),
    "defaults-short": dict(steps=150, kfac=dict()),
}
METHODS = ["last iterate"] + [f"EMA {d}" for d in DECAYS] + ["uniform, last half"]


def make_mlp(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(64, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, 10))


@torch.no_grad()
def evaluate(model: nn.Module, data: P.Data):
    """(full training-set loss, held-out accuracy)."""
    loss = float(F.cross_entropy(model(data.x_train), data.y_train))
    acc = float((model(data.x_test).argmax(1) == data.y_test).double().mean())
    return loss, acc


def run(setting: dict, seed: int, data: P.Data) -> dict:
    """One KFAC run with its averaged models; the training loss of each every EVAL_EVERY steps and
    the final loss and accuracy."""
    steps = setting["steps"]
    model = make_mlp(seed)
    opt = ng.KFAC(model, loss="cross_entropy", seed=seed, **setting["kfac"])
    averaged = {f"EMA {d}": AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(d)) for d in DECAYS}
    averaged["uniform, last half"] = AveragedModel(model)
    start = steps // 2
    gen = torch.Generator().manual_seed(1000 + seed)
    curves = {m: [] for m in METHODS}
    eval_steps = []
    for t in range(1, steps + 1):
        idx = torch.randint(0, len(data.y_train), (BATCH,), generator=gen)
        opt.zero_grad()
        out = model(data.x_train[idx])
        loss = F.cross_entropy(out, data.y_train[idx])
        opt.backward(loss, out)
        opt.step()
        for name, avg in averaged.items():
            if name != "uniform, last half" or t > start:
                avg.update_parameters(model)
        if t % EVAL_EVERY == 0:
            eval_steps.append(t)
            curves["last iterate"].append(evaluate(model, data)[0])
            for name, avg in averaged.items():
                curves[name].append(evaluate(avg, data)[0] if int(avg.n_averaged) > 0 else None)
    final = {"last iterate": evaluate(model, data)}
    final.update({name: evaluate(avg, data) for name, avg in averaged.items()})
    late = curves["last iterate"][-max(2, len(eval_steps) // 5):]
    return {"seed": seed, "steps": eval_steps, "curves": curves, "skipped_steps": opt.skipped_steps,
            "final_loss": {m: final[m][0] for m in METHODS}, "test_accuracy": {m: final[m][1] for m in METHODS},
            "late_noise": statistics.pstdev(late) / statistics.mean(late)}


def spread(values) -> dict:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def summarize(runs: list) -> dict:
    out = {}
    for m in METHODS:
        losses = [r["final_loss"][m] for r in runs]
        out[m] = {"final_loss": spread(losses), "test_accuracy": spread([r["test_accuracy"][m] for r in runs]),
                  "seeds_below_last_iterate": sum(r["final_loss"][m] < r["final_loss"]["last iterate"] for r in runs)}
    return out


def format_table(results: dict, n_seeds: int) -> str:
    head = (f"{'setting':<15} {'method':<19} {'final train loss: median [min, max]':<36} "
            f"{'test acc: median [min, max]':<28} {'below last':<11} late noise")
    lines = [head, "-" * len(head)]
    for name, res in results.items():
        noise = spread([r["late_noise"] for r in res["runs"]])["median"]
        for m in METHODS:
            s = res["summary"][m]
            fl, ta = s["final_loss"], s["test_accuracy"]
            loss = f"{fl['median']:.4f} [{fl['min']:.4f}, {fl['max']:.4f}]"
            acc = f"{ta['median']:.3f} [{ta['min']:.3f}, {ta['max']:.3f}]"
            below = "-" if m == "last iterate" else f"{s['seeds_below_last_iterate']}/{n_seeds}"
            lines.append(f"{name:<15} {m:<19} {loss:<36} {acc:<28} {below:<11} "
                         + (f"{noise:.2f}" if m == "last iterate" else "").rstrip())
    return "\n".join(line.rstrip() for line in lines)


def plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.2), squeeze=False)
    colors = {"last iterate": "0.55", f"EMA {DECAYS[0]}": "tab:blue", f"EMA {DECAYS[1]}": "tab:green",
              "uniform, last half": "tab:red"}
    for ax, (name, res) in zip(axes[0], results.items()):
        runs = res["runs"]
        steps = runs[0]["steps"]
        for m in METHODS:
            points = [(s, [r["curves"][m][i] for r in runs]) for i, s in enumerate(steps)
                      if runs[0]["curves"][m][i] is not None]
            xs = [s for s, _ in points]
            ax.plot(xs, [statistics.median(v) for _, v in points], color=colors[m], label=m,
                    lw=1.0 if m == "last iterate" else 1.6)
            ax.fill_between(xs, [min(v) for _, v in points], [max(v) for _, v in points], color=colors[m],
                            alpha=0.15, lw=0)
        cfg = res["config"]
        ax.set_title(f"{name}: lr {cfg['lr']:g}, damping {cfg['damping']:g}, kl_clip {cfg['kl_clip']:g}",
                     fontsize=10)
        ax.set_yscale("log")
        ax.set_xlabel("step (batch 16)")
        ax.set_ylabel("full training loss")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    fig.suptitle(f"KFAC on digits (MLP 64-{HIDDEN}-10): last iterate vs AveragedModel; median and min-max over "
                 f"{len(runs)} seeds", fontsize=11)
    common.save_figure(fig, path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    data = P.load_digits()
    defaults = {k: ng.optimizer.DEFAULTS[k] for k in ("lr", "damping", "kl_clip")}
    results = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name, setting in SETTINGS.items():
            runs = [run(setting, seed, data) for seed in range(args.seeds)]
            results[name] = {"config": {**defaults, **setting["kfac"], "steps": setting["steps"]},
                             "summary": summarize(runs), "runs": runs}
    messages = sorted({str(w.message) for w in caught})
    print(f"KFAC, MLP 64-{HIDDEN}-10 on digits ({len(data.y_train)} training, {len(data.y_test)} held-out), "
          f"batch {BATCH}, {args.seeds} seeds; averages: EMA decay {', '.join(map(str, DECAYS))} from step 1, "
          "uniform over the last half")
    print(format_table(results, args.seeds))
    print(f"warnings: {messages if messages else 'none'}; skipped steps: "
          f"{sum(r['skipped_steps'] for res in results.values() for r in res['runs'])}")
    payload = {"environment": common.environment(), "batch_size": BATCH, "hidden": HIDDEN, "decays": list(DECAYS),
               "eval_every": EVAL_EVERY, "seeds": args.seeds, "warnings": messages, "settings": results}
    os.makedirs(args.out, exist_ok=True)
    plot(results, os.path.join(args.out, "averaging.png"))
    common.save_json(os.path.join(args.out, "averaging.json"), payload)
    return payload


if __name__ == "__main__":
    main()
