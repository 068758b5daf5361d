"""Finiteness checks on the device, over many tensors at once (one host synchronisation)."""
from __future__ import annotations

from typing import List

import torch
from torch import Tensor

__all__ = ["norms_of", "all_finite", "HALF"]

HALF = (torch.float16, torch.bfloat16)


def norms_of(tensors: List[Tensor], ord_=2) -> Tensor:
    """The norms of every tensor as one vector, from vectorised passes; half-precision tensors are
    reduced in float32 (their 2-norm overflows early)."""
    low = [t.dtype in HALF for t in tensors]
    if not any(low):
        return torch.stack(torch._foreach_norm(tensors, ord_))
    if all(low):
        return torch.stack(torch._foreach_norm(tensors, ord_, dtype=torch.float32))
    return torch.stack([torch.linalg.vector_norm(t, ord_, dtype=torch.float32 if h else None).float()
                        for t, h in zip(tensors, low)])


def all_finite(tensors: List[Tensor]) -> bool:
    """Whether every entry of every tensor is finite, with one sync in the usual case. The 2-norms
    come from one vectorised pass; they are finite unless an entry is not or the sum of squares
    overflows, so only a non-finite 2-norm pays for the exact test (max-norms, which cannot overflow
    but are a slower, unvectorised reduction on the CPU)."""
    if not tensors:
        return True
    if bool(norms_of(tensors).isfinite().all()):
        return True
    return bool(norms_of(tensors, float("inf")).isfinite().all())
