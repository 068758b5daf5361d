"""natgrad_cuda: K-FAC natural-gradient optimization for PyTorch with fused C++/CUDA kernels."""
from __future__ import annotations

__version__ = "0.1.0"

from . import _ext, emulation, ops, reference  # noqa: E402
from . import curvature  # noqa: E402
from .optimizer import KFAC, KFACPreconditioner  # noqa: E402
from .ngd import NGD  # noqa: E402
from .metric import metric_from_update, min_condition_number  # noqa: E402


def build_info() -> dict:
    """What this installation was built with: version, torch, backends, CUDA version and archs.

    ``backends`` lists "cpu" (C++ kernels), "cuda" (CUDA kernels compiled by nvcc) and "emulated"
    (CUDA kernel source runnable on the CPU), whichever were compiled; it is empty when the
    extension is missing, in which case everything runs on the pure-PyTorch reference path.
    """
    import torch

    if _ext.loaded():
        info = dict(_ext._C.build_info())
    else:
        info = {"version": __version__, "torch": None, "backends": [], "cuda_version": None, "cuda_archs": [],
                "extension_error": str(_ext.import_error())}
    info["torch_runtime"] = torch.__version__
    info["cuda_available"] = torch.cuda.is_available()
    return info


__all__ = ["KFAC", "KFACPreconditioner", "NGD", "metric_from_update", "min_condition_number", "build_info", "ops", "reference", "curvature", "emulation", "__version__"]
