import dataclasses
import os

import pytest
import torch

import natgrad_cuda
from natgrad_cuda import ops

# Every test that takes a `device` argument runs once per device present: the CPU always, the GPU when
# torch sees one. Inputs are built on the CPU from seeded generators and moved with `.to(device)`, so
# that both instances see the same numbers; results come back with `.cpu()` to meet the CPU oracles.
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])

# A GPU's rounding is not the CPU's: nvcc contracts multiply-adds into FMAs, tiles and cuSOLVER sum in
# other orders. A few ulps per operation in float64, more accumulated in float32; the bf16/fp16
# tolerances already cover the final rounding, which can flip by one unit.
GPU_SLACK = {torch.float64: 4.0, torch.float32: 8.0, torch.bfloat16: 2.0, torch.float16: 2.0}


def pytest_report_header(config):
    info = natgrad_cuda.build_info()
    return [f"natgrad_cuda {info['version']} from {os.path.dirname(natgrad_cuda.__file__)}",
            f"backends {info['backends']}, torch {info['torch_runtime']}, CUDA {info['cuda_version']}",
            f"devices {DEVICES}"]


def pytest_sessionstart(session):
    # scripts/test.sh sets this so that a missing or broken build fails loudly instead of every
    # native test quietly running on the reference path.
    if os.environ.get("NATGRAD_REQUIRE_EXTENSION") == "1" and not natgrad_cuda._ext.loaded():
        raise pytest.UsageError(f"natgrad_cuda._C did not load: {natgrad_cuda._ext.import_error()}")


def pytest_generate_tests(metafunc):
    if "device" in metafunc.fixturenames:
        metafunc.parametrize("device", [
            pytest.param(d, id=d, marks=[pytest.mark.device] + ([pytest.mark.cuda] if d == "cuda" else []))
            for d in DEVICES])


def _cuda_skip(impl):
    """Why a CUDA instance of implementation (or optimizer backend) ``impl`` cannot run, or None."""
    if impl == "emulated":
        return "impl='emulated' runs the CUDA sources on the CPU: there is no CUDA instance of it"
    if impl == "native" and not natgrad_cuda._ext.native_available(torch.device("cuda")):
        return f"natgrad_cuda was built without its CUDA kernels (backends {natgrad_cuda._ext.backends()})"
    return None


_NAMESPACES = {"natgrad": "native", "natgrad_emu": "emulated"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        params = getattr(getattr(item, "callspec", None), "params", {})
        if params.get("device") != "cuda":
            continue
        # impl= of the ops, backend= of the optimizer, ns: the op namespaces (natgrad_emu is the emulation)
        for name in ("impl", "backend", "ns"):
            reason = _cuda_skip(_NAMESPACES.get(params.get(name), params.get(name)))
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))
                break


@pytest.fixture
def kernel_impls(device):
    """The compiled implementations a test checks against the reference on `device`: the native
    kernels, and on the CPU also the CUDA sources in emulation."""
    if device == "cpu":
        return ("native", "emulated")
    reason = _cuda_skip("native")
    if reason:
        pytest.skip(reason)
    return ("native",)


@pytest.fixture
def tol(device):
    """tol(value, dtype): a tolerance set for the CPU, with the GPU's allowance (GPU_SLACK) on CUDA."""
    def scaled(value, dtype=torch.float64):
        return value * GPU_SLACK[dtype] if device == "cuda" else value
    return scaled


def _moved(t: torch.Tensor, device) -> torch.Tensor:
    """t on `device` with its strides kept: `.to` would make a strided or expanded view contiguous, and
    the tests of non-contiguous inputs would then test contiguous ones on the GPU. The storage span
    the view reaches is copied, and the view taken again there."""
    if t.device.type == torch.device(device).type or t.numel() == 0:
        return t.to(device)
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride()))
    return t.as_strided((span,), (1,)).to(device).as_strided(t.shape, t.stride())


@pytest.fixture
def to_device(device):
    """to_device(x): tensors (strides kept), ConvPatches and (nested) lists and tuples of them moved to
    `device`; other values as they are. On the CPU the very same tensors come back (no copies)."""
    def move(x):
        if isinstance(x, torch.Tensor):
            return _moved(x, device)
        if isinstance(x, ops.ConvPatches):
            return dataclasses.replace(x, image=_moved(x.image, device))
        if isinstance(x, (list, tuple)):
            return type(x)(move(v) for v in x)
        return x
    return move
