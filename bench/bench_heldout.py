"""Held-out benchmark: K-FAC at its defaults, untuned, against tuned momentum SGD and Adam on small
problems that played no part in choosing those defaults and that no test uses.

The problems (scikit-learn's bundled datasets and its generators; nothing is downloaded), each with
its own model: wine (MLP, cross-entropy), breast cancer (MLP, binary cross-entropy), Friedman #1
regression (MLP, MSE), two moons (MLP, cross-entropy), digits as sequences of 8 rows (Conv1d,
cross-entropy) and a deeper tanh MLP on digits.

For every problem and seed, SGD (momentum 0.9) and Adam run every learning rate of their grids;
each keeps the one with the lowest median final training loss over the seeds. K-FAC runs once per
seed with ``KFAC(model, loss=...)`` and nothing else ("kfac"), and, tuned the same way as the
baselines, over the learning-rate grid of the digits benchmark ("kfac-tuned"; the default lr is in
it). The target is the lower of the two tuned baselines' median final losses (where the best
first-order method ends up after the budget); the coarse target lies halfway between the initial
loss and the target on a log scale (their geometric mean). Reported per optimizer: median over
seeds of the final loss and of the steps and optimizer seconds to each target (a seed that never
reaches it counts as infinite).
Saves bench/results/heldout.json.

    python bench/bench_heldout.py [--problems wine,...] [--seeds 3] [--steps 300]
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings
from typing import Dict, List

import torch
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
import common  # noqa: E402
import problems as P  # noqa: E402
from natgrad_cuda.optimizer import DEFAULTS  # noqa: E402

KFAC_LR = DEFAULTS["lr"]  # make_optimizer passes an lr; K-FAC gets its default

GRIDS = {"sgd": [0.01, 0.03, 0.1, 0.3, 1.0], "adam": [3e-4, 1e-3, 3e-3, 1e-2, 3e-2]}
KFAC_GRID = P.LR_GRIDS["cnn"]["kfac"]  # "kfac-tuned": K-FAC's learning rate tuned like theirs


def _split(x: torch.Tensor, y: torch.Tensor, seed: int = 0, test_fraction: float = 0.2) -> P.Data:
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(x)))
    test, train = perm[:n_test], perm[n_test:]
    return P.Data(x[train], y[train], x[test], y[test])


def _standardise(x) -> torch.Tensor:
    x = torch.as_tensor(x, dtype=torch.float32)
    return (x - x.mean(0)) / x.std(0).clamp_min(1e-6)


def _mlp(sizes: List[int], act=nn.ReLU) -> nn.Module:
    layers: List[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(act())
    return nn.Sequential(*layers)


def _conv1d_digits() -> nn.Module:
    return nn.Sequential(  # input (B, 8 rows as channels, 8 columns)
        nn.Conv1d(8, 32, 3, padding=1), nn.ReLU(),
        nn.Conv1d(32, 32, 3, padding=1, stride=2), nn.ReLU(),
        nn.Flatten(), nn.Linear(32 * 4, 10),
    )


def load(name: str) -> P.Data:
    import sklearn.datasets as D

    if name == "wine":
        d = D.load_wine()
        return _split(_standardise(d.data), torch.as_tensor(d.target))
    if name == "cancer":
        d = D.load_breast_cancer()
        return _split(_standardise(d.data), torch.as_tensor(d.target, dtype=torch.float32).unsqueeze(1))
    if name == "friedman":
        x, y = D.make_friedman1(n_samples=2000, noise=0.5, random_state=0)
        return _split(_standardise(x), _standardise(y).unsqueeze(1))
    if name == "moons":
        x, y = D.make_moons(n_samples=2000, noise=0.2, random_state=0)
        return _split(_standardise(x), torch.as_tensor(y))
    d = D.load_digits()
    x = torch.as_tensor(d.images, dtype=torch.float32) / 16.0  # (N, 8, 8): rows as channels for conv1d
    return _split(x, torch.as_tensor(d.target))


PROBLEMS: Dict[str, P.Problem] = {
    # target_loss / fine_target are set per run from the baselines (see the module docstring)
    "wine": P.Problem("wine", lambda: _mlp([13, 64, 64, 3], nn.Tanh), "cross_entropy", 0.0, 0.0, 300, 64),
    "cancer": P.Problem("cancer", lambda: _mlp([30, 64, 32, 1]), "bce", 0.0, 0.0, 300),
    "friedman": P.Problem("friedman", lambda: _mlp([10, 128, 128, 1], nn.Tanh), "mse", 0.0, 0.0, 300),
    "moons": P.Problem("moons", lambda: _mlp([2, 64, 64, 2], nn.Tanh), "cross_entropy", 0.0, 0.0, 300),
    "digits-conv1d": P.Problem("digits-conv1d", _conv1d_digits, "cross_entropy", 0.0, 0.0, 300),
    "digits-mlp": P.Problem("digits-mlp", lambda: _mlp([64, 128, 128, 128, 10], nn.Tanh), "cross_entropy",
                            0.0, 0.0, 300),
}
DATASET = {"wine": "wine", "cancer": "cancer", "friedman": "friedman", "moons": "moons",
           "digits-conv1d": "digits", "digits-mlp": "digits"}


def _median(values: List[float]) -> float:
    return statistics.median(values)  # infinities sort last: a majority of misses gives inf


def run_problem(name: str, seeds: int, steps: int) -> dict:
    problem, data = PROBLEMS[name], load(DATASET[name])
    problem.steps = steps
    runs: Dict[str, Dict[float, List[P.Run]]] = {}
    for kind, grid in GRIDS.items():
        runs[kind] = {lr: [P.train(problem, kind, lr, data, seed=s) for s in range(seeds)] for lr in grid}
    for lr in KFAC_GRID:
        runs.setdefault("kfac-tuned", {})[lr] = [P.train(problem, "kfac", lr, data, seed=s) for s in range(seeds)]
    runs["kfac"] = {KFAC_LR: runs["kfac-tuned"][KFAC_LR]}
    best = {kind: min(by_lr, key=lambda lr: _median([r.final_loss for r in by_lr[lr]]))
            for kind, by_lr in runs.items()}
    target = min(_median([r.final_loss for r in runs[k][best[k]]]) for k in GRIDS)
    initial = _median([r.train_loss[0] for r in runs["sgd"][best["sgd"]]])  # the same models at step 0
    targets = {"target": target, "coarse_target": math.sqrt(initial * target)}
    rows = []
    for kind in ("sgd", "adam", "kfac", "kfac-tuned"):
        chosen = runs[kind][best[kind]]
        row = {"optimizer": kind, "lr": best[kind], "final_loss": _median([r.final_loss for r in chosen]),
               "ms_per_step": _median([1000 * r.seconds[-1] / r.steps[-1] for r in chosen if r.steps[-1]])}
        for key, t in targets.items():
            reached = [r.reached(t) for r in chosen]
            row[f"steps_to_{key}"] = _median([s if s is not None else math.inf for s, _ in reached])
            row[f"seconds_to_{key}"] = _median([sec if sec is not None else math.inf for _, sec in reached])
        rows.append(row)
    return {"targets": targets, "seeds": seeds, "steps": steps, "batch_size": problem.batch_size,
            "train_size": len(data.y_train), "summary": rows,
            "best_runs": {k: [r.to_json() for r in runs[k][best[k]]] for k in runs}}  # the chosen lr's seeds


def _fmt(v, f):
    return "-" if v is None or (isinstance(v, float) and math.isinf(v)) else format(v, f)


def format_table(name: str, result: dict) -> str:
    t = result["targets"]
    lines = [f"| {name} | optimizer | lr | final loss | ms/step | steps to {t['coarse_target']:.3g} | "
             f"s to {t['coarse_target']:.3g} | steps to {t['target']:.3g} | s to {t['target']:.3g} |",
             "|" + "---|" * 9]
    for r in result["summary"]:
        lines.append(f"| | {r['optimizer']} | {r['lr']:g} | {r['final_loss']:.2e} | {r['ms_per_step']:.2f} | "
                     f"{_fmt(r['steps_to_coarse_target'], '.0f')} | {_fmt(r['seconds_to_coarse_target'], '.3f')} | "
                     f"{_fmt(r['steps_to_target'], '.0f')} | {_fmt(r['seconds_to_target'], '.3f')} |")
    return "\n".join(lines)


def verdict(result: dict, kfac: str) -> Dict[str, bool]:
    """Per target: K-FAC (``kfac``: "kfac" or "kfac-tuned") reaches it in less optimizer time than both
    tuned baselines."""
    by = {r["optimizer"]: r for r in result["summary"]}
    return {key: by[kfac][f"seconds_to_{key}"] < min(by["sgd"][f"seconds_to_{key}"], by["adam"][f"seconds_to_{key}"])
            for key in ("coarse_target", "target")}


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", default=",".join(PROBLEMS))
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*K-FAC does not cover.*")
    payload = {"environment": common.environment(), "grids": GRIDS, "kfac": "defaults (lr " +
               f"{KFAC_LR:g})", "problems": {}}
    for name in args.problems.split(","):
        t0 = time.perf_counter()
        result = run_problem(name, args.seeds, args.steps)
        result["faster_than_both"] = {k: verdict(result, k) for k in ("kfac", "kfac-tuned")}
        payload["problems"][name] = result
        print(f"\n{name}: train {result['train_size']}, batch {result['batch_size']}, {args.steps} steps, "
              f"{args.seeds} seeds ({time.perf_counter() - t0:.0f} s); faster than tuned SGD and Adam: "
              + "; ".join(f"{k} " + ", ".join(f"{t} {'yes' if v else 'no'}" for t, v in w.items())
                          for k, w in result["faster_than_both"].items()))
        print(format_table(name, result))
    n = len(payload["problems"])
    payload["wins"] = {k: {t: sum(p["faster_than_both"][k][t] for p in payload["problems"].values())
                           for t in ("coarse_target", "target")} for k in ("kfac", "kfac-tuned")}
    for k, w in payload["wins"].items():
        print(f"{k}: faster than tuned SGD and Adam on {w['target']} of {n} problems to the target, "
              f"{w['coarse_target']} of {n} to the coarse target")
    common.save_json(os.path.join(args.out, "heldout.json"), payload)
    return payload


if __name__ == "__main__":
    main()
