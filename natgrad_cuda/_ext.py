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


# What was compiled does not change while the process runs; the ops ask on every call.
_BACKENDS = tuple(_C.build_info()["backends"]) if _C is not None else ()


def backends() -> list:
    return list(_BACKENDS)


def native_available(device: torch.device) -> bool:
    """Compiled kernels exist for tensors on ``device``."""
    device_type = device.type if isinstance(device, torch.device) else torch.device(device).type
    return device_type in ("cpu", "cuda") and device_type in _BACKENDS
