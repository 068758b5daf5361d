"""Pure-PyTorch twins of the native ops: readable, float64-capable, the oracle in tests.

Every function here has the same name and arguments as its op in ``natgrad_cuda.ops`` (without
``impl``). Argument checking lives in ``ops``; these functions assume valid input.
"""
from __future__ import annotations

from typing import Sequence

import torch

__all__ = ["factor_update_", "accumulation_dtype"]


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
        new = decay * F.to(acc) + scale * (X.T @ X)
        F.copy_(new)
