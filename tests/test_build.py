"""The build: what build_info() reports, and the NATGRAD_CUDA switch of the CMake configure step."""
import json
import re
import os
import shutil
import subprocess
import sys

import pytest
import torch

import natgrad_cuda as ng

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NVCC = shutil.which("nvcc") or (os.path.exists("/usr/local/cuda/bin/nvcc") and "/usr/local/cuda/bin/nvcc")


def test_build_info_contents():
    info = ng.build_info()
    for key in ("version", "torch", "backends", "cuda_version", "cuda_archs"):
        assert key in info
    assert info["version"] == ng.__version__
    if ng._ext.loaded():
        assert "cpu" in info["backends"]
        assert info["torch"] == torch.__version__


@pytest.mark.skipif(not (torch.version.cuda and NVCC), reason="needs a CUDA build of torch and nvcc")
def test_cuda_kernels_compiled_when_possible():
    # The CUDA path is gated on whether it can be compiled, never on torch.cuda.is_available().
    info = ng.build_info()
    assert "cuda" in info["backends"], info
    assert info["cuda_version"] and info["cuda_archs"]
    assert torch.ops.natgrad.factor_update_.default.has_kernel_for_dispatch_key("CUDA")


def test_module_info_command():
    out = subprocess.run([sys.executable, "-m", "natgrad_cuda", "info"], capture_output=True, text=True,
                         check=True, cwd=os.path.dirname(ROOT))
    assert json.loads(out.stdout)["backends"] == ng.build_info()["backends"]


def _configure(tmp_path, value):
    import pybind11

    return subprocess.run(
        ["cmake", "-S", ROOT, "-B", str(tmp_path / "b"), "-G", "Ninja", f"-DNATGRAD_CUDA={value}",
         f"-DPython_EXECUTABLE={sys.executable}", f"-Dpybind11_DIR={pybind11.get_cmake_dir()}"],
        capture_output=True, text=True, env={k: v for k, v in os.environ.items() if k != "NATGRAD_CUDA"})


@pytest.mark.skipif(shutil.which("cmake") is None, reason="needs cmake")
def test_configure_switch(tmp_path):
    bad = _configure(tmp_path, "MAYBE")
    assert bad.returncode != 0 and "NATGRAD_CUDA must be AUTO, ON or OFF" in bad.stderr
    off = _configure(tmp_path, "OFF")
    assert off.returncode == 0, off.stderr
    assert "CUDA kernels not built: NATGRAD_CUDA=OFF" in off.stdout


@pytest.mark.skipif(shutil.which("nm") is None, reason="needs binutils' nm")
def test_the_two_builds_of_the_cuda_sources_keep_their_own_symbols():
    # The CUDA sources are linked into one module twice (nvcc, and the host compiler for the
    # emulator), with different bodies for their host helpers and library entry points. A helper
    # defined under one name in both would let the linker bind the GPU path to the emulated code
    # (or the reverse); so each build's helpers live in their own namespace, and the emulated cuBLAS
    # and cuSOLVER never under the libraries' global names.
    lib = ng._ext._C.__file__
    out = subprocess.run(["nm", "-C", "--defined-only", lib], capture_output=True, text=True, check=True).stdout
    names = [line.split(" ", 2)[2] for line in out.splitlines() if line.count(" ") >= 2]
    assert any("natgrad::" in n for n in names), "no symbol table: a stripped build (pyproject keeps it)"
    helpers = ("upload(", "uninitialized(", "current_stream(", "blas_handle(", "solver_handle(", "SolverParams::",
               "DeviceGuard::")
    shared = [n for n in names if any(n.startswith("natgrad::" + h) for h in helpers)]
    assert not shared, f"build-specific helpers outside a build's namespace: {shared[:5]}"
    library = [n for n in names if re.match(r"(cublas|cusolver)\w*\(|cuda[A-Z]\w*\(", n)]
    assert not library, f"CUDA library names defined in the module: {library[:5]}"
