"""K-FAC against the exact GGN of a small network trained on scikit-learn's digits.

Trains a small MLP for a few hundred Adam steps (so the curvature is that of a useful model), then
computes, in float64, the exact generalized Gauss-Newton matrix and the K-FAC approximations of it
(type-2, Monte Carlo, empirical; expand), and reports how close each layer block is. Saves a heat
map (PNG) of the GGN, its K-FAC approximation and their difference, and the figures as JSON.

    python examples/curvature_digits.py [--out outputs] [--hidden 16] [--steps 300]
"""
from __future__ import annotations

import argparse
import json
import os
import time

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from sklearn.datasets import load_digits  # noqa: E402
from torch import nn  # noqa: E402

import natgrad_cuda as ng  # noqa: E402


def load_data(dtype):
    X, y = load_digits(return_X_y=True)
    X = torch.tensor(X / 16.0, dtype=dtype)
    return X, torch.tensor(y)


def block_slices(model):
    """Parameter index ranges of each Linear layer (weight and bias) in model.parameters() order."""
    out, start = {}, 0
    for name, module in model.named_modules():
        if isinstance(module, nn.Linear):
            size = sum(p.numel() for p in module.parameters(recurse=False))
            out[name] = slice(start, start + size)
            start += size
    return out


def rel(a, b):
    return float(torch.linalg.norm(a - b) / torch.linalg.norm(b))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="outputs", help="folder for the PNG and JSON (default: outputs)")
    parser.add_argument("--hidden", type=int, default=16, help="hidden width of the MLP (default 16)")
    parser.add_argument("--steps", type=int, default=300, help="Adam steps before measuring (default 300)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    torch.manual_seed(args.seed)

    X, y = load_data(torch.float64)
    model = nn.Sequential(nn.Linear(64, args.hidden), nn.Tanh(), nn.Linear(args.hidden, 10)).double()
    loss_fn = nn.CrossEntropyLoss()
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(args.steps):
        opt.zero_grad()
        loss = loss_fn(model(X), y)
        loss.backward()
        opt.step()
    accuracy = float((model(X).argmax(1) == y).double().mean())
    print(f"MLP 64-{args.hidden}-10 on digits ({len(X)} images): loss {loss.item():.4f}, "
          f"train accuracy {accuracy:.3f} after {args.steps} Adam steps")

    # Several batches of different sizes: the curvature layer must give the one-batch result.
    batches = [(X[i:i + 500], y[i:i + 500]) for i in range(0, len(X), 500)]
    t0 = time.perf_counter()
    ggn = ng.curvature.ggn(model, loss_fn, batches)
    t_ggn = time.perf_counter() - t0
    approximations = {}
    for fisher_type, kwargs in [("type-2", {}), ("mc", {"mc_samples": 16, "seed": args.seed}), ("empirical", {})]:
        t0 = time.perf_counter()
        f = ng.curvature.kfac(model, loss_fn, batches, fisher_type=fisher_type, **kwargs)
        approximations[fisher_type] = (f.dense(), time.perf_counter() - t0)

    slices = block_slices(model)
    report = {"model": f"MLP 64-{args.hidden}-10, tanh", "data": "sklearn digits", "n": len(X),
              "train_loss": loss.item(), "parameters": ggn.shape[0], "seconds_ggn": t_ggn, "kfac": {}}
    print(f"\nexact GGN: {ggn.shape[0]} x {ggn.shape[0]} in {t_ggn:.2f} s\n")
    header = f"{'K-FAC fisher type':<18}{'seconds':>9}" + "".join(f"{'rel.err ' + n:>14}" for n in slices) + f"{'cos (blocks)':>14}"
    print(header)
    print("-" * len(header))
    for fisher_type, (dense, seconds) in approximations.items():
        errors = {n: rel(dense[s, s], ggn[s, s]) for n, s in slices.items()}
        diag = torch.block_diag(*[ggn[s, s] for s in slices.values()])
        cos = float((dense * diag).sum() / (dense.norm() * diag.norm()))
        report["kfac"][fisher_type] = {"seconds": seconds, "relative_error_per_layer": errors, "cosine_block_diagonal": cos}
        print(f"{fisher_type:<18}{seconds:>9.3f}" + "".join(f"{e:>14.4f}" for e in errors.values()) + f"{cos:>14.4f}")
    print("\nrelative error = ||K-FAC block - GGN block||_F / ||GGN block||_F per layer (weight and bias);")
    print("cos = cosine similarity of K-FAC with the GGN's block diagonal (1 = same up to scale)")

    dense = approximations["type-2"][0]
    fig, axes = plt.subplots(1, 3, figsize=(16, 5.4))
    floor = 1e-8 * float(ggn.abs().max())
    vmin, vmax = np.log10(floor), np.log10(float(ggn.abs().max()))
    panels = [(ggn, "exact GGN"), (dense, "K-FAC (type-2, expand)"), (dense - ggn, "K-FAC - GGN")]
    for ax, (m, title) in zip(axes, panels):
        im = ax.imshow(np.log10(m.abs().clamp_min(floor).numpy()), vmin=vmin, vmax=vmax, cmap="magma",
                       interpolation="nearest")
        ax.set_title(title)
        for s in slices.values():
            for edge in (s.start, s.stop):
                ax.axhline(edge - 0.5, color="cyan", lw=0.4)
                ax.axvline(edge - 0.5, color="cyan", lw=0.4)
    fig.colorbar(im, ax=axes, shrink=0.8, label="log10 |entry|")
    fig.suptitle(f"Curvature of an MLP 64-{args.hidden}-10 on digits ({ggn.shape[0]} parameters; cyan: layer blocks)")
    png = os.path.join(args.out, "curvature_digits.png")
    fig.savefig(png, dpi=110, bbox_inches="tight")
    with open(os.path.join(args.out, "curvature_digits.json"), "w") as fh:
        json.dump(report, fh, indent=2)
    print(f"\nsaved {png} and {os.path.join(args.out, 'curvature_digits.json')}")


if __name__ == "__main__":
    main()
