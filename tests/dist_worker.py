"""One process of a data-parallel test run (tests/test_distributed.py starts world-size of these):
``python dist_worker.py SCENARIO RANK WORLD PORT OUT [ARG]``; it writes OUT/rank{RANK}.pt."""
import os
import sys

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

import natgrad_cuda as ng

STEPS = 4
BATCH = 12  # the global batch: divisible by 1, 2 and 3 processes


def model_and_data(seed=0, wide=False):
    """``wide``: a 520-wide hidden layer, whose G and the next layer's A are decomposed as low rank."""
    torch.manual_seed(seed)
    h = 520 if wide else 7
    model = nn.Sequential(nn.Linear(5, h), nn.Tanh(), nn.Linear(h, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    g = torch.Generator().manual_seed(100 + seed)
    x = torch.randn(STEPS, BATCH, 5, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (STEPS, BATCH), generator=g)
    return model, x, y


def build(model, kind, **kw):
    common = dict(lr=0.2, damping=1e-2, factor_update_freq=1, inv_update_freq=2, seed=0)
    common.update(kw)
    if kind == "KFAC":
        return ng.KFAC(model, loss="cross_entropy", momentum=0.5, **common)
    return ng.KFACPreconditioner(model, loss="cross_entropy", **common)


def train(net, opt, x, y, rank, world, steps, first=0, follower=None, closure=False):
    """Steps on this process's shard of each global batch (contiguous slices)."""
    for t in range(first, first + steps):
        xs, ys = x[t].chunk(world)[rank], y[t].chunk(world)[rank]
        if follower is not None:
            follower.zero_grad()
        else:
            opt.zero_grad()
        out = net(xs)
        loss = F.cross_entropy(out, ys)
        opt.backward(loss, out)
        if follower is not None:
            opt.step()
            follower.step()
        elif closure:
            opt.step(lambda: F.cross_entropy(net(xs), ys))
        else:
            opt.step()


VARIANTS = [
    # (name, optimizer kind, options, wrap in DDP)
    ("kfac-type2-eigen-eigenbases-ddp", "KFAC", dict(fisher_type="type-2"), True),
    ("kfac-type2-factored-directions-ddp", "KFAC", dict(fisher_type="type-2", inverse="factored",
                                                         inverse_sharing="directions"), True),
    ("kfac-empirical-eigen-directions-plain", "KFAC", dict(fisher_type="empirical", inverse_sharing="directions"), False),
    ("kfac-empirical-factored-eigenbases-plain", "KFAC", dict(fisher_type="empirical", inverse="factored"), False),
    ("pre-type2-eigen-directions-ddp", "pre", dict(fisher_type="type-2", inverse_sharing="directions"), True),
    ("pre-empirical-eigen-eigenbases-plain", "pre", dict(fisher_type="empirical"), False),
    # hybrid: at inverses every 3 steps the first two layers share eigenbases, the last its directions
    ("kfac-type2-hybrid-ddp", "KFAC", dict(fisher_type="type-2", inverse_sharing="hybrid", inv_update_freq=3), True),
    ("kfac-type2-adaptive-ddp", "KFAC", dict(fisher_type="type-2", adaptive_step=True), True),
    ("kfac-type2-lm-damping-plain", "KFAC", dict(fisher_type="type-2", adapt_damping=True, adapt_damping_interval=1),
     False),
    ("kfac-unit-wise-directions-ddp", "KFAC", dict(fisher_type="type-2", structure="unit-wise",
                                                    inverse_sharing="directions"), True),
    ("kfac-tridiagonal-ddp", "KFAC", dict(fisher_type="type-2", structure="block-tridiagonal"), True),
    # low-rank wide factors beside full eigendecompositions and explicit inverses
    ("kfac-wide-eigen-hybrid-ddp", "KFAC", dict(fisher_type="type-2", inverse_sharing="hybrid", wide=True), True),
    ("kfac-wide-factored-eigenbases-plain", "KFAC", dict(fisher_type="empirical", inverse="factored", wide=True), False),
    # EKFAC: each process sums its rows' share of the scalings in the shared eigenbases
    ("kfac-type2-ekfac-eigenbases-ddp", "KFAC", dict(fisher_type="type-2", inverse="ekfac"), True),
]


def run_variant(name, kind, options, wrap, rank, world):
    options = dict(options)
    model, x, y = model_and_data(wide=options.pop("wide", False))
    net = nn.parallel.DistributedDataParallel(model) if (wrap and world > 1 and dist.is_initialized()) else model
    opt = build(net, kind, **options)
    follower = torch.optim.SGD(model.parameters(), lr=0.2) if kind == "pre" else None
    train(net, opt, x, y, rank, world, STEPS, follower=follower, closure=bool(options.get("adapt_damping")))
    return {"params": [p.detach().clone() for p in model.parameters()]}


def scenario_variants(rank, world, arg):
    return {name: run_variant(name, kind, options, wrap, rank, world) for name, kind, options, wrap in VARIANTS}


def scenario_mc_factors(rank, world, arg):
    """One MC factor step: the reduced factors and what each process's stream was."""
    model, x, y = model_and_data()
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = build(net, "KFAC", fisher_type="mc", mc_samples=2)
    mc_seed = getattr(opt._engine, "mc_seed", None)
    train(net, opt, x, y, rank, world, 1)
    state = {name: {k: v.clone() for k, v in st.items() if k in ("A", "G")} for name, st in opt._engine.state.items()}
    return {"state": state, "mc_seed": mc_seed}


def scenario_save(rank, world, arg):
    """Two steps, then rank 0's state (model and optimizer) written for a resume; or two steps of
    that state resumed (``arg``: the file) in this world size."""
    kind, options = "KFAC", dict(fisher_type="type-2", inverse_sharing="directions")
    model, x, y = model_and_data()
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = build(net, kind, **options)
    if arg.startswith("resume:"):
        saved = torch.load(arg[len("resume:"):], weights_only=False)
        model.load_state_dict(saved["model"])
        opt.load_state_dict(saved["opt"])
        train(net, opt, x, y, rank, world, 2, first=2)
        return {"params": [p.detach().clone() for p in model.parameters()]}
    train(net, opt, x, y, rank, world, 2)
    sd = opt.state_dict()  # a collective with inverse_sharing="directions"
    if rank == 0:
        torch.save({"model": model.state_dict(), "opt": sd}, arg)
    train(net, opt, x, y, rank, world, 2, first=2)
    return {"params": [p.detach().clone() for p in model.parameters()]}


def scenario_mistake(rank, world, arg):
    """A set-up mistake on the last process: it must raise ValueError everywhere, not hang."""
    model, _, _ = model_and_data()
    options = dict(fisher_type="type-2")
    last = rank == world - 1
    if arg == "damping" and last:
        options["damping"] = 0.5
    if arg == "model" and last:
        model = nn.Sequential(model, nn.Tanh(), nn.Linear(3, 3).double())
    if arg == "sharing" and last:
        options["inverse_sharing"] = "directions"
    try:
        build(model, "KFAC", **options)
    except ValueError as e:
        return {"error": str(e)}
    return {"error": None}


def scenario_fsdp(rank, world, arg):
    """A model sharded by FSDP2's fully_shard (FSDP1 needs an accelerator): refused."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    model, _, _ = model_and_data()
    fully_shard(model, mesh=init_device_mesh("cpu", (world,)))
    try:
        ng.KFAC(model, loss="cross_entropy")
    except ValueError as e:
        return {"error": str(e)}
    return {"error": None}


def scenario_bytes(rank, world, arg):
    """Bytes sent per phase for each inverse sharing over a few steps (the benchmark's numbers)."""
    out = {}
    for sharing in ("eigenbases", "directions"):
        model, x, y = model_and_data()
        net = nn.parallel.DistributedDataParallel(model)
        opt = build(net, "KFAC", fisher_type="type-2", inverse_sharing=sharing)
        train(net, opt, x, y, rank, world, STEPS)
        out[sharing] = dict(opt._engine.dist.sent_bytes)
        out[sharing + " keeps"] = {layer.name: opt._engine.dist.keeps(layer.name) for layer in opt._engine.layers}
    return out


def main():
    scenario, rank, world, port, out = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], sys.argv[5]
    arg = sys.argv[6] if len(sys.argv) > 6 else ""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port)
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    result = globals()["scenario_" + scenario](rank, world, arg)
    torch.save(result, os.path.join(out, f"rank{rank}.pt"))
    # Every process past its last collective, then out at once: tearing the group down lets one
    # process close its connections while a peer's gloo thread still reads them, which aborts that
    # peer ("terminate called without an active exception") after its work is done.
    dist.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


if __name__ == "__main__":
    main()
