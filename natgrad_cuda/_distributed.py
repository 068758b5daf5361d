"""Data-parallel K-FAC on torch.distributed: what the optimizers share across processes.

Under an initialised default process group with more than one process (DistributedDataParallel,
torchrun, torch.multiprocessing), every process holds the same model and sees its own shard of the
batch. For the processes to take the same step, and for that step to be the one a single process
would take on the global batch:

- the factor sums of a factor-update step are summed over the processes (one bucket of every
  layer's sums, their data-point count and G's divisor), so the factors are those of the global
  batch; MC targets come from a per-process stream derived from the optimizer's generator;
- the eigendecompositions are split over the processes, each layer owned by one (greedy,
  largest cost first), and shared as ``inverse_sharing`` says: "eigenbases" sends every owner's
  eigenvectors and eigenvalues to every process (each then preconditions all layers: less compute
  per step); "directions" keeps them on the owner, which preconditions its layers' gradients every
  step and shares the directions (less memory, more bytes per step); "hybrid" chooses per layer
  whichever sends fewer bytes per step at the inverse-update frequency the optimizer was built with;
- a model that is not wrapped in DistributedDataParallel gets its gradients averaged here;
- the adaptive step's and the damping adaptation's batch quantities are reduced (one call each).

Sums over processes add zeros for what a process does not own, so every process ends with the same
bits. A set-up mistake (other models, layers, options or hyperparameters on some process) is found
at construction by comparing every process's description, and raises the same ValueError on all.
"""
from __future__ import annotations

import datetime
import math
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import Tensor, nn

__all__ = ["Distributed", "INVERSE_SHARING", "refuse_sharded", "eigen_cost", "describe"]

INVERSE_SHARING = ("eigenbases", "directions", "hybrid")
# How long construction waits for every process before calling it a set-up mistake (gloo).
SETUP_TIMEOUT = datetime.timedelta(seconds=60)


def _dist():
    import torch.distributed as dist

    return dist


def refuse_sharded(model: nn.Module) -> None:
    """ValueError for a model sharded by FullyShardedDataParallel (either API)."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:  # a torch built without distributed
        return
    kinds = [FullyShardedDataParallel]
    try:
        from torch.distributed.fsdp import FSDPModule
        kinds.append(FSDPModule)
    except ImportError:
        pass
    if any(isinstance(m, tuple(kinds)) for m in model.modules()):
        raise ValueError("K-FAC does not support FullyShardedDataParallel models yet: their parameters are sharded "
                         "across processes, while K-FAC needs every layer's whole weight and gradient. Use "
                         "DistributedDataParallel (or a plain model under torch.distributed)")


class Distributed:
    """The default process group as one optimizer uses it (only made when it has 2+ processes).
    ``sharing``: "eigenbases", "directions", or "hybrid" (per layer, whichever sends fewer bytes)."""

    def __init__(self, sharing: str):
        dist = _dist()
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.sharing = sharing
        # where small tensors of counts and flags live: nccl reduces device tensors only
        self.device = (torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl"
                       else torch.device("cpu"))
        self.owner: Dict[str, int] = {}
        self._keeps: Dict[str, bool] = {}  # the layer's inverses stay with its owner, its directions are shared
        self.sent_bytes: Dict[str, int] = {"factors": 0, "inverses": 0, "directions": 0, "gradients": 0,
                                           "scalars": 0}

    @staticmethod
    def current(sharing: str) -> Optional["Distributed"]:
        """The process group when there is one with 2+ processes, else None (single-process K-FAC)."""
        if sharing not in INVERSE_SHARING:
            raise ValueError(f"inverse_sharing must be one of {INVERSE_SHARING}, got {sharing!r}")
        dist = _dist()
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        return Distributed(sharing)

    # ---- set-up ---------------------------------------------------------------------------------

    def check_same_everywhere(self, description: dict) -> None:
        """ValueError on every process unless all processes built the same optimizer."""
        dist = _dist()
        if dist.get_backend() == "gloo":
            try:  # a process that never builds the optimizer: an error in a minute, not a hang
                dist.monitored_barrier(timeout=SETUP_TIMEOUT, wait_all_ranks=True)
            except RuntimeError as e:
                raise ValueError(f"K-FAC under torch.distributed: not every process built the optimizer within "
                                 f"{SETUP_TIMEOUT.seconds} s ({e})") from None
        gathered: List[Optional[dict]] = [None] * self.world
        dist.all_gather_object(gathered, description)
        first = gathered[0]
        for rank, other in enumerate(gathered[1:], 1):
            diff = sorted(k for k in set(first) | set(other) if first.get(k) != other.get(k))
            if diff:
                detail = "; ".join(f"{k}: rank 0 has {first.get(k)!r}, rank {rank} {other.get(k)!r}" for k in diff[:3])
                raise ValueError(f"K-FAC under torch.distributed: the processes built different optimizers ({detail}); "
                                 "every process must build the same model and optimizer")

    def assign(self, costs: Dict[str, float], sizes: Dict[str, Tuple[float, float]]) -> None:
        """Each layer's owner: largest cost first, to the least-loaded process (ties: lowest rank);
        and what is shared of it: its eigenbases or its directions, as ``sharing`` says, or with
        "hybrid" whichever sends fewer bytes per step (``sizes``: the two, per layer)."""
        for name, (eigen, direction) in sizes.items():
            self._keeps[name] = (self.sharing == "directions" or
                                 (self.sharing == "hybrid" and direction < eigen))
        load = [0.0] * self.world
        for name in sorted(costs, key=lambda n: (-costs[n], n)):
            r = min(range(self.world), key=lambda i: (load[i], i))
            self.owner[name] = r
            load[r] += costs[name]

    def owns(self, name: str) -> bool:
        return self.owner.get(name, self.rank) == self.rank

    def keeps(self, name: str) -> bool:
        """Whether layer ``name``'s inverses stay with its owner (its directions are shared)."""
        return self._keeps.get(name, False)

    # ---- collectives ----------------------------------------------------------------------------

    def sum_tensors(self, tensors: List[Tensor], phase: str) -> List[Tensor]:
        """Sums over processes of equally shaped tensors on every process, one all-reduce per dtype."""
        return self.finish(self.start(tensors, phase))

    def start(self, tensors: List[Tensor], phase: str):
        """Launch the sums of ``sum_tensors`` (asynchronous; ``finish`` waits and returns them)."""
        dist = _dist()
        groups: Dict[Tuple[torch.dtype, torch.device], List[int]] = {}
        for i, t in enumerate(tensors):
            groups.setdefault((t.dtype, t.device), []).append(i)
        buckets = []
        for (dtype, device), idx in groups.items():
            flat = torch.cat([tensors[i].reshape(-1) for i in idx])
            buf = flat.cpu() if device.type != "cpu" and dist.get_backend() == "gloo" else flat  # gloo reduces host tensors
            self.sent_bytes[phase] += buf.numel() * buf.element_size()
            buckets.append((idx, flat, buf, dist.all_reduce(buf, async_op=True)))
        return [t.shape for t in tensors], buckets

    @staticmethod
    def finish(pending) -> List[Tensor]:
        shapes, buckets = pending
        out: List[Optional[Tensor]] = [None] * len(shapes)
        for idx, flat, buf, work in buckets:
            work.wait()
            if buf is not flat:
                flat.copy_(buf)
            offset = 0
            for i in idx:
                n = math.prod(shapes[i])
                out[i] = flat[offset:offset + n].view(shapes[i])
                offset += n
        return out

    def sum_scalars(self, values: Sequence[float]) -> List[float]:
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)
        (t,) = self.sum_tensors([t], "scalars")
        return t.tolist()

    def start_factors(self, sums: Dict[Tuple[str, str], Tensor], layout: List[Tuple[Tuple[str, str], tuple,
                      torch.dtype, torch.device]], n: int, g_div: float):
        """Launch the sum over processes of every (kind, layer) sum of ``layout`` (zeros where a
        process has none), of the data points and of G's divisor: one bucket per dtype."""
        tensors, flags = [], []
        for key, shape, dtype, device in layout:
            t = sums.get(key)
            flags.append(0.0 if t is None else 1.0)
            tensors.append(torch.zeros(shape, dtype=dtype, device=device) if t is None else t)
        scalars = torch.tensor([float(n), float(g_div)] + flags, dtype=torch.float64, device=self.device)
        return layout, self.start(tensors + [scalars], "factors")

    def finish_factors(self, pending, sums: Dict[Tuple[str, str], Tensor]) -> Tuple[int, float]:
        """The summed factor sums into ``sums`` (left out where no process had one); the global
        data points and divisor."""
        layout, started = pending
        *summed, scalars = self.finish(started)
        for (key, *_), flag, t in zip(layout, scalars[2:].tolist(), summed):
            if flag > 0:
                sums[key] = t
        return int(scalars[0].item()), float(scalars[1].item())

    def flags(self, values: List[bool]) -> Tensor:
        return torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.device)

    def share(self, tensors: List[Tensor], mine: List[bool], phase: str) -> List[Tensor]:
        """Each tensor from the process it belongs to (``mine``), on every process (zeros elsewhere,
        summed: exact)."""
        return self.sum_tensors([t if m else torch.zeros_like(t) for t, m in zip(tensors, mine)], phase)

    def share_entries(self, entries: List[Optional[Dict[str, Tensor]]], keys: Sequence[str], like: List[Tensor],
                      phase: str) -> List[Optional[Dict[str, Tensor]]]:
        """Dicts of tensors (``keys`` at most, of up to 3 dims) each from the one process that has it
        (None elsewhere), on every process; None where no process had one. Their shapes go first
        (one small collective), so that the others know what to receive; ``like[i]``: the dtype and
        device of item i's tensors."""
        desc = torch.zeros(len(entries), len(keys), 4, dtype=torch.float64)
        for i, e in enumerate(entries):
            for j, key in enumerate(keys):
                if e is not None and key in e:
                    shape = tuple(e[key].shape)
                    desc[i, j, 0] = 1.0
                    desc[i, j, 1:1 + len(shape)] = torch.tensor(shape, dtype=torch.float64) + 1  # 0: no dim
        (desc,) = self.sum_tensors([desc.to(self.device)], phase)
        desc = desc.cpu().long().tolist()
        tensors, mine, where = [], [], []
        for i, e in enumerate(entries):
            for j, key in enumerate(keys):
                present, *dims = desc[i][j]
                if not present:
                    continue
                shape = tuple(d - 1 for d in dims if d > 0)
                have = e is not None and key in e
                tensors.append(e[key].contiguous() if have else torch.zeros(shape, dtype=like[i].dtype,
                                                                                device=like[i].device))
                mine.append(have)
                where.append((i, key))
        out: List[Optional[Dict[str, Tensor]]] = [None] * len(entries)
        for (i, key), t in zip(where, self.share(tensors, mine, phase) if tensors else []):
            out[i] = out[i] or {}
            out[i][key] = t
        return out

    def average_gradients(self, grads: List[Tensor]) -> None:
        """The mean of every gradient over the processes, in place (a model DDP does not wrap)."""
        summed = self.sum_tensors(grads, "gradients")
        for g, s in zip(grads, summed):
            g.copy_(s).div_(self.world)

    def rank_generator(self, seed: int, step: int, device: torch.device) -> torch.Generator:
        """This process's MC stream at ``step`` of a run seeded ``seed``: its own, and reproducible
        (a resumed run draws what the uninterrupted one would have)."""
        g = torch.Generator(device=device)
        g.manual_seed((seed * 1000003 + step * 0x9E3779B1 + (self.rank + 1) * 0x85EBCA77) % 2**63)
        return g


def eigen_cost(shapes: Dict[str, tuple]) -> float:
    """The eigendecompositions' cost of a layer: the cube of each matrix factor's size."""
    return float(sum(s[0] ** 3 for k, s in shapes.items() if k in ("A", "G") and len(s) == 2) +
                 sum(s[0] * s[1] ** 3 for k, s in shapes.items() if k == "F")) or 1.0


def sharing_bytes(shapes: Dict[str, tuple], inv_update_freq: int) -> Tuple[float, float]:
    """Elements sent per step to share a layer's eigenbases (every ``inv_update_freq`` steps) and
    to share its direction (every step)."""
    eigen = sum(math.prod(s) for k, s in shapes.items() if k[0] in "Qd") / inv_update_freq
    a, g = shapes.get("A", (1,))[0], shapes["G"][0] if "G" in shapes else shapes["F"][0]
    direction = math.prod(shapes["F"][:2]) if "F" in shapes else a * g
    return float(eigen), float(direction)


def describe(model: nn.Module, options: dict) -> dict:
    """What every process must agree on: the model's parameters and the optimizer's options."""
    params = [(name, tuple(p.shape), str(p.dtype), p.requires_grad) for name, p in model.named_parameters()]
    out = {"parameters": params}
    out.update({k: (v if isinstance(v, (int, float, str, bool, type(None), tuple)) else repr(v))
                for k, v in options.items()})
    return out

