"""Pure-PyTorch twins of the native ops: readable, float64-capable, the oracle in tests.

Every function here has the same name and arguments as its op in ``natgrad_cuda.ops`` (without
``impl``). Argument checking lives in ``ops``; these functions assume valid input.
"""
from __future__ import annotations

import math
from typing import List, Sequence, Tuple

import torch

__all__ = ["factor_update_", "eigh_batched", "eigh_lowrank", "damped_inverse", "precondition",
           "ekfac_precondition", "kron_matmul", "kfac_update_", "kl_nu", "accumulation_dtype", "INVERSES"]

INVERSES = ("eigen", "factored")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; every other floating dtype accumulates in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def factor_update_(
    factors: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    decay: float,
    scales: Sequence[float],
    append_ones: Sequence[bool],
) -> None:
    """F_i <- decay * F_i + scales[i] * X~_i^T X~_i, X~_i = [X_i, 1] when append_ones[i] (in place).

    The product is formed in the factor's accumulation dtype (fp32 at least), whatever the input dtype.
    """
    for F, X, scale, ones in zip(factors, inputs, scales, append_ones):
        acc = accumulation_dtype(F.dtype)
        X = X.to(acc)
        if ones:
            X = torch.cat([X, X.new_ones(X.shape[0], 1)], dim=1)
        new = scale * (X.T @ X)
        if decay != 0:  # decay 0 does not read F (as BLAS's beta = 0): F may start uninitialised
            new = decay * F.to(acc) + new
        F.copy_(new)


def eigh_batched(mats: Sequence[torch.Tensor]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """(eigenvalues ascending, eigenvectors) of every symmetric matrix, like torch.linalg.eigh.

    A decomposition that fails or is not finite is retried in float64 (and cast back); one that
    still fails comes back filled with NaN, so that the caller can keep an earlier one.
    """
    out = []
    for M in mats:
        result = _try_eigh(M)
        if result is None and M.dtype != torch.float64:
            result = _try_eigh(M.double())
            if result is not None:
                result = (result[0].to(M.dtype), result[1].to(M.dtype))
        if result is None:
            nan = float("nan")
            result = (M.new_full(M.shape[:1], nan), torch.full_like(M, nan))
        out.append(result)
    return out


def _try_eigh(M: torch.Tensor):
    if not bool(torch.isfinite(M).all()):
        return None
    try:
        evals, evecs = torch.linalg.eigh(M)
    except RuntimeError:  # LAPACK did not converge
        return None
    if not (bool(torch.isfinite(evals).all()) and bool(torch.isfinite(evecs).all())):
        return None
    return evals, evecs


def eigh_lowrank(mats: Sequence[torch.Tensor], ranks: Sequence[int]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
    """The ``ranks[i]`` largest eigenpairs of every symmetric matrix, (eigenvalues ascending (r,),
    eigenvectors (n, r)), from its full decomposition (``eigh_batched``): the oracle of the
    randomized ``ops.eigh_lowrank``."""
    return [(d[d.shape[0] - r:], Q[:, Q.shape[1] - r:]) for (d, Q), r in zip(eigh_batched(mats), ranks)]


def damped_inverse(mats: Sequence[torch.Tensor], shifts: Sequence[float]) -> List[torch.Tensor]:
    """(F_i + shifts[i] I)^-1 of every symmetric matrix (lower triangle read) by Cholesky, in F_i's
    dtype. A factorisation that fails (a matrix not positive definite after the shift) or gives a
    non-finite inverse is retried in float64 and cast back; one that still fails comes back filled
    with NaN, so that the caller can fall back to another method."""
    out = []
    for F, shift in zip(mats, shifts):
        result = _try_inverse(F, shift)
        if result is None and F.dtype != torch.float64:
            result = _try_inverse(F.double(), shift)
            result = None if result is None else result.to(F.dtype)
        out.append(torch.full_like(F, float("nan")) if result is None else result)
    return out


def _try_inverse(F: torch.Tensor, shift: float):
    S = F.tril() + F.tril(-1).mT
    S.diagonal().add_(shift)
    L, info = torch.linalg.cholesky_ex(S)
    if int(info) != 0 or not bool(torch.isfinite(L).all()):
        return None
    inv = torch.cholesky_inverse(L)
    return inv if bool(torch.isfinite(inv).all()) else None


def kron_matmul(grads: Sequence[torch.Tensor], IA: Sequence[torch.Tensor], IG: Sequence[torch.Tensor]
                ) -> List[torch.Tensor]:
    """IG_i M_i IA_i for every layer's (out, in) gradient matrix M_i: (IG (x) IA) applied to it
    (symmetric IA (in, in) and IG (out, out), the damped inverses of the factored damping). Computed in the
    factors' dtype and returned in the gradient's."""
    return [(ig @ M.to(ia.dtype) @ ia).to(M.dtype) for M, ia, ig in zip(grads, IA, IG)]


def precondition(
    grads: Sequence[torch.Tensor],
    QA: Sequence[torch.Tensor],
    dA: Sequence[torch.Tensor],
    QG: Sequence[torch.Tensor],
    dG: Sequence[torch.Tensor],
    damping: float,
    inverse: str = "eigen",
) -> List[torch.Tensor]:
    """The damped inverse of G (x) A applied to every layer's (out, in) gradient matrix M.

    A = QA diag(dA) QA^T and G = QG diag(dG) QG^T (eigenvalues clamped at zero by the caller).
    inverse="eigen": (G (x) A + damping I)^-1 exactly, QG [(QG^T M QA) / (dG dA^T + damping)] QA^T.
    inverse="factored": (G + sqrt(damping)/pi I)^-1 M (A + pi sqrt(damping) I)^-1 with
    pi = sqrt((tr A / dim A) / (tr G / dim G)) (Martens and Grosse 2015), the same sandwich with the
    denominator (dG + sqrt(damping)/pi)(dA + pi sqrt(damping))^T. Computed in the factors' dtype
    and returned in the gradient's.

    Low rank: QA may be (in, rA) with rA < in (and QG (out, rG)), the leading eigenpairs of a
    factor whose other eigenvalues are zero. Then, with D as above over the kept pairs,
    eigen:    P = M / damping + QG [V * (1/D - 1/damping)] QA^T,  V = QG^T M QA;
    factored: P = S_G M S_A,  S = I/g + Q diag(1/(d + g) - 1/g) Q^T  (g the side's shift),
    both the same operator as the full decomposition with the missing eigenvalues set to zero.
    """
    out = []
    for grad, qa, da, qg, dg in zip(grads, QA, dA, QG, dG):
        M = grad.to(qa.dtype)
        low_rank = qa.shape[1] < qa.shape[0] or qg.shape[1] < qg.shape[0]
        root = math.sqrt(damping)
        if inverse == "factored":
            pi = factored_pi(da, dg, qa.shape[0], qg.shape[0])
            ga, gg = pi * root, root / pi
        if not low_rank:
            V = qg.T @ M @ qa
            denom = torch.outer(dg, da) + damping if inverse == "eigen" else torch.outer(dg + gg, da + ga)
            P = qg @ (V / denom) @ qa.T
        elif inverse == "eigen":
            V = qg.T @ M @ qa
            W = 1.0 / (torch.outer(dg, da) + damping) - 1.0 / damping
            P = M / damping + qg @ (V * W) @ qa.T
        else:
            T = M / ga + ((M @ qa) * (1.0 / (da + ga) - 1.0 / ga)) @ qa.T
            P = T / gg + qg @ ((qg.T @ T) * (1.0 / (dg + gg) - 1.0 / gg)[:, None])
        out.append(P.to(grad.dtype))
    return out


def ekfac_precondition(
    grads: Sequence[torch.Tensor],
    QA: Sequence[torch.Tensor],
    QG: Sequence[torch.Tensor],
    S: Sequence[torch.Tensor],
    damping: float,
) -> List[torch.Tensor]:
    """EKFAC (George et al. 2018): every layer's (out, in) gradient matrix M rescaled in the Kronecker
    eigenbasis, QG [(QG^T M QA) / (S + damping)] QA^T (elementwise division).

    QA (in, in) and QG (out, out) are full orthonormal eigenbases of A and G; S (out, in) holds the
    scaling of each eigendirection (the second moments of the rotated gradients, where K-FAC would
    take dG dA^T). Computed in the factors' dtype and returned in the gradient's.
    """
    out = []
    for grad, qa, qg, s in zip(grads, QA, QG, S):
        V = qg.T @ grad.to(qa.dtype) @ qa
        out.append((qg @ (V / (s + damping)) @ qa.T).to(grad.dtype))
    return out


def factored_pi(dA: torch.Tensor, dG: torch.Tensor, dim_a: int = None, dim_g: int = None) -> torch.Tensor:
    """pi = sqrt((tr A / dim A) / (tr G / dim G)) from the eigenvalues (the kept ones of a low-rank
    decomposition, over the full dimension ``dim_a`` / ``dim_g``); 1 when either trace is zero (a
    dead layer), so that the damping still splits evenly."""
    ta = dA.sum() / (dim_a or max(dA.shape[0], 1))
    tg = dG.sum() / (dim_g or max(dG.shape[0], 1))
    ok = (ta > 0) & (tg > 0)
    return torch.where(ok, (ta / torch.where(ok, tg, 1.0)).sqrt(), torch.ones_like(ta))


def kl_nu(directions: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], clipped: Sequence[bool], lr: float,
          kl_clip: float) -> torch.Tensor:
    """The KL-clip scale nu = min(1, sqrt(kl_clip / (lr^2 sum over clipped i of <d_i, g_i>))) as a
    0-d float64 tensor (no host synchronisation); 1 when kl_clip <= 0 or the sum is not positive."""
    device = directions[0].device if len(directions) else None
    one = torch.ones((), dtype=torch.float64, device=device)
    terms = [torch.vdot(d.reshape(-1).double(), g.reshape(-1).double())
             for d, g, c in zip(directions, grads, clipped) if c]
    if not kl_clip > 0 or not terms:
        return one
    vg = torch.stack(terms).sum() * lr * lr
    return torch.where(vg > 0, (kl_clip / vg.clamp_min(1e-300)).sqrt().clamp(max=1.0), one)


def kfac_update_(
    params: Sequence[torch.Tensor],
    directions: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    momentum_buffers: Sequence[torch.Tensor],
    clipped: Sequence[bool],
    lr: float,
    momentum: float,
    weight_decay: float,
    kl_clip: float,
) -> torch.Tensor:
    """In place, as torch.optim.SGD after the trust region: d = d_i (* nu if clipped_i) + weight_decay p;
    buf = momentum buf + d (when buffers are given; they start at zero); p -= lr (buf or d).
    Returns nu (see ``kl_nu``)."""
    nu = kl_nu(directions, grads, clipped, lr, kl_clip)
    for i, p in enumerate(params):
        d = directions[i]
        if clipped[i]:
            d = d * nu.to(d.dtype)
        d = d + weight_decay * p
        if len(momentum_buffers):
            buf = momentum_buffers[i]
            buf.mul_(momentum).add_(d)
            d = buf
        p.add_(d, alpha=-lr)
    return nu
