"""The emulated CUDA backend: the CUDA kernel sources compiled for the CPU and run with CUDA's
execution model (grid, blocks, a block's threads as fibers, shared memory, barriers, warp
collectives, atomics), with out-of-bounds accesses and divergent barriers reported as errors.

Ops run there with ``impl="emulated"`` (CPU tensors). Its counters tell how many kernel launches and
library calls (cuBLAS, cuSOLVER) the CUDA path makes, which is how launches per call and per
optimizer step are measured without a GPU::

    with natgrad_cuda.emulation.count() as c:
        natgrad_cuda.ops.factor_update_(factors, inputs, 0.95, scales, ones, impl="emulated")
    c.launches, c.library_calls, c.by_name
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Dict

from . import _ext

__all__ = ["available", "counters", "reset_counters", "count", "Count"]


def available() -> bool:
    return "emulated" in _ext.backends()


def _require():
    if not available():
        raise RuntimeError("the emulated CUDA backend is not compiled into this natgrad_cuda build")


def counters() -> dict:
    """Launches and library calls since the last reset: {"launches", "library_calls", "by_name"}."""
    _require()
    return dict(_ext._C.emulation_counters())


def reset_counters() -> None:
    _require()
    _ext._C.reset_emulation_counters()


@dataclass
class Count:
    launches: int = 0
    library_calls: int = 0
    by_name: Dict[str, int] = field(default_factory=dict)

    @property
    def total(self) -> int:
        return self.launches + self.library_calls


@contextlib.contextmanager
def count():
    """Counts the launches and library calls made inside the block (without resetting the totals)."""
    before = counters()
    result = Count()
    try:
        yield result
    finally:
        after = counters()
        result.launches = after["launches"] - before["launches"]
        result.library_calls = after["library_calls"] - before["library_calls"]
        result.by_name = {k: v - before["by_name"].get(k, 0) for k, v in after["by_name"].items()
                          if v != before["by_name"].get(k, 0)}
