"""Inverses and directions: the eigendecompositions of every factor (one batched op call) and the
damped-inverse directions of every block (one batched op call)."""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import ops, reference
from ._blocks import Layer
from ._chain import chain_directions
from ._checks import warn_user

__all__ = ["decompose", "directions", "has_inverse"]

# Per block: (layer, params, gradient matrix M, A of the block, G, direction matrix P); M, A and G
# for the quadratic model (a scale-and-shift layer: its blocks F as A, G None), P for the
# finiteness check (one contiguous tensor per block).
Block = Tuple[Layer, List[Tensor], Tensor, Tensor, Tensor, Optional[Tensor]]


def has_inverse(st: Dict[str, Tensor]) -> bool:
    return ("dA" in st and "QG" in st) or "QF" in st


def decompose(states: Dict[str, Dict[str, Tensor]], impl: Optional[str], dist=None) -> None:
    """Eigendecompositions (eigenvalues clamped at zero) of every factor of ``states``, in place,
    one batched call; a failed one keeps the previous, with a warning. A diagonal A (a vector) is
    its own eigenvalues in the standard basis. The per-unit blocks of a layer kept per unit are
    decomposed by torch's batched solver (a norm's are 2 x 2 at most: nothing for a kernel to gain).

    ``dist`` (data parallel): each process decomposes the layers it owns; the results of a layer
    whose eigenbases are shared then go to every process, those of a layer whose directions are
    shared stay with its owner (who preconditions it)."""
    todo = []  # (layer name, "A" or "G") of every matrix factor
    for name, st in states.items():
        if dist is not None and dist.keeps(name) and not dist.owns(name):
            continue
        if "F" in st:  # per-unit (P, k, k) blocks
            d, Q = torch.linalg.eigh(st["F"])
            st["dF"], st["QF"] = d.clamp_min(0), Q
            continue
        if "A" not in st:
            continue
        if st["A"].dim() == 1:
            st["dA"] = st["A"].clamp_min(0)
        else:
            todo.append((name, "A"))
        todo.append((name, "G"))
    if not todo:
        return
    if dist is None:
        results = ops.eigh_batched([states[name][key] for name, key in todo], impl=impl, _trusted=True)
    else:  # the owner's own (kept) ones, then the shared ones (a collective, the same list everywhere)
        kept = [i for i, (name, _) in enumerate(todo) if dist.keeps(name)]
        shared = [i for i, (name, _) in enumerate(todo) if not dist.keeps(name)]
        results = [None] * len(todo)
        for i, r in zip(kept, ops.eigh_batched([states[todo[i][0]][todo[i][1]] for i in kept], impl=impl,
                                               _trusted=True) if kept else []):
            results[i] = r
        for i, r in zip(shared, _decompose_shared(states, [todo[i] for i in shared], impl, dist) if shared else []):
            results[i] = r
    ok = torch.stack([torch.isfinite(d).all() for d, _ in results]).tolist()
    for (name, key), good, (d, Q) in zip(todo, ok, results):
        st = states[name]
        if good:
            st["d" + key], st["Q" + key] = d.clamp_min(0), Q
        elif "Q" + key in st:
            warn_user(f"K-FAC: the eigendecomposition of {key} of layer {name!r} failed in float32 and "
                      "float64; keeping the previous one")
        else:
            warn_user(f"K-FAC: the eigendecomposition of {key} of layer {name!r} failed in float32 and "
                      "float64; the layer uses its plain gradient until one succeeds")


def _decompose_shared(states, todo, impl, dist) -> List[Tuple[Tensor, Tensor]]:
    """Each process decomposes its layers' factors, then every result goes to every process."""
    mine = [dist.owns(name) for name, _ in todo]
    own = iter(ops.eigh_batched([states[name][key] for (name, key), m in zip(todo, mine) if m], impl=impl,
                                _trusted=True))
    tensors = []
    for (name, key), m in zip(todo, mine):
        F = states[name][key]
        d, Q = next(own) if m else (F.new_zeros(F.shape[0]), torch.zeros_like(F))
        tensors += [d, Q.contiguous()]
    shared = dist.share(tensors, [m for m in mine for _ in (0, 1)], "inverses")
    return list(zip(shared[0::2], shared[1::2]))


def directions(layers: List[Layer], states: Dict[str, Dict[str, Tensor]], damping: float, inverse: str,
               impl: Optional[str], chain: bool = False,
               share: Optional[Callable[[BlockDirections], BlockDirections]] = None
               ) -> Tuple[Dict[int, Tensor], List[Block]]:
    """{id(param): preconditioned gradient} for every layer with an inverse (before KL clipping),
    and the blocks for the quadratic model (their diagonal blocks, for a chain). ``share``: data
    parallel with the directions computed on each layer's owner, which turns this process's block
    directions into everyone's."""
    computed = (_chain_directions(layers, states, damping, impl) if chain else
                block_directions(layers, states, damping, inverse, impl))
    if share is not None:
        computed = share(computed)
    return assemble(layers, states, computed)


# (layer name, block index) -> the block's direction matrix P
BlockDirections = Dict[Tuple[str, int], Tensor]


def block_directions(layers: List[Layer], states: Dict[str, Dict[str, Tensor]], damping: float, inverse: str,
                     impl: Optional[str]) -> BlockDirections:
    """The direction matrix of every block of the layers with an inverse and a gradient, all
    Kronecker blocks in one batched ``ops.precondition`` call."""
    out: BlockDirections = {}
    Ms, QA, dA, QG, dG, keys = [], [], [], [], [], []
    for layer in layers:
        st = states[layer.name]
        if not has_inverse(st):
            continue
        for i, (params, is_bias) in enumerate(layer.blocks()):
            if any(p.grad is None for p in params):
                continue
            M = layer.matrix(params, [p.grad for p in params])
            if layer.per_unit:  # exact per-unit blocks: (F_e + lambda I)^-1 per unit
                out[(layer.name, i)] = _entry_direction(M, st, damping)
            elif layer.diagonal:  # no eigenbasis on the A side: two products with Q_G, never an (in, in) matrix
                out[(layer.name, i)] = _diagonal_direction(M, st, damping, inverse)
            else:
                if is_bias:
                    one = torch.ones(1, 1, dtype=st["QA"].dtype, device=M.device)
                    qa, da = one, one[0]
                else:
                    qa, da = st["QA"], st["dA"]
                Ms.append(M), QA.append(qa), dA.append(da), QG.append(st["QG"]), dG.append(st["dG"])
                keys.append((layer.name, i))
    if Ms:
        out.update(zip(keys, ops.precondition(Ms, QA, dA, QG, dG, float(damping), inverse, impl=impl, _trusted=True)))
    return out


def assemble(layers: List[Layer], states: Dict[str, Dict[str, Tensor]], computed: BlockDirections
             ) -> Tuple[Dict[int, Tensor], List[Block]]:
    """The per-parameter directions and the quadratic model's blocks from the block directions; a
    layer with none whose weight is part of a shared parameter moves that part by its plain
    gradient, not by zero."""
    out, blocks = {}, []
    for layer in layers:
        st = states[layer.name]
        mine = [(i, params) for i, (params, _) in enumerate(layer.blocks()) if (layer.name, i) in computed]
        if not mine and layer.rule.partial:
            for params, _ in layer.blocks():
                if all(p.grad is not None for p in params):
                    _add(out, params, layer.split(params, layer.matrix(params, [p.grad for p in params])))
        for i, params in mine:
            P = computed[(layer.name, i)]
            M = layer.matrix(params, [p.grad for p in params])
            _add(out, params, layer.split(params, P))
            if layer.per_unit:
                blocks.append((layer, params, M, st["F"], None, P))
            else:
                is_bias = layer.blocks()[i][1]
                A = torch.ones(1, 1, dtype=st["A"].dtype, device=M.device) if is_bias else st["A"]
                blocks.append((layer, params, M, A, st["G"], P))
    return out, blocks


def _chain_directions(layers: List[Layer], states: Dict[str, Dict[str, Tensor]], damping: float,
                      impl: Optional[str]) -> BlockDirections:
    """structure="block-tridiagonal": every chain layer is one block (weight and bias joint)."""
    Ms = {}
    for layer in layers:
        ((params, _),) = layer.blocks()
        if has_inverse(states[layer.name]) and all(p.grad is not None for p in params):
            Ms[layer.name] = layer.matrix(params, [p.grad for p in params])
    return {(name, 0): P for name, P in chain_directions(layers, states, Ms, damping, impl).items()}


def _diagonal_direction(M: Tensor, st: Dict[str, Tensor], damping: float, inverse: str) -> Tensor:
    """The damped inverse of G (x) diag(dA) applied to M (out, in), as ``reference.precondition``
    with Q_A the identity."""
    qg, dg, da = st["QG"], st["dG"], st["dA"]
    V = qg.T @ M.to(qg.dtype)
    if inverse == "eigen":
        denom = torch.outer(dg, da) + damping
    else:
        pi = reference.factored_pi(da, dg)
        root = math.sqrt(damping)
        denom = torch.outer(dg + root / pi, da + pi * root)
    return (qg @ (V / denom)).to(M.dtype)


def _add(out: Dict[int, Tensor], params: List[Tensor], parts: List[Tensor]) -> None:
    """Directions into ``out``; layers that are parts of one parameter (an attention's q, k and v
    rows of in_proj_weight) add theirs, each zero outside its part."""
    for p, d in zip(params, parts):
        out[id(p)] = out[id(p)] + d if id(p) in out else d


def _entry_direction(M: Tensor, st: Dict[str, Tensor], damping: float) -> Tensor:
    """(F_e + lambda I)^-1 applied to each row of M (P, k) with F_e = Q_e diag(d_e) Q_e^T: the exact
    damped inverse, for either ``inverse`` (there is no Kronecker product to factor the damping over)."""
    Q, d = st["QF"], st["dF"]
    V = torch.einsum("pji,pj->pi", Q, M.to(Q.dtype)) / (d + damping)
    return torch.einsum("pij,pj->pi", Q, V).to(M.dtype)
