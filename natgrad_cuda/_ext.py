"""Loads the compiled extension ``natgrad_cuda._C`` (which also registers the ``natgrad::`` ops).

The package works without it (pure-PyTorch reference path); ``build_info()`` says what was compiled.
"""
from __future__ import annotations

import torch

try:  # torch must be imported first: _C links against libtorch and registers ops with it
    from . import _C  # type: ignore[attr-defined]

    _IMPORT_ERROR = None
except ImportError as exc:  # not built, or built against another torch
    _C = None
    _IMPORT_ERROR = exc


def loaded() -> bool:
    return _C is not None


def import_error():
    return _IMPORT_ERROR


def backends() -> list:
    return list(_C.build_info()["backends"]) if _C is not None else []


def native_available(device: torch.device) -> bool:
    """Compiled kernels exist for tensors on ``device``."""
    device = torch.device(device)
    if device.type == "cpu":
        return "cpu" in backends()
    if device.type == "cuda":
        return "cuda" in backends()
    return False
