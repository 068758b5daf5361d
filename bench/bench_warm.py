"""Warm-started eigenbases: how often the optimizer keeps a factor's previous eigenbasis
(``ops.eigh_refine`` with no iteration, ``_directions.WARM_*``), the error that costs in the
preconditioned direction, the time it saves in the inverse phase, and steps to target with it on
and off.

1. The inverse updates of three runs (damping 1e-3): the 12-layer MLP of bench_asdl.py every step
   (factors and inverses each step) on its fixed batch (lr 1e-4, as that benchmark), the same MLP
   every step on shuffled digits batches (lr 1e-2), and the autoencoder of bench_training.py at its chosen lr (0.1) with
   the package's defaults (factors every 3, inverses every 10). At every inverse update the layer
   states are decomposed twice, with the warm start and with it off: the factors kept, the relative
   error of a Gaussian gradient's direction (ops.precondition) against the fresh decomposition's
   (max over layers), and the two inverse phases timed side by side (medians of 3, interleaved).
2. Steps to target on bench_training.py's problems (the CNN at lr 1, the autoencoder at lr 0.1),
   warm start on and off, same seeds and batches.

    python bench/bench_warm.py [--reps 3] [--skip-training]

Prints tables and saves bench/results/warm.json.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
import common  # noqa: E402
import problems as P  # noqa: E402

import natgrad_cuda as ng  # noqa: E402
from natgrad_cuda import _directions, ops  # noqa: E402  (the optimizer's inverse update, called alone)

import bench_asdl  # noqa: E402

DAMPING = 1e-3
OFF = 10 ** 9  # a WARM_MIN that no factor reaches: the warm start off


def _with_warm(on: bool, fn):
    saved = _directions.WARM_MIN
    _directions.WARM_MIN = saved if on else OFF
    try:
        return fn()
    finally:
        _directions.WARM_MIN = saved


_counted = [0]  # factors whose basis the last warm decompose kept
_refine = ops.eigh_refine


def _counting_refine(*args, **kwargs):
    results = _refine(*args, **kwargs)
    _counted[0] += sum(float(k) <= _directions.WARM_TOLERANCE for _, _, k in results)
    return results


def _decompose(states, inverse):
    copy = {n: dict(st) for n, st in states.items()}
    _directions.decompose(copy, None, damping=DAMPING, inverse=inverse)
    return copy


def _direction_error(warm, cold, inverse, gen) -> float:
    worst = 0.0
    for name, st in cold.items():
        if "QA" not in st or "QG" not in st or st["QA"].dim() != 2:
            continue
        M = torch.randn(st["QG"].shape[0], st["QA"].shape[0], generator=gen, dtype=torch.float64)
        Pw, Pc = (ops.precondition([M], [s["QA"].double()], [s["dA"].double()], [s["QG"].double()],
                                   [s["dG"].double()], DAMPING, inverse, impl="reference")[0] for s in (warm[name], st))
        worst = max(worst, float((Pw - Pc).norm() / Pc.norm()))
    return worst


def inverse_updates(label: str, model, batches, loss_fn, lr: float, factors: int, inverses: int, reps: int,
                    inverse: str = "eigen", loss: str = "cross_entropy", **kfac_kwargs) -> dict:
    """Warm start on against off at every inverse update of a run (see the module's docstring)."""
    opt = ng.KFAC(model, lr=lr, damping=DAMPING, factor_update_freq=factors, inv_update_freq=inverses, loss=loss,
                  inverse=inverse, seed=0, **kfac_kwargs)
    gen = torch.Generator().manual_seed(0)
    kept, tried, errors, ratios, warm_ms, cold_ms = 0, 0, [], [], [], []
    for step, (x, y) in enumerate(batches):
        opt.zero_grad()
        out = model(x)
        opt.backward(loss_fn(out, x, y), out)
        if (step + 1) % inverses == 0 and step + 1 < len(batches):
            states = opt.state_dict()["kfac"]["layers"]
            _counted[0] = 0
            warm = _with_warm(True, lambda: _decompose(states, inverse))
            cold = _with_warm(False, lambda: _decompose(states, inverse))
            n_kept = _counted[0]
            eligible = sum(1 for st in states.values() for k in ("A", "G")
                           if "Q" + k in st and st[k].dim() == 2 and st[k].shape[0] >= _directions.WARM_MIN)
            kept, tried = kept + n_kept, tried + eligible
            if n_kept:
                errors.append(_direction_error(warm, cold, inverse, gen))
            times = common.interleaved({"warm": lambda: _with_warm(True, lambda: _decompose(states, inverse)),
                                        "cold": lambda: _with_warm(False, lambda: _decompose(states, inverse))},
                                       reps=reps, warmup=0)
            warm_ms.append(1e3 * statistics.median(times["warm"]))
            cold_ms.append(1e3 * statistics.median(times["cold"]))
            ratios.append(warm_ms[-1] / cold_ms[-1])
        opt.step()
    row = {"run": label, "updates": len(ratios), "factors_eligible": tried, "factors_kept": kept,
           "max_direction_error": max(errors) if errors else None,
           "median_direction_error": statistics.median(errors) if errors else None,
           "warm_ms_median": statistics.median(warm_ms) if warm_ms else None,
           "cold_ms_median": statistics.median(cold_ms) if cold_ms else None,
           "ratio_median": statistics.median(ratios) if ratios else None}
    print(row, flush=True)
    return row


def phase_one(reps: int) -> list:
    rows = []
    torch.manual_seed(0)
    x, y = bench_asdl.data("mlp12")
    ce = lambda out, x, y: F.cross_entropy(out, y)  # noqa: E731
    torch.manual_seed(0)
    rows.append(inverse_updates("MLP12, fixed batch, lr 1e-4", bench_asdl.make("mlp12"), [(x, y)] * 30, ce, 1e-4,
                                1, 1, reps, momentum=0.0, kl_clip=None))
    data = P.load_digits()
    gen = torch.Generator().manual_seed(1)
    shuffled = [(data.x_train[i], data.y_train[i])
                for i in (torch.randint(0, len(data.y_train), (128,), generator=gen) for _ in range(30))]
    torch.manual_seed(0)
    rows.append(inverse_updates("MLP12, shuffled batches, lr 1e-2", bench_asdl.make("mlp12"),
                                [(a.flatten(1), b) for a, b in shuffled], ce, 1e-2, 1, 1, reps,
                                momentum=0.0, kl_clip=None))
    problem = P.PROBLEMS["autoencoder"]
    torch.manual_seed(0)
    ae_batches = [(a, b) for a, b in
                  ((data.x_train[i], data.y_train[i])
                   for i in (torch.randint(0, len(data.y_train), (128,), generator=gen) for _ in range(200)))]
    rows.append(inverse_updates("autoencoder, defaults (3/10), lr 0.1, damping 1e-3", problem.make_model(), ae_batches,
                                lambda out, x, y: problem.loss_fn(out, x, y), 0.1, 3, 10, reps, loss="mse"))
    return rows


def phase_two() -> list:
    data = P.load_digits()
    rows = []
    for name, lr in (("cnn", 1.0), ("autoencoder", 0.1)):
        problem = P.PROBLEMS[name]
        for on in (True, False):
            run = _with_warm(on, lambda: P.train(problem, "kfac", lr, data))
            rows.append({"problem": name, "lr": lr, "warm": on, "steps_to_target": run.reached(problem.target_loss)[0],
                         "steps_to_fine": run.reached(problem.fine_target)[0], "final_loss": run.final_loss})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--skip-training", action="store_true")
    args = ap.parse_args()
    ops.eigh_refine = _counting_refine  # the optimizer calls it through the module: counted from here on
    rows = phase_one(args.reps)
    print("| run | inverse updates | factors eligible / kept | direction error max / median | "
          "inverse phase warm / off (ms, medians) | ratio |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        err = "-" if r["max_direction_error"] is None else \
            f"{r['max_direction_error']:.1e} / {r['median_direction_error']:.1e}"
        print(f"| {r['run']} | {r['updates']} | {r['factors_eligible']} / {r['factors_kept']} | {err} | "
              f"{r['warm_ms_median']:.1f} / {r['cold_ms_median']:.1f} | {r['ratio_median']:.2f} |")
    training = [] if args.skip_training else phase_two()
    if training:
        print("\n| problem | lr | warm start | steps to target | steps to fine target | final loss |")
        print("|---|---|---|---|---|---|")
        for r in training:
            print(f"| {r['problem']} | {r['lr']:g} | {'on' if r['warm'] else 'off'} | {r['steps_to_target']} | "
                  f"{r['steps_to_fine']} | {r['final_loss']:.5f} |")
    common.save_json(os.path.join(HERE, "results", "warm.json"),
                     {"environment": common.environment(), "reps": args.reps, "damping": DAMPING,
                      "warm_min": _directions.WARM_MIN, "warm_tolerance": _directions.WARM_TOLERANCE,
                      "inverse_updates": rows, "training": training})


if __name__ == "__main__":
    main()
