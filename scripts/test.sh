#!/usr/bin/env bash
# The whole test suite, on a freshly set-up environment (see scripts/setup.sh).
# Extra arguments go to pytest, for example: scripts/test.sh -k curvature -x
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
VENV=${VENV:-.venv}
# Tests import the installed package (not the source tree) and insist on its compiled extension.
export NATGRAD_REQUIRE_EXTENSION=1
# pytest (not python -m pytest, which would put the source tree first on sys.path).
exec "$VENV/bin/pytest" -p no:cacheprovider --import-mode=importlib "$@"
