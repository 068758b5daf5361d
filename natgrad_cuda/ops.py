"""One Python function per native op; ``impl=`` chooses the implementation.

impl:
  None         native for the tensors' device when it was compiled, else the reference
  "reference"  the pure-PyTorch twin in ``natgrad_cuda.reference``
  "native"     the compiled kernel for the tensors' device (C++ on CPU, CUDA on GPU)
  "emulated"   the CUDA kernel source run on the CPU (CPU tensors); needs the emulated backend

Every op checks its arguments here, once, so that bad input gets an error naming the argument
whichever implementation runs.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch

from . import _ext, emulation, reference

__all__ = ["factor_update_", "eigh_batched", "IMPLS"]

IMPLS = (None, "reference", "native", "emulated")
_FACTOR_DTYPES = (torch.float32, torch.float64)
_INPUT_DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)


def _resolve_impl(impl: Optional[str], device: torch.device) -> str:
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if impl is None:
        return "native" if _ext.native_available(device) else "reference"
    if impl == "native" and not _ext.native_available(device):
        raise RuntimeError(
            f"impl='native' asked for, but natgrad_cuda has no compiled kernels for device "
            f"{device.type!r} (build_info()['backends'] = {_ext.backends()})"
        )
    if impl == "emulated":
        if not emulation.available():
            raise RuntimeError(
                "impl='emulated' asked for, but the CUDA emulation backend is not compiled "
                f"(build_info()['backends'] = {_ext.backends()})"
            )
        if device.type != "cpu":
            raise ValueError(f"impl='emulated' runs on CPU tensors, got tensors on {device}")
    return impl


def _check_finite(name: str, value: float) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        raise TypeError(f"{name} must be a real number, got {value!r}") from None
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    return value


def _check_factor_update_args(factors, inputs, decay, scales, append_ones):
    factors, inputs = list(factors), list(inputs)
    n = len(factors)
    for name, seq in (("inputs", inputs), ("scales", scales), ("append_ones", append_ones)):
        if len(seq) != n:
            raise ValueError(f"factor_update_: {name} has {len(seq)} entries but factors has {n}")
    decay = _check_finite("decay", decay)
    scales = [_check_finite(f"scales[{i}]", s) for i, s in enumerate(scales)]
    append_ones = [bool(a) for a in append_ones]
    device = None
    for i, (F, X, ones) in enumerate(zip(factors, inputs, append_ones)):
        if not isinstance(F, torch.Tensor) or not isinstance(X, torch.Tensor):
            raise TypeError(f"factor_update_: factors[{i}] and inputs[{i}] must be tensors")
        if X.dim() != 2:
            raise ValueError(f"factor_update_: inputs[{i}] must be 2-D (rows, features), got shape {tuple(X.shape)}")
        d = X.shape[1] + int(ones)
        if F.shape != (d, d):
            raise ValueError(
                f"factor_update_: factors[{i}] must have shape ({d}, {d}) for inputs[{i}] of shape "
                f"{tuple(X.shape)} with append_ones={ones}, got {tuple(F.shape)}"
            )
        if F.dtype not in _FACTOR_DTYPES:
            raise ValueError(f"factor_update_: factors[{i}] must be float32 or float64, got {F.dtype}")
        if X.dtype not in _INPUT_DTYPES:
            raise ValueError(f"factor_update_: inputs[{i}] must be fp32, fp64, bf16 or fp16, got {X.dtype}")
        if device is None:
            device = F.device
        if F.device != device or X.device != device:
            raise ValueError(f"factor_update_: factors[{i}] and inputs[{i}] must be on {device}")
    return factors, inputs, decay, scales, append_ones, device


def factor_update_(
    factors: Sequence[torch.Tensor],
    inputs: Sequence[torch.Tensor],
    decay: float,
    scales: Sequence[float],
    append_ones: Sequence[bool],
    impl: Optional[str] = None,
) -> None:
    """For every layer i at once: F_i <- decay * F_i + scales[i] * X~_i^T X~_i, in place.

    X~_i = [X_i, 1] when append_ones[i] (the ones column carries the bias; it is never materialised
    on the native paths). X_i has shape (n_i, d_i) and F_i shape (d_i + append_ones[i],) * 2; factors
    are fp32 or fp64, inputs fp32, fp64, bf16 or fp16; the product accumulates in fp32 at least.
    """
    factors, inputs, decay, scales, append_ones, device = _check_factor_update_args(
        factors, inputs, decay, scales, append_ones
    )
    if not factors:
        return
    impl = _resolve_impl(impl, device)
    if impl == "reference":
        reference.factor_update_(factors, inputs, decay, scales, append_ones)
    elif impl == "native":
        torch.ops.natgrad.factor_update_(factors, inputs, decay, scales, append_ones)
    else:
        torch.ops.natgrad_emu.factor_update_(factors, inputs, decay, scales, append_ones)


def eigh_batched(mats: Sequence[torch.Tensor], impl: Optional[str] = None):
    """[(eigenvalues ascending, eigenvectors as columns)] of every symmetric matrix, one call for all.

    Like torch.linalg.eigh (only the lower triangle is read). Matrices are float32 or float64, of any
    sizes, on one device. A decomposition that fails or is not finite is redone in float64; one that
    still fails comes back as NaN. Rank-deficient and zero matrices are fine.
    """
    mats = list(mats)
    device = None
    for i, M in enumerate(mats):
        if not isinstance(M, torch.Tensor):
            raise TypeError(f"eigh_batched: mats[{i}] must be a tensor, got {type(M).__name__}")
        if M.dim() != 2 or M.shape[0] != M.shape[1]:
            raise ValueError(f"eigh_batched: mats[{i}] must be a square matrix, got shape {tuple(M.shape)}")
        if M.dtype not in _FACTOR_DTYPES:
            raise ValueError(f"eigh_batched: mats[{i}] must be float32 or float64, got {M.dtype}")
        device = M.device if device is None else device
        if M.device != device:
            raise ValueError(f"eigh_batched: mats[{i}] is on {M.device}, mats[0] on {device}")
    if not mats:
        return []
    impl = _resolve_impl(impl, device)
    if impl == "reference":
        return reference.eigh_batched(mats)
    op = torch.ops.natgrad.eigh_batched if impl == "native" else torch.ops.natgrad_emu.eigh_batched
    evals, evecs = op(mats)
    return list(zip(evals, evecs))


if _ext.loaded():

    @torch.library.register_fake("natgrad::factor_update_")
    def _factor_update_fake(factors, inputs, decay, scales, append_ones):
        return None

    @torch.library.register_fake("natgrad_emu::factor_update_")
    def _factor_update_emu_fake(factors, inputs, decay, scales, append_ones):
        return None

    def _eigh_batched_fake(mats):
        return ([M.new_empty(M.shape[:1]) for M in mats], [M.new_empty(M.shape) for M in mats])

    torch.library.register_fake("natgrad::eigh_batched")(_eigh_batched_fake)
    torch.library.register_fake("natgrad_emu::eigh_batched")(_eigh_batched_fake)
