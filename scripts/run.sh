#!/usr/bin/env bash
# The main job, on a freshly set-up environment (see scripts/setup.sh): K-FAC against the exact
# GGN of a network trained on scikit-learn's digits; figures in outputs/. Extra arguments go to it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV:-.venv}
exec "$VENV/bin/python" examples/curvature_digits.py "$@"
