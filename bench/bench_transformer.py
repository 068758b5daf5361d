"""Character-level transformer language model on Python's own standard-library sources: AdamW against
KFAC and KFACPreconditioner in front of AdamW.

Data: the text of a fixed list of standard-library modules (STDLIB, read from this Python's own
library; nothing is downloaded), characters mapped to a 98-symbol vocabulary (printable ASCII,
newline, tab, one symbol for everything else). Train on the first 90% of their concatenation,
held-out loss on the last 10% (fixed batches). Model: token and position nn.Embedding, 2
nn.TransformerEncoderLayer (width 128, 4 heads, feed-forward 256, pre-norm, no dropout) with a
causal mask, nn.LayerNorm, nn.Linear head; context 64, batch 32; every parameter is covered by
K-FAC (the run checks).

Each optimizer runs every point of its grid (GRIDS) from the same initialisation and minibatches;
the best point by final held-out loss is its result. Target: tuned AdamW's final held-out loss;
reported: the steps each K-FAC variant needs to reach it (held-out loss evaluated every EVAL steps)
as a fraction of AdamW's; the chosen points again with two other minibatch orders (the spread);
seconds per step side by side (blocks of 10 steps, optimizers round-robin, median of per-repetition
ratios), with the step split into forward, backward (with K-FAC's curvature pass) and optimizer
step. Prints tables; saves bench/results/transformer.{json,png}.

    python bench/bench_transformer.py [--steps 400] [--reps 5]
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import sysconfig
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

import natgrad_cuda as ng  # noqa: E402

# A fixed selection of pure-Python standard-library modules (present in every CPython 3.11+).
STDLIB = ["argparse.py", "ast.py", "calendar.py", "collections/__init__.py", "configparser.py", "csv.py",
          "dataclasses.py", "difflib.py", "enum.py", "fractions.py", "functools.py", "inspect.py",
          "json/decoder.py", "json/encoder.py", "logging/__init__.py", "pathlib.py", "pprint.py", "random.py",
          "shutil.py", "statistics.py", "string.py", "textwrap.py", "threading.py", "typing.py"]
CONTEXT, BATCH, WIDTH, HEADS, FF, LAYERS = 64, 32, 128, 4, 256, 2
EVAL = 10
HELDOUT_BATCHES = 8
VOCAB = 98

# KFAC's KL clip is 1e-2 (at the default 3e-4 it binds so hard that every lr gives the same run);
# the preconditioner feeds AdamW, which normalises the step itself, so its clip is off. Both refresh
# the factors every step and the inverses every 5 (the defaults are 3 and 10): a transformer's
# curvature moves fast early on, and the steps saved are worth the dearer step here.
FREQ = dict(factor_update_freq=1, inv_update_freq=5)
GRIDS = {
    "adamw": [dict(lr=lr, weight_decay=wd) for lr in (2e-3, 4e-3, 8e-3) for wd in (0.01, 0.1)],
    "kfac": [dict(lr=lr, damping=d, kl_clip=1e-2, **FREQ) for lr in (0.1, 0.3) for d in (3e-3, 1e-2, 3e-2)],
    "kfac+adamw": [dict(lr=lr, damping=d, kl_clip=None, **FREQ) for lr in (2e-3, 4e-3) for d in (1e-3, 3e-3, 1e-2)],
}
SEEDS = (1, 2)  # the chosen points again, with other minibatch orders: the spread of the result


def encode(text: str) -> torch.Tensor:
    """Characters -> ids: printable ASCII 32..126 -> 0..94, newline 95, tab 96, anything else 97."""
    ids = []
    for ch in text:
        o = ord(ch)
        ids.append(o - 32 if 32 <= o < 127 else 95 if ch == "\n" else 96 if ch == "\t" else 97)
    return torch.tensor(ids, dtype=torch.long)


def load_text() -> tuple:
    root = sysconfig.get_paths()["stdlib"]
    parts = []
    for rel in STDLIB:
        with open(os.path.join(root, rel), encoding="utf-8") as fh:
            parts.append(fh.read())
    ids = encode("\n".join(parts))
    cut = int(0.9 * len(ids))
    return ids[:cut], ids[cut:]


def batch(ids: torch.Tensor, starts: torch.Tensor):
    rows = torch.stack([ids[s:s + CONTEXT + 1] for s in starts.tolist()])
    return rows[:, :-1], rows[:, 1:]


class CharLM(nn.Module):
    def __init__(self):
        super().__init__()
        self.tok = nn.Embedding(VOCAB, WIDTH)
        self.pos = nn.Embedding(CONTEXT, WIDTH)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(WIDTH, HEADS, FF, dropout=0.0, batch_first=True, norm_first=True)
            for _ in range(LAYERS))
        self.norm = nn.LayerNorm(WIDTH)
        self.head = nn.Linear(WIDTH, VOCAB)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(CONTEXT), persistent=False)

    def forward(self, ids):
        T = ids.shape[1]
        h = self.tok(ids) + self.pos(torch.arange(T, device=ids.device))
        for block in self.blocks:
            h = block(h, src_mask=self.mask[:T, :T], is_causal=True)
        return self.head(self.norm(h))  # (B, T, V)


def lm_loss(out, y):
    return F.cross_entropy(out.reshape(-1, VOCAB), y.reshape(-1))


class Runner:
    """One optimizer at one grid point on a fresh copy of the initial model."""

    def __init__(self, kind: str, hp: dict, init: dict):
        self.kind = kind
        self.model = CharLM()
        self.model.load_state_dict(init)
        if kind == "adamw":
            self.opt, self.pre = torch.optim.AdamW(self.model.parameters(), **hp), None
        elif kind == "kfac":
            self.opt, self.pre = ng.KFAC(self.model, loss="cross_entropy", seed=0, **hp), None
        else:  # K-FAC directions into AdamW; the preconditioner's lr (its KL clip's) is AdamW's
            rest = {k: v for k, v in hp.items() if k not in ("weight_decay",)}
            self.opt = torch.optim.AdamW(self.model.parameters(), lr=hp["lr"], weight_decay=hp.get("weight_decay", 0.01))
            self.pre = ng.KFACPreconditioner(self.model, loss="cross_entropy", seed=0, **rest)
        self.kfac = self.pre if self.pre is not None else (self.opt if kind == "kfac" else None)
        self.parts = {"forward": 0.0, "backward": 0.0, "step": 0.0, "n": 0}

    def step(self, x, y) -> float:
        t0 = time.perf_counter()
        self.opt.zero_grad(set_to_none=True)
        out = self.model(x)
        loss = lm_loss(out, y)
        t1 = time.perf_counter()
        if self.kfac is not None:
            self.kfac.backward(loss, out)
        else:
            loss.backward()
        t2 = time.perf_counter()
        if self.pre is not None:
            self.pre.step()
        self.opt.step()
        t3 = time.perf_counter()
        p = self.parts
        p["forward"] += t1 - t0
        p["backward"] += t2 - t1
        p["step"] += t3 - t2
        p["n"] += 1
        return float(loss.detach())


@torch.no_grad()
def heldout_loss(model, held) -> float:
    return sum(float(lm_loss(model(x), y)) for x, y in held) / len(held)


def train(kind, hp, init, train_ids, held, steps, seed=0) -> dict:
    runner = Runner(kind, hp, init)
    gen = torch.Generator().manual_seed(seed)
    curve, t_train = [(0, heldout_loss(runner.model, held), 0.0)], 0.0
    for step in range(1, steps + 1):
        starts = torch.randint(0, len(train_ids) - CONTEXT - 1, (BATCH,), generator=gen)
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # K-FAC's skipped-step notes of a diverging run
                loss = runner.step(*batch(train_ids, starts))
        except RuntimeError:  # K-FAC gave up after max_consecutive_skips skipped steps: diverged
            break
        t_train += time.perf_counter() - t0
        if not math.isfinite(loss):
            break
        if step % EVAL == 0:
            curve.append((step, heldout_loss(runner.model, held), t_train))
    return {"hp": hp, "curve": curve, "final": curve[-1][1] if curve[-1][0] == steps else float("inf")}


def steps_to(curve, target: float):
    return next((s for s, loss, _ in curve if loss <= target), None)


def step_times(best: dict, init, train_ids, reps: int) -> dict:
    """Seconds per step at each optimizer's chosen point: blocks of 10 steps, round-robin."""
    runners = {kind: Runner(kind, best[kind]["hp"], init) for kind in best}
    gen = torch.Generator().manual_seed(1)
    batches = [batch(train_ids, torch.randint(0, len(train_ids) - CONTEXT - 1, (BATCH,), generator=gen))
               for _ in range(10)]

    def block(r):
        return lambda: [r.step(x, y) for x, y in batches]

    for r in runners.values():  # the profile of the timed blocks only
        block(r)()
        r.parts = {"forward": 0.0, "backward": 0.0, "step": 0.0, "n": 0}
    times = common.interleaved({k: block(r) for k, r in runners.items()}, reps=reps, warmup=0)
    out = {}
    for kind, r in runners.items():
        n = r.parts["n"]
        out[kind] = {"ms_per_step": 1000 * common.summary(times[kind])["median"] / 10,
                     "ratio_to_adamw": common.ratio_summary(times[kind], times["adamw"])["median"],
                     "ms_parts": {k: 1000 * r.parts[k] / n for k in ("forward", "backward", "step")}}
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    train_ids, held_ids = load_text()
    gen = torch.Generator().manual_seed(123)
    held = [batch(held_ids, torch.randint(0, len(held_ids) - CONTEXT - 1, (BATCH,), generator=gen))
            for _ in range(HELDOUT_BATCHES)]
    init = CharLM().state_dict()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # every parameter covered: no construction warning
        kfac = ng.KFAC(CharLM(), loss="cross_entropy")
    covered_params = {id(p): p for layer in kfac._engine.layers for p in (layer.weight, layer.bias) if p is not None}
    covered = sum(p.numel() for p in covered_params.values())  # the q, k, v projections share in_proj_weight
    total = sum(p.numel() for p in kfac._engine.model.parameters())
    print(f"text: {len(train_ids)} train / {len(held_ids)} held-out characters from {len(STDLIB)} stdlib modules; "
          f"model: {total} parameters, {covered} covered by K-FAC in {len(kfac._engine.layers)} layers")

    runs, best = {}, {}
    for kind, grid in GRIDS.items():
        runs[kind] = []
        for hp in grid:
            t0 = time.perf_counter()
            r = train(kind, hp, init, train_ids, held, args.steps)
            runs[kind].append(r)
            print(f"  {kind:11s} {hp}: final held-out {r['final']:.4f} ({time.perf_counter() - t0:.0f} s)")
        best[kind] = min(runs[kind], key=lambda r: r["final"])
    target = best["adamw"]["final"]
    adamw_steps = steps_to(best["adamw"]["curve"], target)
    print(f"\ntarget: tuned AdamW's final held-out loss {target:.4f} (at step {adamw_steps})")
    rows = {}
    for kind, r in best.items():
        s = steps_to(r["curve"], target)
        rows[kind] = {"hp": r["hp"], "final_heldout": r["final"], "steps_to_target": s,
                      "fraction_of_adamw_steps": None if s is None else s / adamw_steps}
        print(f"  {kind:11s} {r['hp']}: final {r['final']:.4f}, steps to target {s}"
              + ("" if s is None else f" ({s / adamw_steps:.2f} of AdamW's)"))
    spread = {}
    for seed in SEEDS:  # the same points, other minibatches; the target is AdamW's final with them
        again = {kind: train(kind, best[kind]["hp"], init, train_ids, held, args.steps, seed=seed) for kind in best}
        t = again["adamw"]["final"]
        base = steps_to(again["adamw"]["curve"], t)
        spread[seed] = {kind: {"final_heldout": r["final"], "steps_to_target": steps_to(r["curve"], t),
                               "fraction_of_adamw_steps": None if steps_to(r["curve"], t) is None
                               else steps_to(r["curve"], t) / base} for kind, r in again.items()}
        print(f"minibatch seed {seed}: target {t:.4f}; " + ", ".join(
            f"{kind} {v['final_heldout']:.4f} ({v['fraction_of_adamw_steps']})" for kind, v in spread[seed].items()))
    times = step_times(best, init, train_ids, args.reps)
    print("\nseconds per step, side by side (median of per-repetition ratios to AdamW):")
    for kind, t in times.items():
        parts = ", ".join(f"{k} {v:.1f}" for k, v in t["ms_parts"].items())
        print(f"  {kind:11s} {t['ms_per_step']:.1f} ms/step, {t['ratio_to_adamw']:.2f}x AdamW ({parts} ms)")
    result = {"env": common.environment(), "stdlib_files": STDLIB, "steps": args.steps, "eval_every": EVAL,
              "model": {"parameters": total, "kfac_covered": covered, "context": CONTEXT, "batch": BATCH,
                        "width": WIDTH, "layers": LAYERS},
              "target": target, "best": rows, "other_seeds": spread, "runs": runs, "step_times": times}
    common.save_json(os.path.join(args.out, "transformer.json"), result)
    plot(best, os.path.join(args.out, "transformer.png"))
    return result


def plot(best: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for kind, r in best.items():
        steps, losses, secs = zip(*r["curve"])
        axes[0].plot(steps, losses, label=f"{kind} {r['hp']}")
        axes[1].plot(secs, losses, label=kind)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("seconds (training only)")
    for ax in axes:
        ax.set_ylabel("held-out loss (nats/char)")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"saved {path}")


if __name__ == "__main__":
    main()
