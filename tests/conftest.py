import os

import pytest

import natgrad_cuda


def pytest_report_header(config):
    info = natgrad_cuda.build_info()
    return [f"natgrad_cuda {info['version']} from {os.path.dirname(natgrad_cuda.__file__)}",
            f"backends {info['backends']}, torch {info['torch_runtime']}, CUDA {info['cuda_version']}"]


def pytest_sessionstart(session):
    # scripts/test.sh sets this so that a missing or broken build fails loudly instead of every
    # native test quietly running on the reference path.
    if os.environ.get("NATGRAD_REQUIRE_EXTENSION") == "1" and not natgrad_cuda._ext.loaded():
        raise pytest.UsageError(f"natgrad_cuda._C did not load: {natgrad_cuda._ext.import_error()}")
