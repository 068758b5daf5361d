"""Every descent update is a natural-gradient step: the metric that makes it one.

Shoji, Suzuki and Kozachkov, "Is All Learning (Natural) Gradient Descent?" (arXiv:2409.16422,
2024): for a gradient g and an update u with g^T u < 0 there is a symmetric positive definite M
with u = -M^-1 g (up to the step length, which M absorbs). With v = -u (the descent direction, so
g^T v > 0) that is M v = g. Every such M has the form

    M = g g^T / (g^T v) + sum_i c_i c_i^T,   c_i ⊥ v, the c_i spanning the complement of v,

(M - g g^T/(g^T v) is positive semidefinite with v in its kernel), and the paper's canonical metric
takes the c_i orthonormal. The metric with the smallest condition number is explicit too: its
condition number is (1 + sin θ)/(1 - sin θ), θ the angle between g and v, the Kantorovich-type
bound that any SPD matrix mapping v to g must meet.

``metric_from_update(grad, update, kind)`` builds M (a P x P matrix, P the number of parameters);
``min_condition_number(grad, update)`` gives that smallest condition number in O(P) without M.
"""
from __future__ import annotations

import math
from typing import Sequence, Tuple, Union

import torch
from torch import Tensor

__all__ = ["metric_from_update", "min_condition_number", "KINDS"]

KINDS = ("canonical", "min-condition")

TensorOrList = Union[Tensor, Sequence[Tensor]]


def _flatten(name: str, value: TensorOrList) -> Tuple[Tensor, Tuple[int, ...]]:
    """One flat vector (a list of tensors concatenated in order, as params' grads) and the
    numel of each piece (to catch two lists that only agree in total)."""
    if isinstance(value, Tensor):
        pieces = [value]
    elif isinstance(value, (list, tuple)):
        pieces = list(value)
        bad = [type(p).__name__ for p in pieces if not isinstance(p, Tensor)]
        if bad:
            raise TypeError(f"{name} must be a tensor or a list/tuple of tensors, got a list holding {bad[0]}")
    else:
        raise TypeError(f"{name} must be a tensor or a list/tuple of tensors, got {type(value).__name__}")
    for p in pieces:
        if not p.is_floating_point():  # ints, bools and complex have no place in a real metric
            raise ValueError(f"{name} must be floating point (float32 or float64), got {p.dtype}")
    devices = {p.device for p in pieces}
    if len(devices) > 1:
        raise ValueError(f"{name}'s tensors lie on several devices: {sorted(map(str, devices))}")
    if not pieces:
        return torch.zeros(0), ()
    flat = torch.cat([p.detach().reshape(-1) for p in pieces]) if len(pieces) > 1 else pieces[0].detach().reshape(-1)
    return flat, tuple(p.numel() for p in pieces)


def _prepare(grad: TensorOrList, update: TensorOrList):
    """Validates the pair and returns the result dtype and, in float64, what every construction
    needs: g, |g|, |v|, the unit vectors ĝ and v̂, w = ĝ - cos θ v̂, cos θ and sin θ."""
    g, g_sizes = _flatten("grad", grad)
    u, u_sizes = _flatten("update", update)
    if g.numel() != u.numel():
        raise ValueError(f"grad and update must have the same number of elements, got {g.numel()} and {u.numel()}")
    if (isinstance(grad, (list, tuple)) and isinstance(update, (list, tuple)) and g_sizes != u_sizes):
        raise ValueError(f"grad and update hold tensors of different sizes: {list(g_sizes)} and {list(u_sizes)}")
    if g.numel() == 0:
        raise ValueError("grad and update are empty (P == 0): there is no metric to build")
    if g.device != u.device:
        raise ValueError(f"grad and update must be on the same device, got {g.device} and {u.device}")
    dtype = torch.promote_types(g.dtype, u.dtype)
    if not bool(torch.isfinite(g).all()):
        raise ValueError("grad has non-finite entries (inf or nan)")
    if not bool(torch.isfinite(u).all()):
        raise ValueError("update has non-finite entries (inf or nan)")
    # The scalars in float64 whatever the input: the descent test and cos θ near 90 degrees are
    # where float32 would lose the sign or every digit.
    g64, v64 = g.to(torch.float64), -u.to(torch.float64)
    g_norm, v_norm = float(torch.linalg.vector_norm(g64)), float(torch.linalg.vector_norm(v64))
    if g_norm == 0.0 or v_norm == 0.0:
        which = "grad" if g_norm == 0.0 else "update"
        raise ValueError(f"{which} is zero: a zero {'gradient' if which == 'grad' else 'update'} is no descent step "
                         "(grad^T update must be < 0)")
    g_hat, v_hat = g64 / g_norm, v64 / v_norm
    cos = float(torch.dot(g_hat, v_hat))
    if not cos > 0.0:
        raise ValueError(f"update is not a descent direction: grad^T update = {-cos * g_norm * v_norm:.3g} >= 0 "
                         f"(angle to -grad {math.degrees(math.acos(max(-1.0, min(1.0, cos)))):.2f} degrees); "
                         "no positive definite metric M gives update = -M^-1 grad")
    cos = min(cos, 1.0)
    w = g_hat - cos * v_hat  # the part of g's direction orthogonal to v: |w| = sin θ, accurate near 0
    sin = min(float(torch.linalg.vector_norm(w)), 1.0)
    return dict(dtype=dtype, g64=g64, g_norm=g_norm, v_norm=v_norm, g_hat=g_hat, v_hat=v_hat,
                w=w, cos=cos, sin=sin)


def _condition(cos: float, sin: float) -> float:
    # (1 + sin)/(1 - sin) = ((1 + sin)/cos)^2: no cancellation near θ = 90 degrees.
    ratio = (1.0 + sin) / cos
    return ratio * ratio if ratio < 1e154 else math.inf


def min_condition_number(grad: TensorOrList, update: TensorOrList) -> float:
    """The smallest condition number of any SPD M with update = -M^-1 grad: (1 + sin θ)/(1 - sin θ),
    θ the angle between -update and grad (1.0 when they are parallel). O(P) time and memory, no M.

    grad, update: as for ``metric_from_update``. Raises ValueError for the same inputs. The value
    is computed in float64; it is ``inf`` only when cos θ is so small that it overflows.
    """
    s = _prepare(grad, update)
    return _condition(s["cos"], s["sin"])


def _sum_of_squares(p: int, diag: float, terms, dtype, device) -> Tensor:
    """diag * I + sum_k sign_k y_k y_k^T, built from outer products of a vector with itself, so that
    the result is symmetric to the last bit (y_i y_j == y_j y_i)."""
    m = torch.zeros(p, p, dtype=dtype, device=device)
    # Not addr_: its vectorised body and scalar tail may round y_i y_j differently (FMA or not).
    # Row blocks keep the temporary small next to M itself.
    rows = max(1, (1 << 22) // p)
    for sign, y in terms:
        y = y.to(dtype)
        for i in range(0, p, rows):
            block = torch.outer(y[i:i + rows], y)  # one rounding per entry, y_i y_j == y_j y_i
            m[i:i + rows].add_(block if sign > 0 else block.neg_())
    m.diagonal().add_(diag)
    return m


def metric_from_update(grad: TensorOrList, update: TensorOrList, kind: str = "canonical") -> Tensor:
    """The symmetric positive definite metric M, shape (P, P), with update = -M^-1 grad, that is
    M @ (-update) == grad: the update is the natural-gradient step of M (Shoji et al. 2024).

    grad, update: tensors with the same number of elements P (any shapes; flattened), or
      lists/tuples of tensors (a model's parameters' grads and changes), concatenated flattened in
      order; float32 or float64 (float16/bfloat16 are computed in float32). M has their promoted
      dtype and lies on their device; it does not track gradients.
    kind, with v = -update and θ the angle between grad and v (cos θ = g^T v / (|g| |v|) > 0):
      "canonical": Shoji et al.'s canonical form M = g g^T/(g^T v) + sum_i c_i c_i^T with the c_i an
        orthonormal basis of v's orthogonal complement, that is
            M = I - v v^T/(v^T v) + g g^T/(g^T v),
        the BFGS update of the identity with step v and gradient change g (secant equation
        M v = g). Eigenvalue 1 on the complement of span{g, v}; in that plane the two roots of
        λ^2 - (1 + ρ/cos θ) λ + ρ cos θ, ρ = |g|/|v|. Not scale invariant: its condition
        number grows with ρ and 1/ρ as well as with θ.
      "min-condition": an SPD M with M v = g of the smallest possible condition number,
        (1 + sin θ)/(1 - sin θ) (see ``min_condition_number``). With e1 = v/|v| and e2 the unit
        vector of g's component orthogonal to v, it is ρ times
            [[cos θ, sin θ], [sin θ, (1 + sin^2 θ)/cos θ]]
        on span{e1, e2} (determinant 1, eigenvalues (1 ± sin θ)/cos θ, eigenvectors at 45 degrees
        to the bisector of g and v) and ρ I on the orthogonal complement: ρ, the geometric mean of
        the plane's eigenvalues, lies between them, so the complement adds nothing to the condition
        number, and it makes the parallel case (θ = 0) and P = 1 come out as M = ρ I (condition
        number 1).

    Raises ValueError for: an update that is not a descent direction (grad^T update >= 0, which
    includes a zero grad or update), different numbers of elements (or, for two lists, tensors of
    different sizes), non-finite entries, an unknown ``kind``, a non-floating dtype, P == 0, and
    grad and update on different devices; TypeError for something that is not a tensor or a
    list/tuple of tensors.
    """
    if not isinstance(kind, str) or kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    s = _prepare(grad, update)
    dtype, device, p = s["dtype"], s["g64"].device, s["g64"].numel()
    # float16/bfloat16 have too few digits to build M in; compute in float32, return as asked.
    work = dtype if dtype in (torch.float32, torch.float64) else torch.float32
    cos, rho = s["cos"], s["g_norm"] / s["v_norm"]
    if p == 1:
        # The one SPD 1x1 matrix with M v = g, which both kinds are; built directly, because the
        # canonical formula's 1 - v̂^2 + g^2/(g v) would cancel 1 - 1 and leave rounding error.
        m = torch.full((1, 1), rho, dtype=work, device=device)
    elif kind == "canonical":
        # I - v̂ v̂^T + g g^T/(g^T v) = I - v̂ v̂^T + (g/sqrt(g^T v)) (g/sqrt(g^T v))^T.
        gv = s["g_norm"] * s["v_norm"] * cos
        m = _sum_of_squares(p, 1.0, [(-1.0, s["v_hat"]), (1.0, s["g64"] / math.sqrt(gv))], work, device)
    else:
        # In the (non-orthonormal, but never singular) frame U = [v̂, w], w = ĝ - cos θ v̂ = sin θ e2:
        #   M / ρ = I + U C U^T,  C = [[cos θ - 1, 1], [1, (2 + cos θ)/(cos θ (1 + cos θ))]],
        # the block above rewritten without dividing by sin θ (1 - cos θ = sin^2/(1 + cos)), so
        # that θ -> 0 is smooth and reaches ρ I. (M/ρ) v̂ = cos θ v̂ + w = ĝ holds with the very cos θ
        # and w computed, hence M v = g to rounding. C = Σ λ_k c_k c_k^T makes M a sum of signed
        # squares of the vectors U c_k.
        c = torch.tensor([[cos - 1.0, 1.0], [1.0, (2.0 + cos) / (cos * (1.0 + cos))]], dtype=torch.float64)
        lam, vecs = torch.linalg.eigh(c)
        frame = torch.stack([s["v_hat"], s["w"]], dim=1)  # (P, 2), float64
        terms = []
        for k in range(2):
            scale = rho * float(lam[k])
            if scale != 0.0:
                y = frame @ vecs[:, k].to(device) * math.sqrt(abs(scale))
                terms.append((math.copysign(1.0, scale), y))
        m = _sum_of_squares(p, rho, terms, work, device)
    return m if m.dtype == dtype else m.to(dtype)
