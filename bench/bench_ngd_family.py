"""Exact NGD and its structured approximations on a wide MLP: Karakida and Osawa (NeurIPS 2020),
"Understanding approximate Fisher information for fast convergence of natural gradient descent in
wide neural networks", reproduced at finite width.

The claim. In the wide (NTK) regime with MSE, exact NGD and NGD with layer-wise block-diagonal,
block tri-diagonal, K-FAC and unit-wise Fisher approximations all make an isotropic function-space
update, f <- f - lr * gain * (f - y), so that with lr = 1 / gain every one of them converges as fast
as exact NGD (one step, in the linear limit), far faster than gradient descent. The gain depends on
the approximation. Exact NGD: 1. Layer-wise block-diagonal: L (the number of layers), since each
exact block alone already fits the residual. The authors' code (kazukiosawa/ngd_in_wide_nn,
numpy-based/predict.py, get_ng_opt_lr) prescribes lr = 1 (exact), 1 / L (block-diagonal),
1 / (1^T T^-1 1) (exact block tri-diagonal, 1 for L = 3) and 1 / (N L) (K-FAC, N data points).
With this package's conventions the same argument gives K-FAC 1 + (L - 1) N (each hidden layer's
Kronecker block has gain N when its G and A have full row rank; with one output the last layer's
block is exact, gain 1) and unit-wise (L - 1) M + C (each unit's block alone fits the residual).

What it measures. Per width and method, at the initialisation: the linearised first update J d (d
the lr = 1 step), its gain -<J d, r> / |r|^2 (r = f - y), its isotropy cos(J d, -r), its agreement
cos(J d, J d_NGD) with exact NGD, and the length of the gain-matched parameter step d / gain over
NGD's (NGD's is the shortest that moves the outputs by -r: a longer one leaves the linear regime
sooner); the same at three dampings. Then STEPS full-batch steps with lr = 1, lr = 1 / L and
lr = 1 / gain (gain measured at the initialisation), next to exact NGD (lr = 1) and GD (best lr of a
grid). Per run: the loss curve, the rate (median of loss_(t+1) / loss_t over the first RATE_STEPS
steps, while the loss is above FLOOR x its initial value), its linearised prediction
(1 - lr gain)^2, loss_1 / loss_0, the least isotropy cos(J d_t, -r_t) along the run, and the steps
to TARGET x the initial loss.

What it shows (one seed; numbers in bench/results/ngd_family.json). Once the rank conditions hold
(M >= 64 here) every approximation's first update is parallel to exact NGD's (cos >= 0.99999) with
the predicted gains: 3 (layer-wise), 97 = 1 + 2N (K-FAC), 2M + 1 (unit-wise), and about N = 48 for
this package's Kronecker-factored block tri-diagonal (not the paper's exact one). So lr = 1 makes
only exact NGD fast; lr = 1 / L suffices for the layer-wise block-diagonal only (the same steps to
1e-8 as exact NGD from M = 64 on); K-FAC, tri-diagonal K-FAC and unit-wise need lr = 1 / gain, with
which they approach exact NGD as the width grows (K-FAC: 14, 5, 3 steps at M = 64, 128, 256 against
NGD's 4, 3, 3; unit-wise: not within 20 steps at M = 64, 11 at 128). Their parameter steps are
25-190 times longer than NGD's, so the nonlinearity the linear theory ignores costs more at finite
width. Below the rank conditions (M = 16, 32) no approximation is isotropic any more (cos
0.96-0.997); with lr = 1 / gain the layer-wise one still converges (8-9 steps, about twice NGD's),
the Kronecker-factored and unit-wise ones mostly stall (loss ratio 1.5e-5 to 3e-2 after 20 steps;
unit-wise at M = 32 reaches 1e-8 in 18). GD reduces the loss 20-80-fold in 20 steps.

Settings (all float64, full batch, one seed):
- data: N = 48 images of scikit-learn's digits (8 x 8, no download), a seeded random subset, pixels
  standardised on it (constant pixels left at 0); C = 1 target, +1 for odd digits and -1 for even.
  N = 48 keeps [x, 1] of full row rank (digits' pixels give rank 52 at most on 64 points), which
  the first layer's K-FAC and unit-wise blocks need to be isotropic (the authors use a Forster
  transform otherwise); C = 1 is the setting of their K-FAC and unit-wise results (with C > 1 a
  unit's rows for the C outputs are parallel, so its block cannot fit the residual).
- model: 64 -> M -> M -> 1, tanh, L = 3 nn.Linear layers with biases; weights N(0, 1 / fan_in),
  biases 0, in standard parameterisation (every method here except GD is invariant to a per-layer
  rescaling of the parameters, so the NTK parameterisation gives the same function-space
  trajectories). tanh rather than ReLU: its derivative never vanishes, so no unit's backward signal
  is zero on some examples, which would make the unit-wise and K-FAC blocks rank-deficient for
  reasons other than width. Widths M in WIDTHS. The rank conditions (block-diagonal: last layer
  M + 1 >= N; K-FAC: M >= N C; unit-wise: M + 1 >= N C) hold from M = 64 on, fail at 16 and 32.
- methods: GD (torch.optim.SGD, the lr of GD_LRS with the lowest final loss); exact NGD
  (natgrad_cuda.NGD, blocks="full"); layer-wise block-diagonal NGD (NGD, blocks="layer");
  block tri-diagonal K-FAC (KFAC, structure="block-tridiagonal": Martens and Grosse's
  Kronecker-factored chain with factored Tikhonov damping, not the exact tri-diagonal blocks of the
  paper); K-FAC (structure="block-diagonal", exact damping); unit-wise NGD (structure="unit-wise",
  only up to UNIT_MAX_WIDTH: its M eigendecompositions of (M + 1) x (M + 1) blocks a layer take
  seconds a step at M = 256). KFAC with fisher_type="type-2", momentum 0, kl_clip None,
  factor_decay 0, factors and inverses updated every step: each step uses the exact factors of
  the current batch. Loss: F.mse_loss (the mean over the N C entries).
- damping: one absolute lambda for every method of a width, DAMPING_REL = 1e-10 times the mean
  nonzero eigenvalue of the exact GGN at the initialisation. 1e-6 of it is not small for the
  Kronecker-factored blocks (eigenvalues that are products of two factors' small eigenvalues): it
  shrinks the K-FAC gain by 6-15% and its isotropy cos to 0.995-0.999 (the damping table).

Prints three tables; saves bench/results/ngd_family.json and bench/results/ngd_family.png (one
panel per width, log loss against step, every run). Reproduce:

    .venv/bin/python bench/bench_ngd_family.py [--widths 16,32,64,128,256] [--steps 20]

About 1 minute on two CPU cores (1.5-2.5 CPU-minutes), up to 5.5 when other jobs share them;
unit-wise at M = 128 and the NGD steps at M = 256 dominate. No speed is reported: the seconds in the
JSON only record how long it ran. In the JSON a loss after a run stopped (diverged, or at the float64
floor) is null.
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys
import time
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call, jvp

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402
import natgrad_cuda as ng  # noqa: E402

N_POINTS = 48
N_LAYERS = 3
WIDTHS = [16, 32, 64, 128, 256]
UNIT_MAX_WIDTH = 128  # unit-wise: M (M + 1)^2 floats and M eigendecompositions of (M + 1)^2 a layer
STEPS = 20
RATE_STEPS = 10
FLOOR = 1e-24  # relative loss below which float64 rounding decides the ratios
TARGET = 1e-8  # relative loss for "steps to target"
DIVERGED = 1e6  # relative loss above which a run is stopped as diverged
DAMPING_REL = 1e-10
DAMPING_SWEEP = [1e-6, 1e-8, 1e-10]  # relative dampings of the first-update sensitivity check
GD_LRS = [2.0 ** k for k in range(-7, 2)]
TRACK_ABOVE = 1e-12  # relative loss above which the per-step gain and isotropy are recorded
APPROX = ["layer", "btd", "kfac", "unit"]
LABELS = {"gd": "GD", "ngd": "exact NGD", "layer": "layer-wise NGD", "btd": "block-tridiag K-FAC",
          "kfac": "K-FAC", "unit": "unit-wise NGD"}
COLORS = {"gd": "black", "ngd": "tab:blue", "layer": "tab:orange", "btd": "tab:green", "kfac": "tab:red",
          "unit": "tab:purple"}
STYLES = {"1": "-", "1/L": "--", "1/gain": ":", "best": "-"}


def load_data(n: int = N_POINTS, seed: int = 0):
    from sklearn.datasets import load_digits

    X, t = load_digits(return_X_y=True)
    idx = np.random.default_rng(seed).choice(len(X), size=n, replace=False)
    X, t = X[idx], t[idx]
    std = X.std(0)
    X = (X - X.mean(0)) / np.where(std > 0, std, 1.0)
    rank = int(np.linalg.matrix_rank(np.c_[X, np.ones(n)]))
    y = np.where(t % 2 == 1, 1.0, -1.0)[:, None]
    return torch.tensor(X), torch.tensor(y), rank


def make_model(width: int, seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(64, width), nn.Tanh(), nn.Linear(width, width), nn.Tanh(), nn.Linear(width, 1))
    with torch.no_grad():
        for layer in model:
            if isinstance(layer, nn.Linear):
                layer.weight.normal_(0.0, layer.in_features ** -0.5)
                layer.bias.zero_()
    return model.double()


def make_optimizer(method: str, model: nn.Module, lr: float, damping: float):
    if method == "gd":
        return torch.optim.SGD(model.parameters(), lr=lr)
    if method in ("ngd", "layer"):
        return ng.NGD(model, lr=lr, damping=damping, loss="mse", fisher_type="type-2",
                      blocks="full" if method == "ngd" else "layer")
    structure = {"btd": "block-tridiagonal", "kfac": "block-diagonal", "unit": "unit-wise"}[method]
    return ng.KFAC(model, lr=lr, damping=damping, loss="mse", structure=structure, fisher_type="type-2",
                   momentum=0.0, kl_clip=None, factor_decay=0.0, factor_update_freq=1, inv_update_freq=1)


def train_step(method: str, model: nn.Module, opt, x, y) -> None:
    opt.zero_grad()
    out = model(x)
    loss = F.mse_loss(out, y)
    if method == "gd":
        loss.backward()
    else:
        opt.backward(loss, out)
    opt.step()


@torch.no_grad()
def full_loss(model: nn.Module, x, y) -> float:
    return F.mse_loss(model(x), y).item()


def ggn_spectrum(model: nn.Module, x) -> np.ndarray:
    """Nonzero eigenvalues of the exact GGN, those of (2 / Z) J J^T (N C x N C), Z = N C."""
    names = [n for n, _ in model.named_parameters()]
    params = tuple(p.detach() for p in model.parameters())
    jac = torch.func.jacrev(lambda *ps: functional_call(model, dict(zip(names, ps)), (x,)).flatten(),
                            argnums=tuple(range(len(params))))(*params)
    J = torch.cat([j.reshape(j.shape[0], -1) for j in jac], dim=1)
    return torch.linalg.eigvalsh(2.0 / J.shape[0] * J @ J.T).numpy()


def first_update(method: str, width: int, damping: float, x, y):
    """(J d, |d|) at the initialisation, d the parameter change of one lr = 1 step (J d: the change
    of the outputs to first order)."""
    model = make_model(width)
    before = [p.detach().clone() for p in model.parameters()]
    opt = make_optimizer(method, model, 1.0, damping)
    train_step(method, model, opt, x, y)
    d = tuple(p.detach() - b for p, b in zip(model.parameters(), before))
    return linearised(model, before, d, x), float(torch.cat([v.flatten() for v in d]).norm())


def linearised(model: nn.Module, at, d, x) -> torch.Tensor:
    """J(at) d, flattened."""
    names = [n for n, _ in model.named_parameters()]
    _, Jd = jvp(lambda *ps: functional_call(model, dict(zip(names, ps)), (x,)), tuple(at), tuple(d))
    return Jd.flatten()


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(a @ b / (a.norm() * b.norm()))


def gain_of(v: torch.Tensor, residual: torch.Tensor) -> float:
    return float(-(v @ residual) / (residual @ residual))


def summarise(upd, residual: torch.Tensor, ngd) -> dict:
    """gain: -<J d, r> / |r|^2, the step's size along the residual in units of exact NGD's (1 for
    NGD: J d = -r once the damping is negligible); the isotropy cos(J d, -r); cos with NGD's J d;
    the parameter step of the gain-matched lr (d / gain) over NGD's, |d| / (gain |d_NGD|): exact
    NGD's step is the least-norm one that moves the outputs by -r, any other is longer."""
    (v, norm), (v_ngd, norm_ngd) = upd, ngd
    gain = gain_of(v, residual)
    return {"gain": gain, "cos_minus_residual": cosine(v, -residual), "cos_ngd": cosine(v, v_ngd),
            "step_norm_ratio_gain_matched": norm / abs(gain) / (norm_ngd / gain_of(v_ngd, residual))}


def run(method: str, width: int, lr: float, damping: float, x, y, steps: int) -> dict:
    model = make_model(width)
    opt = make_optimizer(method, model, lr, damping)
    losses = [full_loss(model, x, y)]
    gains, coss = [], []  # per step while the loss is above TRACK_ABOVE: gain and cos(J d, -r)
    diverged_at = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for t in range(steps):
            before = [p.detach().clone() for p in model.parameters()]
            track = losses[-1] > TRACK_ABOVE * losses[0]
            if track:
                with torch.no_grad():
                    residual = (model(x) - y).flatten()
            train_step(method, model, opt, x, y)
            if track:
                v = linearised(model, before, [p.detach() - b for p, b in zip(model.parameters(), before)], x)
                gains.append(gain_of(v, residual) / lr)
                coss.append(cosine(v, -residual))
            losses.append(full_loss(model, x, y))
            if not math.isfinite(losses[-1]) or losses[-1] > DIVERGED * losses[0]:
                diverged_at = t + 1
                break
            if losses[-1] <= FLOOR * losses[0]:  # float64 rounding from here on: stop
                break
    stopped = len(losses) - 1
    losses += [float("nan")] * (steps + 1 - len(losses))
    return {"lr": lr, "losses": losses, "diverged_at": diverged_at, "steps_run": stopped, "gains": gains,
            "cos_minus_residual": coss, **metrics(losses)}


def metrics(losses) -> dict:
    l0 = losses[0]
    ratios = []
    for a, b in zip(losses[:RATE_STEPS], losses[1:RATE_STEPS + 1]):
        if not (math.isfinite(a) and math.isfinite(b)) or a <= FLOOR * l0:
            break
        ratios.append(b / a)
    hit = next((t for t, v in enumerate(losses) if math.isfinite(v) and v <= TARGET * l0), None)
    finite = [v for v in losses if math.isfinite(v)]
    return {"rate": statistics.median(ratios) if ratios else None, "rate_ratios": len(ratios),
            "first_ratio": ratios[0] if ratios else None,
            "steps_to_target": hit, "final_loss": finite[-1]}


def fmt(v, spec=".3g") -> str:
    return "-" if v is None else format(v, spec)


def status(r: dict) -> str:
    if r["diverged_at"] is not None:
        return f"diverged at step {r['diverged_at']}"
    if r["steps_to_target"] is not None:
        return "converged"
    return f"final/initial {r['final_loss'] / r['losses'][0]:.2g}"


def width_study(width: int, x, y, steps: int) -> dict:
    t0 = time.perf_counter()
    spectrum = ggn_spectrum(make_model(width), x)
    mean_eig = float(spectrum.sum() / len(spectrum))
    damping = DAMPING_REL * mean_eig
    params = sum(p.numel() for p in make_model(width).parameters())

    methods = ["ngd"] + [m for m in APPROX if m != "unit" or width <= UNIT_MAX_WIDTH]

    # function space at the initialisation
    residual = (make_model(width)(x).detach() - y).flatten()
    upd = {m: first_update(m, width, damping, x, y) for m in ["gd"] + methods}
    probe = {m: summarise(u, residual, upd["ngd"]) for m, u in upd.items()}
    sweep = {}
    for rel in DAMPING_SWEEP:
        if rel == DAMPING_REL:
            sweep[str(rel)] = {m: probe[m] for m in methods}
            continue
        ref = first_update("ngd", width, rel * mean_eig, x, y)
        sweep[str(rel)] = {m: summarise(ref if m == "ngd" else first_update(m, width, rel * mean_eig, x, y),
                                        residual, ref) for m in methods}

    grid = {lr: run("gd", width, lr, damping, x, y, steps) for lr in GD_LRS}
    ok = {lr: r for lr, r in grid.items() if r["diverged_at"] is None}
    best = min(ok, key=lambda lr: (ok[lr]["final_loss"], -lr)) if ok else None
    runs = {"gd": {"best": grid[best] if best is not None else None},
            "ngd": {"1": run("ngd", width, 1.0, damping, x, y, steps)}}
    for m in methods[1:]:
        runs[m] = {label: run(m, width, lr, damping, x, y, steps)
                   for label, lr in (("1", 1.0), ("1/L", 1.0 / N_LAYERS), ("1/gain", 1.0 / probe[m]["gain"]))}
        for r in runs[m].values():
            r["predicted_rate"] = (1.0 - r["lr"] * probe[m]["gain"]) ** 2
    runs["ngd"]["1"]["predicted_rate"] = (1.0 - probe["ngd"]["gain"]) ** 2
    return {"width": width, "parameters": params, "damping": damping,
            "ggn_eigenvalues": {"max": float(spectrum.max()), "min": float(spectrum.min()), "mean": mean_eig},
            "gd_grid_final_loss": {str(lr): None if r["diverged_at"] else r["final_loss"] for lr, r in grid.items()},
            "first_update": probe, "damping_sweep": sweep, "runs": runs, "seconds": time.perf_counter() - t0}


def theory_gain(method: str, width: int, n: int, c: int = 1) -> str:
    """The gain the wide-limit argument predicts, given the rank conditions (see the docstring)."""
    if method == "ngd":
        return "1"
    if method == "layer":
        return str(N_LAYERS) if width + 1 >= n * c else "-"
    if method == "kfac":  # last layer exact (gain 1), each hidden layer N (its G and A both full row rank)
        return str(1 + (N_LAYERS - 1) * n) if width >= n * c else "-"
    if method == "unit":  # every unit's block alone fits the residual
        return str((N_LAYERS - 1) * width + c) if width + 1 >= n * c else "-"
    return "-"


def print_tables(result: dict, n: int) -> None:
    print("\nFunction space at the initialisation: the linearised first update J d of each method (lr = 1); "
          "|d|/|d_NGD|: parameter step at lr = 1/gain over NGD's")
    print(f"{'M':>5} {'method':<20} {'gain':>9} {'theory':>7} {'cos(Jd,-r)':>11} {'cos(Jd,Jd_NGD)':>15} "
          f"{'|d|/|d_NGD|':>12}")
    for w in result["widths"]:
        for m, p in w["first_update"].items():
            th = "-" if m == "gd" else theory_gain(m, w["width"], n)
            print(f"{w['width']:>5} {LABELS[m]:<20} {p['gain']:>9.4g} {th:>7} {p['cos_minus_residual']:>11.6f} "
                  f"{p['cos_ngd']:>15.6f} {p['step_norm_ratio_gain_matched']:>12.3g}")
    print("\nDamping sensitivity of the first update: gain (1 - cos(Jd, -r)) at lambda = rel x mean GGN eigenvalue")
    print(f"{'M':>5} {'method':<20} " + " ".join(f"{'rel ' + format(r, 'g'):>20}" for r in DAMPING_SWEEP))
    for w in result["widths"]:
        for m in w["damping_sweep"][str(DAMPING_SWEEP[0])]:
            cells = []
            for r in DAMPING_SWEEP:
                p = w["damping_sweep"][str(r)][m]
                cells.append(f"{p['gain']:>9.4g} ({1 - p['cos_minus_residual']:.1e})")
            print(f"{w['width']:>5} {LABELS[m]:<20} " + " ".join(f"{c:>20}" for c in cells))
    print(f"\nTraining loss, {result['steps']} full-batch steps. rate: median of loss_(t+1)/loss_t over the first "
          f"{RATE_STEPS} steps (while above {FLOOR:g} x initial); pred: (1 - lr gain)^2, its linearised value; "
          f"step 1: loss_1/loss_0; min cos: the least cos(J d_t, -r_t) over the steps (loss above "
          f"{TRACK_ABOVE:g} x initial); steps: to {TARGET:g} x initial")
    print(f"{'M':>5} {'method':<20} {'lr':>7} {'lr value':>9} {'rate':>9} {'pred':>9} {'step 1':>9} {'min cos':>8} "
          f"{'steps':>6} {'final loss':>11}  status")
    for w in result["widths"]:
        for m, by_lr in w["runs"].items():
            for label, r in by_lr.items():
                if r is None:
                    print(f"{w['width']:>5} {LABELS[m]:<20} every lr of the grid diverged")
                    continue
                min_cos = min(r["cos_minus_residual"]) if r["cos_minus_residual"] else None
                print(f"{w['width']:>5} {LABELS[m]:<20} {label:>7} {r['lr']:>9.3g} {fmt(r['rate']):>9} "
                      f"{fmt(r.get('predicted_rate')):>9} {fmt(r['first_ratio']):>9} {fmt(min_cos, '.4f'):>8} "
                      f"{fmt(r['steps_to_target'], 'd'):>6} {r['final_loss']:>11.3g}  {status(r)}")


def plot(result: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    widths = result["widths"]
    cols = min(2, len(widths))
    rows = math.ceil(len(widths) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(7 * cols, 4.8 * rows), squeeze=False)
    for ax, w in zip(axes.flat, widths):
        for m, by_lr in w["runs"].items():
            for label, r in by_lr.items():
                if r is None:
                    continue
                lr_text = {"best": "best lr of the grid", "1": "lr=1", "1/L": f"lr=1/L ({r['lr']:.3g})",
                           "1/gain": "lr=1/gain"}[label]
                ls = {"1": "-", "1/L": "--", "1/gain": ":", "best": "-"}[label]
                lw = 2.6 if m == "ngd" else 1.5
                shown = [min(v, 3e5) for v in r["losses"]]  # a diverged run's last point at the top edge
                ax.semilogy(range(len(shown)), shown, ls, color=COLORS[m], lw=lw,
                            label=f"{LABELS[m]}, {lr_text}", marker="o" if r["diverged_at"] else None,
                            markevery=[r["diverged_at"]] if r["diverged_at"] else None, ms=4)
        ax.set_ylim(1e-30, 1e6)
        gd = w["runs"]["gd"]["best"]
        ax.set_title(f"M = {w['width']} ({w['parameters']} parameters, N = {result['n_points']})"
                     + (f"; GD lr {gd['lr']:g}" if gd else "")
                     + ("" if "unit" in w["runs"] else "; no unit-wise (cost)"), fontsize=10)
        ax.set_xlabel("step")
        ax.set_ylabel("training loss (MSE)")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(widths):]:
        ax.axis("off")
    seen = {}
    for ax in list(axes.flat)[:len(widths)]:
        for h, lab in zip(*ax.get_legend_handles_labels()):
            seen.setdefault(lab, h)
    labels, handles = list(seen), list(seen.values())
    spare = len(widths) < rows * cols
    if spare:
        axes.flat[len(widths)].legend(handles, labels, loc="center", fontsize=9, frameon=False)
    else:
        fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.suptitle("Exact NGD and its approximations on a tanh MLP 64-M-M-1, digits (odd/even), full batch, float64\n"
                 "solid lr = 1, dashed lr = 1/L, dotted lr = 1/gain (gain measured at init); GD: best lr of a grid; "
                 "o: stopped, diverged", fontsize=10)
    common.save_figure(fig, path, rect=(0, 0 if spare else 0.08 + 0.02 * (rows == 1), 1, 0.95))


def strict_json(obj):
    """NaN and infinities as None (null), so that the file is standard JSON."""
    if isinstance(obj, dict):
        return {k: strict_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--widths", default=",".join(map(str, WIDTHS)))
    ap.add_argument("--steps", type=int, default=STEPS)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    torch.set_default_dtype(torch.float64)
    start = time.perf_counter()
    x, y, rank = load_data()
    print(f"digits: N = {N_POINTS}, rank of [x, 1] = {rank}, target +1 odd / -1 even, loss0 per width below")
    result = {"environment": common.environment(), "n_points": N_POINTS, "outputs": 1, "layers": N_LAYERS,
              "input_rank_with_bias": rank, "steps": args.steps, "rate_steps": RATE_STEPS, "floor": FLOOR,
              "target": TARGET, "damping_rel": DAMPING_REL, "gd_lrs": GD_LRS, "widths": []}
    for width in map(int, args.widths.split(",")):
        w = width_study(width, x, y, args.steps)
        result["widths"].append(w)
        e = w["ggn_eigenvalues"]
        print(f"M = {width}: {w['parameters']} parameters, GGN eigenvalues {e['min']:.3g}..{e['max']:.3g} "
              f"(condition {e['max'] / e['min']:.3g}), damping {w['damping']:.3g}, "
              f"initial loss {w['runs']['ngd']['1']['losses'][0]:.4g} ({w['seconds']:.0f} s)")
    print_tables(result, N_POINTS)
    os.makedirs(args.out, exist_ok=True)
    plot(result, os.path.join(args.out, "ngd_family.png"))
    result["seconds"] = time.perf_counter() - start
    common.save_json(os.path.join(args.out, "ngd_family.json"), strict_json(result))
    print(f"total {result['seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
