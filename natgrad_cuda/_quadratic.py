"""The quadratic models of a step: K-FAC's (for the damping adaptation's reduction ratio) and the
exact GGN's (for the adaptive step's length and momentum)."""
from __future__ import annotations

import contextlib
from typing import Callable, Dict, List, Optional, Tuple

import torch
from torch import Tensor, nn

from .curvature._losses import LossSpec
from .curvature.exact import load_forward_ad

__all__ = ["quadratic_change", "ggn_gram"]


def quadratic_change(deltas: Dict[int, Tensor], grads: Dict[int, Tensor], blocks) -> float:
    """The K-FAC quadratic model's predicted change of the loss for the parameter change delta:
    <g, delta> over all parameters + 1/2 sum over blocks <D, G D A> (undamped; a scale-and-shift
    layer's blocks, given as A with G None: sum over entries <D_e, F_e D_e>)."""
    lin = sum(float((grads[k].double() * deltas[k].double()).sum()) for k in deltas if k in grads)
    quad = 0.0
    for layer, params, _, A, G, _ in blocks:
        D = layer.matrix(params, [deltas[id(p)] for p in params]).to(A.dtype)
        if G is None:
            quad += float(torch.einsum("pi,pij,pj->", D, A, D))
        else:
            quad += float((D * ((G @ D) * A if A.dim() == 1 else G @ D @ A)).sum())  # a diagonal A is a vector
    return lin + 0.5 * quad


def ggn_gram(model: nn.Module, spec: LossSpec, flatten: Callable[[Tensor], Tensor], inputs, params: List[Tensor],
             directions: List[List[Tensor]], quiet: Callable[[], contextlib.AbstractContextManager],
             reduce: Optional[Callable[[Tensor, float], Tuple[Tensor, float]]] = None) -> Tensor:
    """(k, k) matrix v_i^T GGN v_j on the batch of ``inputs`` (the (args, kwargs) of the forward
    that went to opt.backward), for k parameter-space directions (each a list aligned with
    ``params``): Jacobian-vector products by forward-mode AD, then the loss Hessian in closed form;
    divided by Z as the loss is. float64. ``flatten`` turns outputs into the loss's (terms, C);
    ``quiet()`` keeps these forwards from being recorded; ``reduce`` (data parallel) sums the
    products and the divisor over the processes."""
    import torch.autograd.forward_ad as fwad
    from torch.func import functional_call

    if inputs is None:
        raise RuntimeError("adaptive_step: no forward went to opt.backward(loss, outputs) in this step, so "
                           "there is no batch to take the curvature from")
    load_forward_ad()
    args, kwargs = inputs
    names = {id(p): n for n, p in model.named_parameters()}
    keys = [names[id(p)] for p in params]

    outs = []
    with quiet():
        for v in directions:  # forward-mode AD on dual parameters (cheaper than torch.func.jvp's wrapping)
            with fwad.dual_level():
                duals = {k: fwad.make_dual(p.detach(), t.to(p.dtype)) for k, p, t in zip(keys, params, v)}
                out, jv = fwad.unpack_dual(functional_call(model, duals, args, kwargs))
                jv = torch.zeros_like(out) if jv is None else jv  # outputs that do not depend on params
                outs.append(flatten(jv).double())
    fo = flatten(out).double()
    gram = spec.hessian_products(fo, torch.stack(outs))
    divisor = spec.divisor(*fo.shape, out.shape[0])
    if reduce is not None:
        gram, divisor = reduce(gram, divisor)
    return gram / divisor
