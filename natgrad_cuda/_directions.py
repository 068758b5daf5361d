"""Inverses and directions: the eigendecompositions of every factor (one batched op call) and the
damped-inverse directions of every block (one batched op call)."""
from __future__ import annotations

from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import ops
from ._blocks import Layer
from ._checks import warn_user

__all__ = ["decompose", "directions"]

# Per block, what the quadratic model needs: (layer, params, gradient matrix M, A of the block, G).
Block = Tuple[Layer, List[Tensor], Tensor, Tensor, Tensor]


def decompose(states: Dict[str, Dict[str, Tensor]], impl: Optional[str]) -> None:
    """Eigendecompositions (eigenvalues clamped at zero) of every factor of ``states``, in place,
    one batched call; a failed one keeps the previous, with a warning."""
    names = [name for name, st in states.items() if "A" in st]
    if not names:
        return
    mats = [states[n][k] for n in names for k in ("A", "G")]
    results = ops.eigh_batched(mats, impl=impl, _trusted=True)
    ok = torch.stack([torch.isfinite(d).all() for d, _ in results]).tolist()
    for i, name in enumerate(names):
        st = states[name]
        for j, key in enumerate(("A", "G")):
            k = 2 * i + j
            if ok[k]:
                d, Q = results[k]
                st["d" + key], st["Q" + key] = d.clamp_min(0), Q
            elif "Q" + key in st:
                warn_user(f"K-FAC: the eigendecomposition of {key} of layer {name!r} failed in float32 and "
                          "float64; keeping the previous one")
            else:
                warn_user(f"K-FAC: the eigendecomposition of {key} of layer {name!r} failed in float32 and "
                          "float64; the layer uses its plain gradient until one succeeds")


def directions(layers: List[Layer], states: Dict[str, Dict[str, Tensor]], damping: float, inverse: str,
               impl: Optional[str]) -> Tuple[Dict[int, Tensor], List[Block]]:
    """{id(param): preconditioned gradient} for every layer with an inverse (before KL clipping),
    and the blocks for the quadratic model."""
    Ms, QA, dA, QG, dG, blocks = [], [], [], [], [], []
    for layer in layers:
        st = states[layer.name]
        if "QA" not in st or "QG" not in st:
            continue
        for params, is_bias in layer.blocks():
            if any(p.grad is None for p in params):
                continue
            M = layer.matrix(params, [p.grad for p in params])
            if is_bias:
                one = torch.ones(1, 1, dtype=st["QA"].dtype, device=M.device)
                qa, da, A = one, one[0], one
            else:
                qa, da, A = st["QA"], st["dA"], st["A"]
            Ms.append(M), QA.append(qa), dA.append(da), QG.append(st["QG"]), dG.append(st["dG"])
            blocks.append((layer, params, M, A, st["G"]))
    if not Ms:
        return {}, []
    Ps = ops.precondition(Ms, QA, dA, QG, dG, float(damping), inverse, impl=impl, _trusted=True)
    out = {}
    for (layer, params, _, _, _), P in zip(blocks, Ps):
        for p, d in zip(params, layer.split(params, P)):
            out[id(p)] = d
    return out, blocks
