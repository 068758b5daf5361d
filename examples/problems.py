"""Training problems on scikit-learn's bundled digits (1797 8x8 images; nothing is downloaded), shared
by the main job (examples/train_digits.py) and the training benchmark (bench/bench_training.py).

- "cnn": a small CNN classifier, cross-entropy;
- "autoencoder": Martens and Grosse's deep autoencoder benchmark scaled down to digits,
  64-256-128-32-128-256-64 with tanh, mean squared error.

``train(...)`` runs one optimizer for a number of steps on shuffled minibatches and records the
full training loss every ``eval_every`` steps against steps and against optimizer seconds (the time
of the forward, backward and step only; evaluation is not timed).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
import torch.nn.functional as F
from torch import nn

import natgrad_cuda as ng


@dataclass
class Data:
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits(seed: int = 0, test_fraction: float = 0.2) -> Data:
    """Digits scaled to [0, 1], (N, 1, 8, 8) images and integer labels, a fixed train/test split."""
    from sklearn.datasets import load_digits as sk_digits

    d = sk_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = int(round(test_fraction * len(y)))
    test, train = perm[:n_test], perm[n_test:]
    return Data(x[train], y[train], x[test], y[test])


def make_cnn() -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, stride=2), nn.ReLU(),  # 8x8 -> 4x4
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64), nn.ReLU(),
        nn.Linear(64, 10),
    )


class Residual(nn.Module):
    """x + f(x), then ReLU; f = conv-BN-ReLU-conv-BN, or with ``depthwise`` a depthwise 3x3 conv and a
    pointwise 1x1 conv (a MobileNet-style block)."""

    def __init__(self, c: int, depthwise: bool = False):
        super().__init__()
        first = nn.Conv2d(c, c, 3, padding=1, groups=c if depthwise else 1, bias=False)
        second = nn.Conv2d(c, c, 1 if depthwise else 3, padding=0 if depthwise else 1, bias=False)
        self.f = nn.Sequential(first, nn.BatchNorm2d(c), nn.ReLU(), second, nn.BatchNorm2d(c))

    def forward(self, x):
        return torch.relu(x + self.f(x))


def make_resnet() -> nn.Module:
    """A small ResNet for 8x8 digits: stem, two residual blocks (one depthwise), a strided stage,
    global average pooling, a linear head. Every parameter is in a layer K-FAC covers."""
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        Residual(16), Residual(16, depthwise=True),
        nn.Conv2d(16, 32, 3, padding=1, stride=2, bias=False), nn.BatchNorm2d(32), nn.ReLU(),  # 8x8 -> 4x4
        Residual(32),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )


def make_autoencoder() -> nn.Module:
    sizes = [64, 256, 128, 32, 128, 256, 64]
    layers: List[nn.Module] = [nn.Flatten()]
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2:
            layers.append(nn.Tanh())
    return nn.Sequential(*layers)


@dataclass
class Problem:
    name: str
    make_model: Callable[[], nn.Module]
    loss: str  # natgrad_cuda's loss name
    target_loss: float  # full training loss that counts as "reached"
    fine_target: float  # a lower one, where curvature matters more than the first steps' descent
    steps: int
    batch_size: int = 128
    reconstruct: bool = False  # "mse" against the flattened inputs (an autoencoder), not the labels

    def loss_fn(self, out: torch.Tensor, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if self.loss == "cross_entropy":
            return F.cross_entropy(out, y)
        if self.loss == "bce":
            return F.binary_cross_entropy_with_logits(out, y)
        return F.mse_loss(out, x.flatten(1) if self.reconstruct else y)


PROBLEMS: Dict[str, Problem] = {
    "cnn": Problem("cnn", make_cnn, "cross_entropy", target_loss=0.05, fine_target=0.005, steps=300),
    "resnet": Problem("resnet", make_resnet, "cross_entropy", target_loss=0.05, fine_target=0.005, steps=300),
    # 1600 steps: tuned Adam needs about 1500 to reach the fine target
    "autoencoder": Problem("autoencoder", make_autoencoder, "mse", target_loss=0.01, fine_target=0.002, steps=1600,
                           reconstruct=True),
}

# Learning-rate grids; each optimizer's best is the one that reaches the fine target in the fewest
# steps, then the target (ties, and runs that reach neither: the lowest final loss). SGD uses momentum 0.9.
# "kfac-adaptive" (KFAC(adaptive_step=True): step length and momentum from the exact quadratic model)
# has no learning rate; its grid is over the damping.
LR_GRIDS = {
    "cnn": {"sgd": [0.03, 0.1, 0.3], "adam": [1e-3, 3e-3, 1e-2, 3e-2], "kfac": [0.03, 0.1, 0.3, 1.0],
            "kfac-adaptive": [1e-3, 1e-2, 1e-1]},
    "autoencoder": {"sgd": [0.3, 1.0, 3.0, 10.0], "adam": [1e-3, 3e-3, 1e-2], "kfac": [0.03, 0.1, 0.3, 1.0],
                    "kfac-adaptive": [3e-4, 1e-3, 1e-2]},
    "resnet": {"sgd": [0.03, 0.1, 0.3], "adam": [1e-3, 3e-3, 1e-2, 3e-2], "kfac": [0.01, 0.03, 0.1, 0.3],
               "kfac-adaptive": [1e-3, 1e-2, 1e-1]},
}
GRID_PARAM = {"sgd": "lr", "adam": "lr", "kfac": "lr", "kfac-adaptive": "damping"}
OPTIMIZERS = ("sgd", "adam", "kfac", "kfac-adaptive")


def make_optimizer(kind: str, model: nn.Module, lr: float, problem: Problem, **kfac_kwargs):
    if kind == "sgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)
    if kind == "adam":
        return torch.optim.Adam(model.parameters(), lr=lr)
    if kind == "kfac":
        return ng.KFAC(model, lr=lr, loss=problem.loss, seed=0, **kfac_kwargs)
    if kind == "kfac-adaptive":  # ``lr`` is the grid value: the damping
        return ng.KFAC(model, damping=lr, adaptive_step=True, loss=problem.loss, seed=0, **kfac_kwargs)
    raise ValueError(f"unknown optimizer {kind!r}")


@dataclass
class Run:
    kind: str
    lr: float
    steps: List[int] = field(default_factory=list)
    seconds: List[float] = field(default_factory=list)
    train_loss: List[float] = field(default_factory=list)
    test_accuracy: Optional[float] = None
    diverged: bool = False

    @property
    def final_loss(self) -> float:
        return self.train_loss[-1] if self.train_loss and not self.diverged else math.inf

    def reached(self, target: float):
        """(steps, seconds) at the first evaluation at or below ``target``, or (None, None)."""
        for s, t, loss in zip(self.steps, self.seconds, self.train_loss):
            if loss <= target:
                return s, t
        return None, None

    def to_json(self) -> dict:
        return {"kind": self.kind, "lr": self.lr, "steps": self.steps, "seconds": self.seconds,
                "train_loss": self.train_loss, "test_accuracy": self.test_accuracy, "diverged": self.diverged}


@torch.no_grad()
def full_loss(problem: Problem, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float(problem.loss_fn(model(x), x, y))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((model(x).argmax(1) == y).float().mean())


def train_step(problem: Problem, kind: str, model: nn.Module, opt, x: torch.Tensor, y: torch.Tensor,
               closure: bool = False) -> None:
    """One optimizer step on (x, y); K-FAC through opt.backward, with a closure for LM damping."""
    opt.zero_grad()
    out = model(x)
    loss = problem.loss_fn(out, x, y)
    if kind.startswith("kfac"):
        opt.backward(loss, out)
    else:
        loss.backward()
    if closure:
        opt.step(lambda: problem.loss_fn(model(x), x, y))
    else:
        opt.step()


def train(problem: Problem, kind: str, lr: float, data: Data, *, seed: int = 0, steps: Optional[int] = None,
          eval_every: int = 5, progress=None, **kfac_kwargs) -> Run:
    """Train a fresh model (initialised from ``seed``) with one optimizer; minibatches reshuffled
    every epoch from a generator seeded alike, so every optimizer sees the same batches."""
    steps = steps or problem.steps
    torch.manual_seed(seed)
    model = problem.make_model()
    opt = make_optimizer(kind, model, lr, problem, **kfac_kwargs)
    gen = torch.Generator().manual_seed(seed + 1)
    n = len(data.y_train)
    run = Run(kind, lr)
    elapsed, order, pos = 0.0, torch.randperm(n, generator=gen), 0

    def record(step):
        loss = full_loss(problem, model, data.x_train, data.y_train)
        run.steps.append(step), run.seconds.append(elapsed), run.train_loss.append(loss)
        return loss

    record(0)
    for step in range(1, steps + 1):
        if pos + problem.batch_size > n:
            order, pos = torch.randperm(n, generator=gen), 0
        idx = order[pos:pos + problem.batch_size]
        pos += problem.batch_size
        x, y = data.x_train[idx], data.y_train[idx]
        t0 = time.perf_counter()
        train_step(problem, kind, model, opt, x, y, closure=bool(kfac_kwargs.get("adapt_damping")))
        elapsed += time.perf_counter() - t0
        if progress is not None:
            progress.update(1)
        if step % eval_every == 0 or step == steps:
            value = record(step)
            if not math.isfinite(value) or value > 1e3:
                run.diverged = True
                if progress is not None:
                    progress.update(steps - step)
                break
    if problem.loss == "cross_entropy":
        run.test_accuracy = accuracy(model, data.x_test, data.y_test)
    return run


def rank_key(run: Run, problem: Problem):
    steps = [run.reached(t)[0] for t in (problem.fine_target, problem.target_loss)]
    return tuple(s if s is not None else math.inf for s in steps) + (run.final_loss,)


def grid_search(problem: Problem, kind: str, data: Data, *, lrs=None, progress=None, **kfac_kwargs):
    """Every learning rate of the grid; returns (best run, all runs)."""
    lrs = lrs or LR_GRIDS[problem.name][kind]
    runs = [train(problem, kind, lr, data, progress=progress, **(kfac_kwargs if kind.startswith("kfac") else {}))
            for lr in lrs]
    return min(runs, key=lambda r: rank_key(r, problem)), runs


def summary_row(problem: Problem, run: Run) -> dict:
    steps, seconds = run.reached(problem.target_loss)
    fine_steps, fine_seconds = run.reached(problem.fine_target)
    last = run.steps[-1] if run.steps else 0
    return {"optimizer": run.kind, "setting": f"{GRID_PARAM[run.kind]} {run.lr:g}", "lr": run.lr, "final_train_loss": run.final_loss,
            "test_accuracy": run.test_accuracy, "wall_seconds": run.seconds[-1] if run.seconds else None,
            "ms_per_step": 1000 * run.seconds[-1] / last if last else None,
            "steps_to_target": steps, "seconds_to_target": seconds,
            "steps_to_fine_target": fine_steps, "seconds_to_fine_target": fine_seconds}


def format_table(problem: Problem, rows: List[dict]) -> str:
    t, f = problem.target_loss, problem.fine_target
    head = (f"| optimizer | best setting | final train loss | test acc | wall s | ms/step | steps to {t:g} "
            f"| s to {t:g} | steps to {f:g} | s to {f:g} |")
    lines = [head, "|" + "---|" * 10]
    fmt = lambda v, f: "-" if v is None else format(v, f)  # noqa: E731
    for r in rows:
        lines.append(f"| {r['optimizer']} | {r['setting']} | {r['final_train_loss']:.4f} | "
                     f"{fmt(r['test_accuracy'], '.3f')} | {r['wall_seconds']:.2f} | {r['ms_per_step']:.2f} | "
                     f"{fmt(r['steps_to_target'], 'd')} | {fmt(r['seconds_to_target'], '.2f')} | "
                     f"{fmt(r['steps_to_fine_target'], 'd')} | {fmt(r['seconds_to_fine_target'], '.2f')} |")
    return "\n".join(lines)


def plot_runs(axes_steps, axes_seconds, problem: Problem, runs: List[Run]) -> None:
    for run in runs:
        label = f"{run.kind} ({GRID_PARAM[run.kind]} {run.lr:g})"
        axes_steps.semilogy(run.steps, run.train_loss, label=label)
        axes_seconds.semilogy(run.seconds, run.train_loss, label=label)
    for ax, xlabel in ((axes_steps, "steps"), (axes_seconds, "optimizer seconds")):
        for target in (problem.target_loss, problem.fine_target):
            ax.axhline(target, color="gray", linestyle=":", linewidth=1)
        ax.set_xlabel(xlabel)
        ax.set_ylabel("training loss")
        ax.set_title(f"{problem.name}: loss against {xlabel}")
        ax.legend()
