#!/usr/bin/env bash
# The main job, on a freshly set-up environment (see scripts/setup.sh): trains a CNN on scikit-learn's
# digits with K-FAC, momentum SGD and Adam; table, plot and JSON in outputs/. Extra arguments go to it.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV:-.venv}
exec "$VENV/bin/python" examples/train_digits.py "$@"
