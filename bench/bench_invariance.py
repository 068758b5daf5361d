"""Invariance to an affine reparameterisation of the inputs: exact NGD, K-FAC, layer-wise NGD, SGD.

Martens ("New insights and perspectives on the natural gradient method", JMLR 2020, section 12):
the natural gradient's iterates do not depend on how the model is parameterised, up to the damping,
when the reparameterisation is an invertible affine map of the parameters; K-FAC keeps the part of
this that its block structure allows, which includes any affine map of a layer's inputs (weight and
bias joint, Martens and Grosse 2015, section 10); gradient descent keeps none of it.

On scikit-learn's bundled digits (nothing is downloaded; 300 training and 300 held-out images, a
fixed split), with each image's first 16 principal components (of all 1797 images, standardised)
as inputs and its one-hot class as target of the mean squared error, a float64 MLP 16-16-10 with
tanh (P = 442 < N C = 3000: its GGN is invertible) is trained full-batch twice from the same
function: once on the inputs x, once on x' = B x + c with B of condition number 1e3 (singular
values 10^-1.5 ... 10^1.5 between random rotations, c ~ N(0, I)) and the first layer
W' = W B^-1, b' = b - W B^-1 c. After every step the script records the max abs difference of the
two runs' outputs on the training and on the held-out inputs, and both runs' training losses, for:

- NGD (blocks="full", type-2, exact GGN), damping 1e-16, and the same with damping 1e-3, where the
  damping is no longer small next to the reparameterised GGN's smallest eigenvalues;
- KFAC (type-2, joint weight and bias, eigen inverse, factors of the current batch every step, no
  momentum, no trust region), damping 1e-16;
- layer-wise NGD (blocks="layer"), damping 1e-16;
- SGD.

Prints a table; saves bench/results/invariance.json and bench/results/invariance.png (left: the
difference of the two runs against the step, log scale; right: the training loss of both runs).
Under 2 minutes on 2 cores.

Nearly undamped second-order methods are unstable on many problems (the exact Gauss-Newton step of
a network with nearly redundant units is huge), and there the two runs part at the rate at which the
instability amplifies rounding errors, as any two nearby runs of an unstable iteration do: on
scikit-learn's diabetes data (one output, MLP 10-16-1) exact NGD with damping 1e-16 raised the loss
from 1.1 to 385 and 680 in its first steps at lr 0.2 and 0.5, and on these digits inputs lr 0.5
did the same (and 20 components at lr 0.2). The settings here are ones where every run is stable,
so that the differences show the invariance and not the instability.

    .venv/bin/python bench/bench_invariance.py [--steps 30] [--out bench/results]
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import sys
import warnings

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

import natgrad_cuda as ng  # noqa: E402

HIDDEN = 16
COMPONENTS = 16
N_TRAIN = 300
N_HELD = 300
COND = 1e3
# name: (optimizer, lr, damping)
METHODS = {
    "NGD": ("ngd-full", 0.2, 1e-16),
    "NGD, damping 1e-3": ("ngd-full", 0.2, 1e-3),
    "KFAC": ("kfac", 0.2, 1e-16),
    "layer-wise NGD": ("ngd-layer", 0.2, 1e-16),
    "SGD": ("sgd", 1.0, None),
}
COLORS = {"NGD": "tab:blue", "NGD, damping 1e-3": "tab:cyan", "KFAC": "tab:red", "layer-wise NGD": "tab:green",
          "SGD": "0.35"}


def load() -> dict:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.data, dtype=torch.float64)
    x = x - x.mean(0)
    _, _, vt = torch.linalg.svd(x, full_matrices=False)
    z = x @ vt[:COMPONENTS].T
    z = z / z.std(0)
    y = F.one_hot(torch.tensor(d.target), 10).double()
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(0))
    train, held = perm[:N_TRAIN], perm[N_TRAIN:N_TRAIN + N_HELD]
    return {"x": z[train], "y": y[train], "x_held": z[held]}


def affine(d: int, cond: float = COND, seed: int = 1):
    """B = U diag(s) V^T, s log-spaced over [cond^-1/2, cond^1/2]; c ~ N(0, I)."""
    g = torch.Generator().manual_seed(seed)
    U, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    V, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    s = torch.logspace(math.log10(cond) / 2, -math.log10(cond) / 2, d, dtype=torch.float64)
    return U @ torch.diag(s) @ V.T, torch.randn(d, generator=g, dtype=torch.float64)


def model_pair(d: int, B, c):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(d, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, 10)).double()
    twin = copy.deepcopy(model)
    with torch.no_grad():
        Binv = torch.linalg.inv(B)
        W = twin[0].weight.clone()
        twin[0].weight.copy_(W @ Binv)
        twin[0].bias.sub_(W @ Binv @ c)
    return model, twin


def make_optimizer(kind: str, model: nn.Module, lr: float, damping):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    if kind == "kfac":
        return ng.KFAC(model, lr=lr, damping=damping, loss="mse", fisher_type="type-2", momentum=0.0, kl_clip=None,
                       factor_decay=0.0, factor_update_freq=1, inv_update_freq=1, inverse="eigen")
    return ng.NGD(model, lr=lr, damping=damping, loss="mse", fisher_type="type-2", blocks=kind[4:])


def run(kind: str, lr: float, damping, model: nn.Module, x, y, x_held, steps: int):
    """Outputs on x and x_held after each step, and the training loss before each step and at the end."""
    opt = make_optimizer(kind, model, lr, damping)
    outs, losses = [], []
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        loss = F.mse_loss(out, y)
        losses.append(loss.item())
        if kind == "sgd":
            loss.backward()
        else:
            opt.backward(loss, out)
        opt.step()
        with torch.no_grad():
            outs.append((model(x).clone(), model(x_held).clone()))
    with torch.no_grad():
        losses.append(F.mse_loss(model(x), y).item())
    return outs, losses


def compare(name: str, data: dict, B, c, steps: int) -> dict:
    kind, lr, damping = METHODS[name]
    model, twin = model_pair(data["x"].shape[1], B, c)
    move = lambda t: t @ B.T + c  # noqa: E731
    with torch.no_grad():
        start = (model(data["x"]) - twin(move(data["x"]))).abs().max().item()
    a, loss_a = run(kind, lr, damping, model, data["x"], data["y"], data["x_held"], steps)
    b, loss_b = run(kind, lr, damping, twin, move(data["x"]), data["y"], move(data["x_held"]), steps)
    train = [(p[0] - q[0]).abs().max().item() for p, q in zip(a, b)]
    held = [(p[1] - q[1]).abs().max().item() for p, q in zip(a, b)]
    return {"optimizer": kind, "lr": lr, "damping": damping, "start_difference": start,
            "train_difference": train, "held_out_difference": held, "loss": loss_a, "loss_reparameterised": loss_b}


def format_table(results: dict) -> str:
    head = (f"{'method':<19} {'lr':>5} {'damping':>8}  {'max diff train':>14} {'final diff train':>16} "
            f"{'final diff held':>15}  {'loss: start':>11} {'final':>9} {'final reparam':>13}")
    lines = [head, "-" * len(head)]
    for name, r in results.items():
        damping = "-" if r["damping"] is None else f"{r['damping']:.0e}"
        lines.append(f"{name:<19} {r['lr']:>5g} {damping:>8}  {max(r['train_difference']):>14.1e} "
                     f"{r['train_difference'][-1]:>16.1e} {r['held_out_difference'][-1]:>15.1e}  "
                     f"{r['loss'][0]:>11.4f} {r['loss'][-1]:>9.4f} {r['loss_reparameterised'][-1]:>13.4f}")
    return "\n".join(lines)


def plot(results: dict, steps: int, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.6))
    xs = list(range(1, steps + 1))
    for name, r in results.items():
        col = COLORS[name]
        ax.plot(xs, [max(v, 1e-17) for v in r["train_difference"]], color=col, marker="o", ms=3, label=name)
        ax.plot(xs, [max(v, 1e-17) for v in r["held_out_difference"]], color=col, ls=":", lw=1)
        bx.plot(range(steps + 1), r["loss"], color=col, label=f"{name}: x")
        bx.plot(range(steps + 1), r["loss_reparameterised"], color=col, ls="--", lw=2.2, alpha=0.6,
                label=f"{name}: B x + c")
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("max |f(x) - f'(B x + c)|")
    ax.set_title("difference of the two runs' outputs\n(solid: training inputs, dotted: held-out)", fontsize=10)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    bx.set_yscale("log")
    bx.set_xlabel("step")
    bx.set_ylabel("training loss (MSE)")
    bx.set_title("training loss: original (solid) and reparameterised (dashed) run", fontsize=10)
    bx.grid(alpha=0.3, which="both")
    bx.legend(fontsize=7, ncol=2)
    fig.suptitle(f"digits ({COMPONENTS} principal components), MLP {COMPONENTS}-{HIDDEN}-10 tanh, one-hot MSE, "
                 f"full batch ({N_TRAIN}), float64; inputs x vs B x + c, "
                 f"cond(B) = {COND:.0e}", fontsize=11)
    common.save_figure(fig, path)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    data = load()
    B, c = affine(data["x"].shape[1])
    results = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for name in METHODS:
            results[name] = compare(name, data, B, c, args.steps)
    messages = sorted({str(w.message) for w in caught})
    print(f"digits, {COMPONENTS} principal components ({N_TRAIN} training, {len(data['x_held'])} held-out), "
          f"MLP {COMPONENTS}-{HIDDEN}-10 tanh, one-hot MSE, float64, "
          f"{args.steps} full-batch steps; inputs x vs x' = B x + c, cond(B) = {COND:.0e}, |c| = {c.norm():.2f}; "
          f"difference at the start {max(r['start_difference'] for r in results.values()):.1e}")
    print(format_table(results))
    print(f"warnings: {messages if messages else 'none'}")
    payload = {"environment": common.environment(),
               "data": f"sklearn load_digits, first {COMPONENTS} principal components standardised, one-hot MSE",
               "n_train": N_TRAIN, "n_held_out": len(data["x_held"]), "hidden": HIDDEN, "cond_B": COND,
               "singular_values_B": torch.linalg.svdvals(B).tolist(), "c": c.tolist(), "steps": args.steps,
               "warnings": messages, "methods": results}
    os.makedirs(args.out, exist_ok=True)
    plot(results, args.steps, os.path.join(args.out, "invariance.png"))
    common.save_json(os.path.join(args.out, "invariance.json"), payload)
    return payload


if __name__ == "__main__":
    main()
