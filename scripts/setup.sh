#!/usr/bin/env bash
# Sets up everything the two README commands need, idempotently: a virtualenv in .venv, torch
# (the CUDA build, so that the CUDA kernels are compiled), the build tools, and natgrad_cuda itself,
# built with its C++ and CUDA sources. Re-running it rebuilds only what changed (build/ is kept).
#
# Environment: PYTHON (interpreter for the venv, default python3), VENV (default .venv),
# TORCH_SPEC (default torch==2.14.1), NATGRAD_CUDA (AUTO|ON|OFF, default AUTO).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
VENV=$(realpath -m "${VENV:-.venv}")
TORCH_SPEC=${TORCH_SPEC:-torch==2.14.1}

if [ ! -x "$VENV/bin/python" ]; then
  echo "[setup] creating virtualenv $VENV"
  "$PYTHON" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check)

# torch first (several GB for the CUDA build; pip skips it when already satisfied), then the build
# tools, since the package is built without isolation against this very torch.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  echo "[setup] installing $TORCH_SPEC"
  "${PIP[@]}" install -q "$TORCH_SPEC"
fi
# Everything after torch is installed with torch held at the version now in the venv: the test
# extras pull torchvision (curvlinops -> backpack), which pins an exact torch, and pip would
# otherwise swap a CPU-only (or any other) torch for the newest one after the extension was built
# against the first.
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
"$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__.split('+')[0])" > "$CONSTRAINTS"
"${PIP[@]}" install -q -c "$CONSTRAINTS" "scikit-build-core>=0.10" "pybind11>=2.12" ninja numpy

echo "[setup] building and installing natgrad_cuda (NATGRAD_CUDA=${NATGRAD_CUDA:-AUTO}, $(cat "$CONSTRAINTS"))"
"${PIP[@]}" install -q -c "$CONSTRAINTS" --no-build-isolation ".[test,demo]"
# From outside the source tree, so that the installed package (with its extension) is the one imported.
(cd / && "$VENV/bin/python" -m natgrad_cuda info)
