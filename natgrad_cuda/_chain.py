"""Block tri-diagonal K-FAC (Martens and Grosse 2015, section 4.3) in the optimizer: the cross
factors of neighbouring layers, and the directions F^-1 g of the chain-structured approximation.

For a chain of layers 1..L with (damped) factors A_i, G_i and cross factors Ac_i = E[a_i a_i+1^T],
Gc_i = E[g_i g_i+1^T], F^ is the matrix that agrees with the Kronecker-factored Fisher on the
diagonal and first off-diagonal blocks and whose inverse is block tri-diagonal:

    F^-1 = Xi^T Lambda Xi,  Xi = I - (superdiagonal Psi_i),  Psi_i = (Gc_i G_i+1^-1) (x) (Ac_i A_i+1^-1),
    Lambda = diag(Sigma_1|2^-1, ..., Sigma_L^-1),
    Sigma_i|i+1 = G_i (x) A_i - (Psi^G G_i+1 Psi^G^T) (x) (Psi^A A_i+1 Psi^A^T),  Sigma_L = G_L (x) A_L.

Sigma_i|i+1 is a difference of two Kronecker products, inverted through the generalised
eigenvectors of each side: with R = Q diag(e^-1/2) (A_i = Q diag(e) Q^T) and R^T (Psi A Psi^T) R =
E diag(s) E^T, K = R E gives K^T A_i K = I and K^T (Psi A Psi^T) K = diag(s), so

    Sigma^-1 V = K_G [(K_G^T V K_A) / (1 - s_G s_A^T)] K_A^T,

which is ``ops.precondition``'s form (eigenvalues -s_G and s_A, damping 1). Damping is factored
Tikhonov on the diagonal blocks, A_i + pi_i sqrt(lambda) I and G_i + sqrt(lambda) / pi_i I, as
Martens and Grosse do, so 0 <= s < 1.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Tuple

import torch
from torch import Tensor

from . import ops, reference
from ._blocks import Layer
from .curvature.kfac import check_chain

__all__ = ["chain_check", "cross_rows", "chain_directions"]


def chain_check(layers: List[Layer], separate_weight_and_bias: bool) -> None:
    """ValueError unless ``layers`` can form a chain: nn.Linear layers, weight and bias joint."""
    check_chain(layers)
    if separate_weight_and_bias:
        raise ValueError("structure='block-tridiagonal' keeps each layer's weight and bias in one block "
                         "(separate_weight_and_bias=False)")


def cross_rows(rows, chain: List[str], append_ones: Dict[Tuple[str, str], bool]) -> List[Tuple[Tuple[str, str], Tensor]]:
    """((kind "AC" or "GC", first layer of the pair), rows_a^T rows_b * scale) for every pair of
    neighbouring chain layers in ``rows`` (items (("A" or "G", layer), rows, scale), one per layer
    and backward scalar, in order: the k-th item of one layer pairs with the k-th of the next)."""
    by_key: Dict[Tuple[str, str], List[Tuple[Tensor, float]]] = {}
    for key, r, scale in rows:
        if key[0] in ("A", "G"):
            by_key.setdefault(key, []).append((r, scale))
    out = []
    for kind in ("A", "G"):
        for a, b in zip(chain[:-1], chain[1:]):
            ra, rb = by_key.get((kind, a), []), by_key.get((kind, b), [])
            if not ra or not rb:
                continue
            if len(ra) != len(rb):
                raise ValueError(f"structure='block-tridiagonal': layers {a!r} and {b!r} ran a different number of "
                                 "times in one forward; the chain needs each layer once")
            total = None
            for (x, sx), (y, sy) in zip(ra, rb):
                if x.shape[0] != y.shape[0] or (kind == "A" and (sx != 1.0 or sy != 1.0)):
                    raise ValueError(f"structure='block-tridiagonal': layers {a!r} and {b!r} need one row per data "
                                     "point (nn.Linear on (B, in) inputs)")
                if kind == "A":
                    x, y = _ones(x, append_ones[("A", a)]), _ones(y, append_ones[("A", b)])
                term = x.T @ y.to(x.dtype) * sx
                total = term if total is None else total + term
            out.append(((kind + "C", a), total))
    return out


def _ones(x: Tensor, append: bool) -> Tensor:
    return torch.cat([x, torch.ones_like(x[:, :1])], 1) if append else x


def chain_directions(layers: List[Layer], states: Dict[str, Dict[str, Tensor]], Ms: Dict[str, Tensor],
                     damping: float, impl: Optional[str]) -> Dict[str, Tensor]:
    """F^-1 M for the layers with a gradient matrix in ``Ms`` and an inverse, in chain order; a
    layer without them breaks the chain in two."""
    segments, current = [], []
    for layer in layers:
        st = states[layer.name]
        if layer.name in Ms and "QA" in st and "QG" in st:
            current.append(layer)
            continue
        if current:
            segments.append(current)
        current = []
    if current:
        segments.append(current)
    root = math.sqrt(damping)
    out: Dict[str, Tensor] = {}
    work = []  # per layer: (name, M, Psi^A, Psi^G, R_A, R_G, A2, G2), Psi and A2/G2 None for a segment's last
    for seg in segments:
        damped = []
        for layer in seg:
            st = states[layer.name]
            pi = reference.factored_pi(st["dA"], st["dG"])
            damped.append((st["QA"], st["dA"] + pi * root, st["QG"], st["dG"] + root / pi))
        for i, layer in enumerate(seg):
            qa, ea, qg, eg = damped[i]
            st = states[layer.name]
            RA, RG = qa * ea.rsqrt(), qg * eg.rsqrt()
            if i + 1 < len(seg) and "AC" in st and "GC" in st:
                qa2, ea2, qg2, eg2 = damped[i + 1]
                psi_a = (st["AC"] @ qa2) / ea2 @ qa2.T
                psi_g = (st["GC"] @ qg2) / eg2 @ qg2.T
                A2, G2 = psi_a @ st["AC"].T, psi_g @ st["GC"].T
            else:  # the end of a segment (or cross factors not yet estimated): no coupling to the next
                psi_a = psi_g = A2 = G2 = None
            work.append((layer.name, Ms[layer.name], psi_a, psi_g, RA, RG, A2, G2))
        work.append(None)  # segment boundary
    # Sigma's generalised eigenproblems, all in one batched call
    mats = []
    for item in work:
        if item is not None and item[6] is not None:
            _, _, _, _, RA, RG, A2, G2 = item
            mats += [_sym(RA.T @ A2 @ RA), _sym(RG.T @ G2 @ RG)]
    eigs = iter(ops.eigh_batched(mats, impl=impl, _trusted=True) if mats else [])
    Us, KA, sA, KG, sG, names = [], [], [], [], [], []
    nxt: Optional[Tensor] = None
    for idx, item in enumerate(work):
        if item is None:
            continue
        name, M, psi_a, psi_g, RA, RG, A2, G2 = item
        dtype = RA.dtype
        M = M.to(dtype)
        following = work[idx + 1]
        if psi_a is not None:
            (s_a, E_a), (s_g, E_g) = next(eigs), next(eigs)
            s_a, s_g = s_a.clamp(0.0, 1.0 - 1e-7), s_g.clamp(0.0, 1.0 - 1e-7)  # Sigma stays positive definite
            KA.append(RA @ E_a), sA.append(s_a), KG.append(RG @ E_g), sG.append(s_g)
            nxt = following[1].to(dtype)
            Us.append(M - psi_g @ nxt @ psi_a.T)  # Xi M
        else:
            KA.append(RA), sA.append(torch.zeros_like(RA[0])), KG.append(RG), sG.append(torch.zeros_like(RG[0]))
            Us.append(M)
        names.append(name)
    if not Us:
        return out
    Ws = ops.precondition(Us, KA, sA, KG, [-s for s in sG], 1.0, "eigen", impl=impl, _trusted=True)  # Lambda Xi M
    prev = None  # Xi^T: each layer takes back -Psi^T of its predecessor's
    k = 0
    for item in work:
        if item is None:
            prev = None
            continue
        name, M, psi_a, psi_g = item[:4]
        W = Ws[k].to(item[4].dtype)
        if prev is not None:
            W = W - prev[1].T @ prev[0] @ prev[2]
        out[name] = W.to(M.dtype)
        prev = (Ws[k].to(item[4].dtype), psi_g, psi_a) if psi_a is not None else None
        k += 1
    return out


def _sym(X: Tensor) -> Tensor:
    return 0.5 * (X + X.T)
