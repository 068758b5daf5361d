"""Shared helpers for the benchmarks: side-by-side timing and output. GPU time estimates are
bench/gpu_cost_model.py's."""
from __future__ import annotations

import json
import os
import statistics
import time
from typing import Callable, Dict, List

import torch


def interleaved(fns: Dict[str, Callable[[], None]], reps: int, warmup: int = 2) -> Dict[str, List[float]]:
    """Runs the functions round-robin (A B A B ...) so that machine noise hits them alike; seconds per call."""
    for _ in range(warmup):
        for f in fns.values():
            f()
    times = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append(time.perf_counter() - t0)
    return times


def summary(samples: List[float]) -> dict:
    q = statistics.quantiles(samples, n=4) if len(samples) >= 4 else [min(samples), statistics.median(samples), max(samples)]
    return {"median": statistics.median(samples), "q1": q[0], "q3": q[2], "n": len(samples)}


def ratio_summary(num: List[float], den: List[float]) -> dict:
    """Per-repetition ratios of two interleaved series: median and spread."""
    r = [a / b for a, b in zip(num, den)]
    return summary(r)


def environment() -> dict:
    import natgrad_cuda as ng

    return {"torch": torch.__version__, "threads": torch.get_num_threads(), "cpu_count": os.cpu_count(),
            "natgrad_cuda": ng.build_info()}


def save_json(path: str, payload: dict) -> None:
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with open(path, "w") as fh:
        json.dump(payload, fh, indent=2)
    print(f"saved {path}")


def save_figure(fig, path: str, **tight) -> None:
    """A matplotlib figure laid out (``tight``: tight_layout's arguments), saved and closed."""
    import matplotlib.pyplot as plt

    fig.tight_layout(**tight)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    print(f"saved {path}")
