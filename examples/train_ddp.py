"""K-FAC under DistributedDataParallel, launched by torchrun: the usual DDP script plus KFAC.

    torchrun --nproc_per_node=2 examples/train_ddp.py            # or 3, or 1
    torchrun --nproc_per_node=2 examples/train_ddp.py --sharing directions

Trains an MLP on scikit-learn's bundled digits (nothing is downloaded), each process on its shard
of every global batch (DistributedSampler), with gloo on the CPU (nccl on GPUs: --backend nccl).
Before joining the process group, rank 0 trains the same model alone on the whole global batches;
at the end it prints the largest difference between the two runs' parameters, which is float
rounding (a data-parallel K-FAC step is the single-process step on the global batch), and checks
that every process holds the same parameters bit for bit.
"""
from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sklearn.datasets import load_digits
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import natgrad_cuda as ng


def model_and_data():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)).double()
    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float64)
    y = torch.tensor(digits.target, dtype=torch.long)
    return model, TensorDataset(x[:1440], y[:1440])  # 12 global batches of 120 (divisible by 1 to 6 processes)


def train(model, batches, sharing, rank=0, world=1):
    """KFAC over ``batches``, this process's (x, y) of every step."""
    net = DistributedDataParallel(model) if world > 1 else model
    opt = ng.KFAC(net, lr=0.1, damping=1e-3, loss="cross_entropy", fisher_type="type-2", inverse_sharing=sharing)
    for step, (x, y) in enumerate(batches):
        opt.zero_grad()
        out = net(x)
        loss = F.cross_entropy(out, y)
        opt.backward(loss, out)
        opt.step()
        if rank == 0 and step % 4 == 0:
            print(f"step {step:3d}  loss on this process's shard {loss.item():.4f}", flush=True)
    return model


def global_batches(data: TensorDataset, world: int, batch: int, steps: int):
    """Step t's global batch: what the processes' DistributedSampler shards hold at step t
    (process r reads examples r, r + world, ...), together."""
    per = batch // world
    shards = [torch.arange(r, len(data), world) for r in range(world)]
    for t in range(steps):
        yield data[torch.cat([s[t * per:(t + 1) * per] for s in shards])]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--batch", type=int, default=120, help="global batch size")
    ap.add_argument("--sharing", default="eigenbases", choices=["eigenbases", "directions"])
    ap.add_argument("--backend", default="gloo")
    args = ap.parse_args()
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if args.batch % world:
        raise SystemExit(f"--batch {args.batch} must be divisible by the {world} processes")

    reference = None
    if rank == 0:  # one process on the whole global batches, before any process group exists
        model, data = model_and_data()
        reference = train(model, global_batches(data, world, args.batch, args.steps), "eigenbases")
        print("-- the same on", world, "processes --", flush=True)

    dist.init_process_group(args.backend)
    model, data = model_and_data()
    sampler = DistributedSampler(data, num_replicas=world, rank=rank, shuffle=False)
    loader = DataLoader(data, batch_size=args.batch // world, sampler=sampler)  # this process's shard
    train(model, (b for _, b in zip(range(args.steps), loader)), args.sharing, rank, world)
    params = torch.nn.utils.parameters_to_vector(model.parameters()).detach()
    gathered = [torch.empty_like(params) for _ in range(world)]
    dist.all_gather(gathered, params)
    if rank == 0:
        same = all(torch.equal(gathered[0], g) for g in gathered)
        diff = (gathered[0] - torch.nn.utils.parameters_to_vector(reference.parameters())).abs().max().item()
        print(f"{world} processes, inverse_sharing={args.sharing!r}: parameters bitwise equal across processes: "
              f"{same}; largest difference to one process on the global batch: {diff:.2e}")
        if not same or diff > 1e-9:
            raise SystemExit("the data-parallel run does not match the single-process run")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
