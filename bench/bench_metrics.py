"""Which metric makes each optimizer a natural-gradient method? (Shoji et al. 2024, arXiv:2409.16422)

Every update u with g^T u < 0 is u = -M^-1 g for some symmetric positive definite M
(natgrad_cuda.metric). This trains one small MLP (64-32-10, tanh) on scikit-learn's bundled digits
(nothing is downloaded) for 200 steps each with torch.optim.SGD (momentum 0.9), torch.optim.Adam
and natgrad_cuda.KFAC, from the same initialisation on the same minibatches. At every step it
takes the flattened minibatch gradient g (before the step) and the actual parameter change
u = theta_after - theta_before and reports, per optimizer, quantiles over the steps of:

- cos θ, θ the angle between -u and g (1: plain gradient descent direction);
- kappa_min = (1 + sin θ)/(1 - sin θ), the smallest condition number of any metric that makes u a
  natural-gradient step (``min_condition_number``, O(P), no P x P matrix);
- kappa_canonical, the condition number of Shoji et al.'s canonical metric
  I - v v^T/(v^T v) + g g^T/(g^T v), v = -u, from its closed-form spectrum (1 on the complement of
  span{g, v}; in that plane the roots of λ^2 - (1 + ρ/cos θ) λ + ρ cos θ, ρ = |g|/|u|). It is not
  scale invariant: with small steps (ρ >> 1) it mostly measures the step length, not the direction.

Both condition numbers are checked against torch.linalg.eigvalsh of the full P x P metric from
``metric_from_update`` at two steps per optimizer (P = 2410 here). Steps whose update is not a
descent direction for this minibatch's gradient (g^T u >= 0; momentum can do that) have no such
metric: they are counted, not analysed. Saves bench/results/metrics.json.

Reproduce (under two minutes on two CPU cores):

    .venv/bin/python bench/bench_metrics.py [--steps 200] [--check-steps 50,150]
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
from typing import Dict, List

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "examples"))
import common  # noqa: E402
import problems  # noqa: E402

import natgrad_cuda  # noqa: E402
from natgrad_cuda.metric import metric_from_update, min_condition_number  # noqa: E402

LRS = {"sgd": 0.1, "adam": 3e-3, "kfac": 0.1}  # sgd with momentum 0.9; kfac at its default lr
BATCH = 128


def make_model() -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.Tanh(), nn.Linear(32, 10))


def make_optimizer(kind: str, model: nn.Module):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=LRS[kind], momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=LRS[kind])
    return natgrad_cuda.KFAC(model, lr=LRS[kind], loss="cross_entropy", seed=0)


def flat(tensors) -> torch.Tensor:
    return torch.cat([t.detach().reshape(-1) for t in tensors]).double()


def canonical_condition_number(g: torch.Tensor, u: torch.Tensor) -> float:
    """cond of I - v v^T/(v^T v) + g g^T/(g^T v), v = -u, without forming it (see the docstring)."""
    v = -u
    gn, vn = float(g.norm()), float(v.norm())
    cos, rho = float(g @ v) / (gn * vn), gn / vn
    trace, det = 1.0 + rho / cos, rho * cos  # of the 2 x 2 block in span{g, v}
    root = math.sqrt(max(trace * trace - 4.0 * det, 0.0))
    hi = (trace + root) / 2.0
    lo = det / hi  # the small root without cancellation
    if g.numel() > 2:  # eigenvalue 1 on the complement (P - 2 of them)
        hi, lo = max(hi, 1.0), min(lo, 1.0)
    return hi / lo


def eig_condition_number(m: torch.Tensor) -> float:
    ev = torch.linalg.eigvalsh(m)
    return float(ev[-1] / ev[0])


def quantiles(xs: List[float]) -> Dict[str, float]:
    if not xs:
        return {"n": 0}
    if len(xs) == 1:
        return {"n": 1, "q10": xs[0], "median": xs[0], "q90": xs[0]}
    q = statistics.quantiles(xs, n=10, method="inclusive")
    return {"n": len(xs), "q10": q[0], "median": statistics.median(xs), "q90": q[-1]}


def run(kind: str, data: problems.Data, steps: int, check_steps: List[int]) -> dict:
    torch.manual_seed(0)
    model = make_model()
    opt = make_optimizer(kind, model)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(1)
    n = len(data.y_train)
    order, pos = torch.randperm(n, generator=gen), 0
    cos_list, kmin_list, kcan_list, rho_list, checks = [], [], [], [], []
    non_descent: List[int] = []
    for step in range(1, steps + 1):
        if pos + BATCH > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + BATCH]
        pos += BATCH
        x, y = data.x_train[idx], data.y_train[idx]
        opt.zero_grad()
        out = model(x)
        loss = F.cross_entropy(out, y)
        if kind == "kfac":
            opt.backward(loss, out)
        else:
            loss.backward()
        g = flat(p.grad for p in params)  # before the step: K-FAC may change .grad in place
        before = flat(params)
        opt.step()
        u = flat(params) - before
        dot = float(g @ u)
        if not dot < 0.0:  # no SPD metric exists for this step
            non_descent.append(step)
            continue
        cos = -dot / (float(g.norm()) * float(u.norm()))
        kmin = min_condition_number(g, u)
        kcan = canonical_condition_number(g, u)
        cos_list.append(cos), kmin_list.append(kmin), kcan_list.append(kcan)
        rho_list.append(float(g.norm()) / float(u.norm()))
        if step in check_steps:  # the closed forms against the spectrum of the actual P x P metrics
            e_min = eig_condition_number(metric_from_update(g, u, kind="min-condition"))
            e_can = eig_condition_number(metric_from_update(g, u, kind="canonical"))
            checks.append({"step": step, "kappa_min": kmin, "eigvalsh_min_condition": e_min,
                           "kappa_canonical": kcan, "eigvalsh_canonical": e_can})
    with torch.no_grad():
        final = float(F.cross_entropy(model(data.x_train), data.y_train))
    return {"optimizer": kind, "lr": LRS[kind], "steps": steps, "params": sum(p.numel() for p in params),
            "final_train_loss": final, "non_descent_steps": non_descent, "cos_theta": quantiles(cos_list),
            "kappa_min": quantiles(kmin_list), "kappa_canonical": quantiles(kcan_list),
            "grad_to_update_norm_ratio": quantiles(rho_list), "eigvalsh_checks": checks}


def fmt(q: Dict[str, float], spec: str) -> str:
    if not q.get("n"):
        return "-"
    return f"{q['median']:{spec}} [{q['q10']:{spec}}, {q['q90']:{spec}}]"


def table(rows: List[dict]) -> str:
    head = ("| optimizer | lr | final loss | non-descent steps | cos θ median [q10, q90] "
            "| κ_min median [q10, q90] | κ_canonical median [q10, q90] | ρ = ‖g‖/‖u‖ median |")
    lines = [head, "|" + "---|" * 8]
    for r in rows:
        lines.append(f"| {r['optimizer']} | {r['lr']:g} | {r['final_train_loss']:.3f} "
                     f"| {len(r['non_descent_steps'])}/{r['steps']} | {fmt(r['cos_theta'], '.3f')} "
                     f"| {fmt(r['kappa_min'], '.3g')} | {fmt(r['kappa_canonical'], '.3g')} "
                     f"| {r['grad_to_update_norm_ratio'].get('median', float('nan')):.3g} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=200)
    ap.add_argument("--check-steps", default="50,150", help="steps at which eigvalsh checks the closed forms")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "metrics.json"))
    args = ap.parse_args()
    check_steps = [int(s) for s in args.check_steps.split(",") if s]
    data = problems.load_digits(seed=0)
    rows = [run(kind, data, args.steps, check_steps) for kind in ("sgd", "adam", "kfac")]
    print(table(rows))
    worst = 0.0
    for r in rows:
        for c in r["eigvalsh_checks"]:
            worst = max(worst, abs(c["eigvalsh_min_condition"] / c["kappa_min"] - 1),
                        abs(c["eigvalsh_canonical"] / c["kappa_canonical"] - 1))
    n_checks = sum(len(r["eigvalsh_checks"]) for r in rows)
    print(f"eigvalsh of the full {rows[0]['params']} x {rows[0]['params']} metrics at {n_checks} steps: "
          f"largest relative gap to the closed forms {worst:.1e}")
    for r in rows:
        if r["non_descent_steps"]:
            print(f"{r['optimizer']}: not a descent direction for its minibatch gradient at steps "
                  f"{r['non_descent_steps']}")
    common.save_json(args.out, {"description": __doc__.splitlines()[0], "model": "MLP 64-32-10 tanh, digits",
                                "batch_size": BATCH, "rows": rows, "eigvalsh_max_relative_gap": worst,
                                "environment": common.environment()})


if __name__ == "__main__":
    main()
