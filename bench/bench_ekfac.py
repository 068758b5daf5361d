"""EKFAC against K-FAC on bench_training.py's problems: steps to the targets at K-FAC's chosen
learning rate (the CNN at lr 1, the autoencoder at lr 0.1; the package's defaults otherwise, MC
Fisher), same seeds and batches, and the time per step side by side (blocks of 10 steps round
robin, medians of per-repetition ratios). On the CNN only the last layer (nn.Linear) is rescaled;
its convolutions keep K-FAC's scaling.

    python bench/bench_ekfac.py [--reps 5]

Prints a table and saves bench/results/ekfac.json.
"""
from __future__ import annotations

import argparse
import os
import sys
import warnings

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
import common  # noqa: E402
import problems as P  # noqa: E402

LRS = {"cnn": 1.0, "autoencoder": 0.1}
INVERSES = ("eigen", "ekfac")


def step_ratio(problem: P.Problem, data: P.Data, lr: float, reps: int) -> dict:
    models = {}
    for inverse in INVERSES:
        torch.manual_seed(0)
        model = problem.make_model()
        models[inverse] = (model, P.make_optimizer("kfac", model, lr, problem, inverse=inverse))
    gen = torch.Generator().manual_seed(0)
    batches = [torch.randint(0, len(data.y_train), (problem.batch_size,), generator=gen) for _ in range(10)]

    def block(inverse):
        model, opt = models[inverse]

        def run():
            for idx in batches:
                P.train_step(problem, "kfac", model, opt, data.x_train[idx], data.y_train[idx])
        return run

    times = common.interleaved({k: block(k) for k in INVERSES}, reps=reps, warmup=1)
    return {"ms_per_step": {k: 100 * common.summary(v)["median"] for k, v in times.items()},
            "ekfac_over_eigen": common.ratio_summary(times["ekfac"], times["eigen"])["median"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    data = P.load_digits()
    rows = []
    warnings.filterwarnings("ignore", message=".*rescales nn.Linear layers only.*")
    for name, lr in LRS.items():
        problem = P.PROBLEMS[name]
        for inverse in INVERSES:
            run = P.train(problem, "kfac", lr, data, inverse=inverse)
            rows.append({"problem": name, "lr": lr, "inverse": inverse,
                         "steps_to_target": run.reached(problem.target_loss)[0],
                         "steps_to_fine": run.reached(problem.fine_target)[0], "final_loss": run.final_loss})
        timing = step_ratio(problem, data, lr, args.reps)
        for r in rows[-2:]:
            r["ms_per_step"] = timing["ms_per_step"][r["inverse"]]
            r["ekfac_over_eigen"] = timing["ekfac_over_eigen"]
    print("| problem | lr | inverse | steps to target | steps to fine target | final loss | ms per step | EKFAC / K-FAC step |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['problem']} | {r['lr']:g} | {r['inverse']} | {r['steps_to_target']} | {r['steps_to_fine']} | "
              f"{r['final_loss']:.5f} | {r['ms_per_step']:.2f} | {r['ekfac_over_eigen']:.2f} |")
    common.save_json(os.path.join(HERE, "results", "ekfac.json"),
                     {"environment": common.environment(), "reps": args.reps, "rows": rows})


if __name__ == "__main__":
    main()
