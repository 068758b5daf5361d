"""End-to-end training benchmark: K-FAC against momentum SGD and Adam on the digits CNN, on the deep
autoencoder (64-256-128-32-128-256-64, tanh, MSE; Martens and Grosse's benchmark scaled down) and on
a small ResNet for digits (residual blocks with BatchNorm2d, one depthwise; examples/problems.py).

For each problem and optimizer: every learning rate of the grid in examples/problems.py from the same
initialisation and minibatches, the best by steps to the fine target training loss (then to the
target); loss against steps and against seconds. Then time per step against SGD, measured side by
side: blocks of 10 steps (so that K-FAC's factor and inverse updates are amortised as in training),
optimizers round-robin, 7 repetitions, the median of per-repetition ratios. Prints tables; saves
bench/results/<name>.{json,png}.

    python bench/bench_training.py [--problems cnn,autoencoder] [--reps 7]
    python bench/bench_training.py --problems resnet --name resnet
"""
from __future__ import annotations

import argparse
import os
import sys
import time
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
import common  # noqa: E402
import problems as P  # noqa: E402

BLOCK = 10
KINDS = P.OPTIMIZERS


def step_times(problem: P.Problem, data: P.Data, lrs: dict, reps: int) -> dict:
    """Seconds per step of each optimizer (at its chosen lr), interleaved blocks of BLOCK steps."""
    torch.manual_seed(0)
    states = {}
    for kind in KINDS:
        torch.manual_seed(0)
        model = problem.make_model()
        states[kind] = (model, P.make_optimizer(kind, model, lrs[kind], problem))
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, len(data.y_train), (problem.batch_size,), generator=gen) for _ in range(BLOCK)]

    def block(kind):
        model, opt = states[kind]

        def run():
            for idx in batches:
                P.train_step(problem, kind, model, opt, data.x_train[idx], data.y_train[idx])

        return run

    times = common.interleaved({k: block(k) for k in KINDS}, reps=reps, warmup=1)
    out = {}
    for kind in KINDS:
        out[kind] = {"ms_per_step": 1000 * common.summary(times[kind])["median"] / BLOCK,
                     "ratio_to_sgd": common.ratio_summary(times[kind], times["sgd"])["median"]}
    return out


def coverage(problem: P.Problem):
    """(parameters in layers K-FAC covers, all parameters) of the problem's model."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = problem.make_model()
        opt = P.make_optimizer("kfac", model, 0.1, problem)
    covered = {id(p): p for layer in opt._engine.layers for p in (layer.weight, layer.bias) if p is not None}
    return sum(p.numel() for p in covered.values()), sum(p.numel() for p in model.parameters())


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problems", default="cnn,autoencoder")
    ap.add_argument("--reps", type=int, default=7)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--name", default="training", help="results file stem (bench/results/<name>.{json,png})")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore", message=".*K-FAC does not cover.*")
    data = P.load_digits()
    payload = {"environment": common.environment(), "block_steps": BLOCK, "reps": args.reps, "problems": {}}

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = args.problems.split(",")
    fig, axes = plt.subplots(len(names), 2, figsize=(12, 4.5 * len(names)), squeeze=False)
    for row, name in enumerate(names):
        problem = P.PROBLEMS[name]
        covered, total = coverage(problem)
        t0 = time.perf_counter()
        best, runs = {}, {}
        for kind in KINDS:
            best[kind], runs[kind] = P.grid_search(problem, kind, data)
        summary = [P.summary_row(problem, best[k]) for k in KINDS]
        timing = step_times(problem, data, {k: best[k].lr for k in KINDS}, args.reps)
        for r in summary:
            r.update({"timed_ms_per_step": timing[r["optimizer"]]["ms_per_step"],
                      "step_time_vs_sgd": timing[r["optimizer"]]["ratio_to_sgd"]})
        print(f"\n{name}: batch {problem.batch_size}, {problem.steps} steps, target loss {problem.target_loss:g}, "
              f"fine target {problem.fine_target:g} "
              f"({time.perf_counter() - t0:.0f} s)")
        print(f"K-FAC covers {covered} of the model's {total} parameters")
        print(P.format_table(problem, summary))
        print("step time (side by side, median of " + str(args.reps) + " x " + str(BLOCK) + "-step blocks): " +
              ", ".join(f"{k} {timing[k]['ms_per_step']:.2f} ms ({timing[k]['ratio_to_sgd']:.2f}x SGD)"
                        for k in KINDS))
        payload["problems"][name] = {"target_loss": problem.target_loss, "fine_target": problem.fine_target,
                                     "steps": problem.steps,
                                     "batch_size": problem.batch_size, "lr_grid": P.LR_GRIDS[name],
                                     "kfac_covered_parameters": covered, "parameters": total,
                                     "summary": summary,
                                     "runs": {k: [r.to_json() for r in v] for k, v in runs.items()}}
        P.plot_runs(axes[row][0], axes[row][1], problem, [best[k] for k in KINDS])
    fig.tight_layout()
    os.makedirs(args.out, exist_ok=True)
    fig.savefig(os.path.join(args.out, f"{args.name}.png"), dpi=100)
    common.save_json(os.path.join(args.out, f"{args.name}.json"), payload)
    return payload


if __name__ == "__main__":
    main()
