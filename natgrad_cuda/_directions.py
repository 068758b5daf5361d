"""Inverses and directions: the eigendecompositions of every factor (one batched op call) and the
damped-inverse directions of every block (one batched op call)."""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

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


def decompose(states: Dict[str, Dict[str, Tensor]], impl: Optional[str]) -> None:
    """Eigendecompositions (eigenvalues clamped at zero) of every factor of ``states``, in place,
    one batched call; a failed one keeps the previous, with a warning. A diagonal A (a vector) is
    its own eigenvalues in the standard basis. The per-unit blocks of a layer kept per unit are
    decomposed by torch's batched solver (a norm's are 2 x 2 at most: nothing for a kernel to gain)."""
    todo = []  # (layer name, "A" or "G") of every matrix factor
    for name, st in states.items():
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
    results = ops.eigh_batched([states[name][key] for name, key in todo], impl=impl, _trusted=True)
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


def directions(layers: List[Layer], states: Dict[str, Dict[str, Tensor]], damping: float, inverse: str,
               impl: Optional[str], chain: bool = False) -> Tuple[Dict[int, Tensor], List[Block]]:
    """{id(param): preconditioned gradient} for every layer with an inverse (before KL clipping),
    and the blocks for the quadratic model (their diagonal blocks, for a chain)."""
    if chain:
        return _chain_directions(layers, states, damping, impl)
    Ms, QA, dA, QG, dG, blocks = [], [], [], [], [], []
    out = {}
    for layer in layers:
        st = states[layer.name]
        if not has_inverse(st):
            if layer.rule.partial:  # its part of a shared parameter moves by its plain gradient, not by zero
                for params, _ in layer.blocks():
                    if all(p.grad is not None for p in params):
                        _add(out, params, layer.split(params, layer.matrix(params, [p.grad for p in params])))
            continue
        for params, is_bias in layer.blocks():
            if any(p.grad is None for p in params):
                continue
            M = layer.matrix(params, [p.grad for p in params])
            if layer.per_unit:  # exact per-unit blocks: (F_e + lambda I)^-1 per unit
                P = _entry_direction(M, st, damping)
                _add(out, params, layer.split(params, P))
                blocks.append((layer, params, M, st["F"], None, P))
                continue
            if layer.diagonal:  # no eigenbasis on the A side: two products with Q_G, never an (in, in) matrix
                P = _diagonal_direction(M, st, damping, inverse)
                _add(out, params, layer.split(params, P))
                blocks.append((layer, params, M, st["A"], st["G"], P))
                continue
            if is_bias:
                one = torch.ones(1, 1, dtype=st["QA"].dtype, device=M.device)
                qa, da, A = one, one[0], one
            else:
                qa, da, A = st["QA"], st["dA"], st["A"]
            Ms.append(M), QA.append(qa), dA.append(da), QG.append(st["QG"]), dG.append(st["dG"])
            blocks.append((layer, params, M, A, st["G"], None))
    if not Ms:
        return out, blocks
    Ps = iter(ops.precondition(Ms, QA, dA, QG, dG, float(damping), inverse, impl=impl, _trusted=True))
    for i, (layer, params, M, A, G, P) in enumerate(blocks):
        if P is None:
            P = next(Ps)
            blocks[i] = (layer, params, M, A, G, P)
            _add(out, params, layer.split(params, P))
    return out, blocks


def _chain_directions(layers: List[Layer], states: Dict[str, Dict[str, Tensor]], damping: float,
                      impl: Optional[str]) -> Tuple[Dict[int, Tensor], List[Block]]:
    """structure="block-tridiagonal": every chain layer is one block (weight and bias joint)."""
    Ms, held = {}, []
    for layer in layers:
        st = states[layer.name]
        ((params, _),) = layer.blocks()
        if has_inverse(st) and all(p.grad is not None for p in params):
            Ms[layer.name] = layer.matrix(params, [p.grad for p in params])
            held.append((layer, params))
    Ps = chain_directions(layers, states, Ms, damping, impl)
    out, blocks = {}, []
    for layer, params in held:
        P = Ps[layer.name]
        _add(out, params, layer.split(params, P))
        st = states[layer.name]
        blocks.append((layer, params, Ms[layer.name], st["A"], st["G"], P))
    return out, blocks


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
