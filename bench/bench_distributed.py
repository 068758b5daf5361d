"""Data-parallel K-FAC on gloo: bytes per step by phase for each inverse sharing, inverse memory per
process, and step time against the number of processes; with a paper estimate for 8 and 64 GPUs.

    .venv/bin/python bench/bench_distributed.py [--steps 30] [--worlds 1,2]

The model is the MLP autoencoder of bench/ (64-256-128-32-128-256-64, MSE) on scikit-learn's digits,
global batch 128, KFAC with its defaults (factors every 3 steps, inverses every 10). Each
configuration runs in its own group of processes (gloo, one thread each), all from the same start on
the same global batches. Figures:

- bytes: what each process hands to all-reduce per step, averaged over the run, by phase: the factor
  sums (on factor-update steps), the eigendecompositions (inverse-update steps, "eigenbases"), the
  directions (every step, "directions"), the gradients (DDP's own all-reduce, counted from the
  gradients' size, every step). A ring all-reduce of n bytes sends 2 (W - 1) / W n from each process.
- inverse memory: the bytes of eigenvectors and eigenvalues one process holds.
- step time: median over the steps after the first inverse update, per process count. On this
  2-core machine 2 processes share the cores with nothing else only if the machine is idle: the
  figures say how many cores there were.

The 8- and 64-GPU figures are estimates, not measurements: the measured bytes per step of each
phase through NCCL ring all-reduce at an assumed bus bandwidth (8 GPUs in one node over NVLink:
300 GB/s; 64 GPUs in 8 nodes over 400 Gb/s InfiniBand per GPU: 40 GB/s), plus 20 us per collective.
Saves bench/results/distributed.json.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
WIDTHS = [64, 256, 128, 32, 128, 256, 64]
GLOBAL_BATCH = 128
NVLINK_BUS_BYTES_PER_S = 300e9  # assumed NCCL all-reduce bus bandwidth, 8 GPUs, one node
IB_BUS_BYTES_PER_S = 40e9  # assumed, 64 GPUs over 400 Gb/s InfiniBand per GPU
COLLECTIVE_SECONDS = 20e-6


def worker(rank: int, world: int, port: str, sharing: str, steps: int, out: str) -> None:
    import torch.distributed as dist
    import torch.nn.functional as F
    from sklearn.datasets import load_digits
    from torch import nn

    import natgrad_cuda as ng

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.manual_seed(0)
    layers = []
    for i, (a, b) in enumerate(zip(WIDTHS[:-1], WIDTHS[1:])):
        layers += [nn.Linear(a, b)] + ([nn.Tanh()] if i < len(WIDTHS) - 2 else [])
    model = nn.Sequential(*layers)
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = ng.KFAC(net, loss="mse", inverse_sharing=sharing, seed=0)
    x = torch.tensor(load_digits().data / 16.0, dtype=torch.float32)
    per = GLOBAL_BATCH // world
    times = []
    for t in range(steps):
        lo = (t * GLOBAL_BATCH) % (len(x) - GLOBAL_BATCH)
        xs = x[lo + rank * per: lo + (rank + 1) * per]
        dist.barrier()
        t0 = time.perf_counter()
        opt.zero_grad()
        pred = net(xs)
        loss = F.mse_loss(pred, xs)
        opt.backward(loss, pred)
        opt.step()
        times.append(time.perf_counter() - t0)
    state = opt._engine.state
    inverse_bytes = sum(v.numel() * v.element_size() for st in state.values() for k, v in st.items()
                        if k[0] in "Qd")
    sent = dict(opt._engine.dist.sent_bytes) if opt._engine.dist is not None else {}
    sent["gradients (DDP)"] = (sum(p.numel() * p.element_size() for p in model.parameters()) * steps
                               if world > 1 else 0)
    result = {"times": times, "sent": sent, "inverse_bytes": inverse_bytes, "steps": steps}
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def spawn(world: int, sharing: str, steps: int) -> list:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = str(s.getsockname()[1])
    with tempfile.TemporaryDirectory() as out:
        procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(r), str(world), port, sharing, str(steps),
                                   out]) for r in range(world)]
        for p in procs:
            if p.wait(timeout=600) != 0:
                raise SystemExit(f"a worker failed ({world} processes, {sharing})")
        return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(world)]


def estimate(per_step: dict, world: int, bus: float) -> float:
    """Seconds of communication per step for ``world`` GPUs: ring all-reduce of each phase's bytes."""
    total = sum(per_step.values())
    calls = sum(1 for v in per_step.values() if v)
    return 2 * (world - 1) / world * total / bus + calls * COLLECTIVE_SECONDS


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--worlds", default="1,2")
    ap.add_argument("--worker", nargs=6)
    args = ap.parse_args()
    if args.worker:
        rank, world, port, sharing, steps, out = args.worker
        worker(int(rank), int(world), port, sharing, int(steps), out)
        return
    worlds = [int(w) for w in args.worlds.split(",")]
    rows = []
    for world in worlds:
        for sharing in (("eigenbases",) if world == 1 else ("eigenbases", "directions")):
            results = spawn(world, sharing, args.steps)
            r0 = results[0]
            steady = [max(r["times"][t] for r in results) for t in range(11, args.steps)]  # after the first inverses
            per_step = {k: v / args.steps for k, v in r0["sent"].items() if v}
            rows.append({
                "processes": world, "inverse_sharing": sharing,
                "step_ms_median": 1e3 * statistics.median(steady),
                "step_ms_q1_q3": [1e3 * q for q in statistics.quantiles(steady, n=4)[::2]],
                "bytes_per_step": per_step,
                "inverse_bytes_per_process": [r["inverse_bytes"] for r in results],
                "estimate_8_gpus_ms": 1e3 * estimate(per_step, 8, NVLINK_BUS_BYTES_PER_S) if world > 1 else None,
                "estimate_64_gpus_ms": 1e3 * estimate(per_step, 64, IB_BUS_BYTES_PER_S) if world > 1 else None,
            })
    print(f"KFAC defaults, MLP {'-'.join(map(str, WIDTHS))}, global batch {GLOBAL_BATCH}, gloo on {os.cpu_count()} "
          f"cores, {args.steps} steps")
    print("| processes | inverse_sharing | step ms, median [q1, q3] | bytes per step by phase | inverse bytes per process "
          "| comm. estimate 8 GPUs | 64 GPUs |")
    print("|---|---|---|---|---|---|---|")
    for r in rows:
        phases = ", ".join(f"{k} {v / 1e3:.1f} kB" for k, v in r["bytes_per_step"].items()) or "-"
        est = ("-", "-") if r["estimate_8_gpus_ms"] is None else (f"{r['estimate_8_gpus_ms']:.3f} ms",
                                                                  f"{r['estimate_64_gpus_ms']:.3f} ms")
        q1, q3 = r["step_ms_q1_q3"]
        print(f"| {r['processes']} | {r['inverse_sharing']} | {r['step_ms_median']:.2f} [{q1:.2f}, {q3:.2f}] | {phases} "
              f"| {', '.join(f'{b / 1e3:.0f} kB' for b in r['inverse_bytes_per_process'])} | {est[0]} | {est[1]} |")
    sys.path.insert(0, HERE)
    from common import environment

    path = os.path.join(HERE, "results", "distributed.json")
    with open(path, "w") as f:
        json.dump({"environment": environment(), "rows": rows, "assumptions": {
            "nvlink_bus_bytes_per_s": NVLINK_BUS_BYTES_PER_S, "ib_bus_bytes_per_s": IB_BUS_BYTES_PER_S,
            "seconds_per_collective": COLLECTIVE_SECONDS}}, f, indent=1)
    print("saved", path)


if __name__ == "__main__":
    main()
