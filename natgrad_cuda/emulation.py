"""The emulated CUDA backend: the CUDA kernel sources compiled for the CPU and run with CUDA's
execution model (grid, blocks, a block's threads as fibers, shared memory, barriers, warp
collectives, atomics), with out-of-bounds and misaligned accesses, divergent barriers and shared
memory beyond a GPU's limits reported as errors. Shared memory, and memory a kernel is to fill,
start as NaN bytes, so that reading what nobody wrote shows.

Ops run there with ``impl="emulated"`` (CPU tensors). Its counters tell how many kernel launches and
library calls (cuBLAS, cuSOLVER) the CUDA path makes, which is how launches per call and per
optimizer step are measured without a GPU::

    with natgrad_cuda.emulation.count() as c:
        natgrad_cuda.ops.factor_update_(factors, inputs, 0.95, scales, ones, impl="emulated")
    c.launches, c.library_calls, c.by_name

A kernel's result must not depend on the order its blocks and threads run in. ``checked()`` runs
launches under another schedule and with the shadow-memory race detector, which reports two
threads of a block touching one element between barriers (at least one writing), or two blocks of a
launch touching one global element (at least one writing); atomics are exempt::

    with natgrad_cuda.emulation.checked(schedule="preempt", seed=3):
        natgrad_cuda.ops.precondition(..., impl="emulated")   # a race raises RuntimeError

The environment variables NATGRAD_EMU_SCHEDULE, NATGRAD_EMU_SEED and NATGRAD_EMU_RACES (0 or 1)
set the same for a whole process, for example a test run.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Dict, Optional

from . import _ext

__all__ = ["available", "counters", "reset_counters", "count", "Count", "SCHEDULES", "checks", "set_checks",
           "checked"]

# forward: blocks and threads in index order, each thread uninterrupted until it waits; reverse:
# both reversed; shuffle: seeded random orders, reshuffled at every turn; preempt: shuffle, and a
# thread may also be switched out at any memory access.
SCHEDULES = ("forward", "reverse", "shuffle", "preempt")


def available() -> bool:
    return "emulated" in _ext.backends()


def _require():
    if not available():
        raise RuntimeError("the emulated CUDA backend is not compiled into this natgrad_cuda build")


def counters() -> dict:
    """Launches, library calls, block barriers passed and descriptor tables uploaded since the last
    reset: {"launches", "library_calls", "barriers", "uploads", "by_name"}."""
    _require()
    return dict(_ext._C.emulation_counters())


def reset_counters() -> None:
    _require()
    _ext._C.reset_emulation_counters()


@dataclass
class Count:
    launches: int = 0
    library_calls: int = 0
    barriers: int = 0  # __syncthreads() passed, summed over blocks (a kernel's loop trips)
    uploads: int = 0  # descriptor tables copied to the device (identical tables are cached)
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
        result.barriers = after["barriers"] - before["barriers"]
        result.uploads = after["uploads"] - before["uploads"]
        result.by_name = {k: v - before["by_name"].get(k, 0) for k, v in after["by_name"].items()
                          if v != before["by_name"].get(k, 0)}


def checks() -> dict:
    """The schedule emulated launches run under, its seed, and whether races are detected."""
    _require()
    schedule, seed, races = _ext._C.emulation_checks()
    return {"schedule": schedule, "seed": seed, "races": races}


def set_checks(schedule: Optional[str] = None, seed: Optional[int] = None, races: Optional[bool] = None) -> None:
    """Sets what ``checks()`` returns; arguments left None keep their value."""
    _require()
    now = checks()
    schedule = now["schedule"] if schedule is None else schedule
    seed = now["seed"] if seed is None else seed
    races = now["races"] if races is None else races
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 64:
        raise ValueError(f"seed must be an int in [0, 2**64), got {seed!r}")
    if not isinstance(races, bool):
        raise ValueError(f"races must be a bool, got {races!r}")
    _ext._C.set_emulation_checks(schedule, seed, races)


@contextlib.contextmanager
def checked(schedule: str = "forward", seed: int = 0, races: bool = True):
    """Runs the emulated launches inside the block under ``schedule`` (one of SCHEDULES) and, when
    ``races``, with the race detector; the previous settings come back on exit."""
    before = checks()
    set_checks(schedule, seed, races)
    try:
        yield
    finally:
        set_checks(**before)


def _from_environment():
    env = {k: os.environ.get(k) for k in ("NATGRAD_EMU_SCHEDULE", "NATGRAD_EMU_SEED", "NATGRAD_EMU_RACES")}
    if not any(env.values()) or not available():
        return
    races = env["NATGRAD_EMU_RACES"]
    if races not in (None, "0", "1"):
        raise ValueError(f"NATGRAD_EMU_RACES must be 0 or 1, got {races!r}")
    seed = env["NATGRAD_EMU_SEED"]
    set_checks(env["NATGRAD_EMU_SCHEDULE"] or None, None if seed is None else int(seed),
               None if races is None else races == "1")


_from_environment()
