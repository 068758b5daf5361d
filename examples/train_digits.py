"""The main job: train a small CNN on scikit-learn's digits with K-FAC, momentum SGD and Adam
(and K-FAC with the adaptive step of Martens and Grosse, whose grid is over the damping).

Each optimizer runs every learning rate of a small grid from the same initialisation and the same
minibatches; its best (the fewest steps to the fine target training loss, then to the target) is
reported in a table of final training loss, test accuracy, wall time, and steps and seconds to the
target and to the fine target, and plotted against
steps and against seconds. Writes outputs/train_digits.{png,json}.

    python examples/train_digits.py [--problem cnn|autoencoder] [--steps N] [--out DIR]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import problems as P  # noqa: E402


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--problem", choices=sorted(P.PROBLEMS), default="cnn")
    ap.add_argument("--steps", type=int, default=None, help="training steps per run (default: the problem's)")
    ap.add_argument("--out", default="outputs")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore", message=".*K-FAC does not cover.*")

    from tqdm import tqdm
    import natgrad_cuda as ng

    problem = P.PROBLEMS[args.problem]
    if args.steps:
        problem.steps = args.steps
    data = P.load_digits()
    grids = P.LR_GRIDS[problem.name]
    total = sum(len(grids[k]) for k in P.OPTIMIZERS) * problem.steps
    print(f"{problem.name} on digits ({len(data.y_train)} train / {len(data.y_test)} test), batch "
          f"{problem.batch_size}, {problem.steps} steps per run; natgrad_cuda backends "
          f"{ng.build_info()['backends']}, torch threads {torch.get_num_threads()}")
    best, everything = {}, {}
    t0 = time.perf_counter()
    with tqdm(total=total, unit="step", desc="training", mininterval=1.0) as bar:
        for kind in P.OPTIMIZERS:
            bar.set_postfix_str(kind)
            best[kind], everything[kind] = P.grid_search(problem, kind, data, progress=bar)
    rows = [P.summary_row(problem, best[k]) for k in P.OPTIMIZERS]
    print()
    print(P.format_table(problem, rows))
    print(f"\n(all {sum(len(v) for v in everything.values())} runs: {time.perf_counter() - t0:.0f} s)")

    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"train_digits{'' if problem.name == 'cnn' else '_' + problem.name}")
    payload = {"problem": problem.name, "target_loss": problem.target_loss, "fine_target": problem.fine_target,
               "steps": problem.steps,
               "batch_size": problem.batch_size, "summary": rows,
               "runs": {k: [r.to_json() for r in v] for k, v in everything.items()},
               "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                               "natgrad_cuda": ng.build_info()}}
    with open(stem + ".json", "w") as fh:
        json.dump(payload, fh, indent=1)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
    P.plot_runs(a, b, problem, [best[k] for k in P.OPTIMIZERS])
    fig.tight_layout()
    fig.savefig(stem + ".png", dpi=110)
    print(f"saved {stem}.png and {stem}.json")
    return payload


if __name__ == "__main__":
    main()
