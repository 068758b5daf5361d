#!/usr/bin/env bash
# The GPU check: on a machine with a GPU, torch (a CUDA build), nvcc and CMake but nothing of ours,
# builds natgrad_cuda for the local GPU only (into a virtualenv that sees the system torch, or a
# --target folder, or with plain CMake when pip cannot get the build tools), then runs
#   tests      pytest -m cuda (the CUDA instances of the device-parametrised tests)
#   ops        one small call of every op with impl="native" on CUDA tensors
#   sanitizer  that same program under compute-sanitizer: memcheck, racecheck, synccheck, initcheck
#   optimizer  20 K-FAC steps, backend="native" against backend="reference", MLP and CNN, float64
#   timing     every op at a small and a large shape against torch's own equivalents (CUDA events)
# and writes one JSON ($OUT/gpu_check.json when OUT is set, else ./gpu_check.json, or --out PATH)
# with a printed summary. Each stage has a time limit and the whole run a deadline (GPU_CHECK_DEADLINE
# seconds, default 470: under 8 minutes); what is skipped is recorded with the reason.
#
#   bash scripts/gpu_check.sh [--out PATH] [--no-build] [--dry-run]
#
# --no-build uses the natgrad_cuda that $PYTHON (default python3) already imports. --dry-run runs the
# Python stages on the CPU with tiny shapes and the CPU kernels as "native" (no build, tests or
# sanitizer): a check of the script's own logic on a machine without a GPU; PYTHON defaults there to
# the repository's .venv when it has one.
# Environment: PYTHON, GPU_CHECK_DEADLINE, GPU_CHECK_WORK (scratch folder, default a fresh /tmp one),
# NATGRAD_CUDA_ARCHS (default: the local GPU's compute capability, e.g. 90).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
DRIVER="$REPO/scripts/gpu_check.py"

DRY=0
BUILD=1
OUT_JSON=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1; BUILD=0 ;;
    --no-build) BUILD=0 ;;
    --out) OUT_JSON="$2"; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu_check: unknown argument $1" >&2; exit 2 ;;
  esac
  shift
done
if [ -z "$OUT_JSON" ]; then
  OUT_JSON="${OUT:-.}/gpu_check.json"
fi
OUT_JSON=$(realpath -m "$OUT_JSON")

DEADLINE=${GPU_CHECK_DEADLINE:-470}
WORK=${GPU_CHECK_WORK:-$(mktemp -d /tmp/gpu_check.XXXXXX)}
mkdir -p "$WORK"
WORK=$(realpath "$WORK")
STAGES="$WORK/stages.tsv"
: > "$STAGES"

if [ -n "${PYTHON:-}" ]; then
  PY=$PYTHON
elif [ "$DRY" = 1 ] && [ -x "$REPO/.venv/bin/python" ]; then
  PY="$REPO/.venv/bin/python"
else
  PY=python3
fi
PYBIN=$PY   # the interpreter that imports the package under test (the venv's once it is built)

log() { echo "[gpu_check] $*"; }
record() {  # stage status seconds note
  printf '%s\t%s\t%s\t%s\n' "$1" "$2" "$3" "${4//$'\t'/ }" >> "$STAGES"
  log "$1: $2 ($3 s) $4"
}
# The seconds a stage may take: what it asks for, cut to what the deadline leaves (15 s kept for the
# report); 0 when too little is left to start it.
budget() {
  local want=$1 left=$(( DEADLINE - SECONDS - 15 ))
  if [ "$left" -lt "${2:-10}" ]; then echo 0; elif [ "$left" -lt "$want" ]; then echo "$left"; else echo "$want"; fi
}
# run_stage NAME SECONDS LOGFILE CMD...: the command under `timeout`, recorded as ok, failed or timeout.
run_stage() {
  local name=$1 want=$2 logfile=$3; shift 3
  local limit start rc
  limit=$(budget "$want")
  if [ "$limit" = 0 ]; then record "$name" skipped 0 "deadline: no time left"; return 3; fi
  start=$SECONDS
  log "$name (limit ${limit} s, log $logfile)"
  timeout --kill-after=10 "$limit" "$@" > "$logfile" 2>&1
  rc=$?
  local took=$(( SECONDS - start ))
  if [ $rc = 124 ] || [ $rc = 137 ]; then record "$name" timeout "$took" "over its ${limit} s limit"
  elif [ $rc = 0 ]; then record "$name" ok "$took" ""
  else record "$name" failed "$took" "exit $rc: $(tail -n 3 "$logfile" | tr '\n' ' ' | cut -c1-300)"; fi
  return $rc
}
# The driver, run from outside the source tree (so that the installed package is the one imported),
# as a command that `timeout` can run: "${DRV[@]}" SUBCOMMAND ARGS...
set_driver() { DRV=(bash -c 'cd "$0" && exec "$@"' "$WORK" "$PYBIN" "$DRIVER"); }
set_driver

# ---- dry run: the Python stages on the CPU ---------------------------------------------------------
if [ "$DRY" = 1 ]; then
  record build skipped 0 "dry run"
  record tests skipped 0 "dry run: the CUDA tests need a GPU"
  record sanitizer skipped 0 "dry run: compute-sanitizer needs a GPU"
  run_stage env 60 "$WORK/env.log" "${DRV[@]}" env --device cpu --work "$WORK"
  run_stage ops 120 "$WORK/ops.log" "${DRV[@]}" ops --device cpu --scale tiny --work "$WORK"
  run_stage optimizer 120 "$WORK/optimizer.log" "${DRV[@]}" optimizer --device cpu --steps 2 --work "$WORK"
  run_stage timing 120 "$WORK/timing.log" "${DRV[@]}" timing --device cpu --scales tiny --reps 2 --budget 60 --work "$WORK"
  "${DRV[@]}" report --work "$WORK" --out "$OUT_JSON"
  log "JSON: $OUT_JSON (scratch: $WORK)"
  exit 0
fi

# ---- env -------------------------------------------------------------------------------------------
start=$SECONDS
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" > "$WORK/env.log" 2>&1; then
  record env failed $(( SECONDS - start )) "$PY cannot import torch or torch sees no GPU: $(tail -n 2 "$WORK/env.log" | tr '\n' ' ')"
  "${DRV[@]}" report --work "$WORK" --out "$OUT_JSON"
  exit 1
fi
ARCH=${NATGRAD_CUDA_ARCHS:-$("$PY" -c "import torch; print('%d%d' % torch.cuda.get_device_capability())")}
NVCC=$(command -v nvcc || ls "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" 2>/dev/null || true)
SANITIZER=$(command -v compute-sanitizer || ls "${CUDA_HOME:-/usr/local/cuda}/bin/compute-sanitizer" 2>/dev/null \
            || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null || true)
record env ok $(( SECONDS - start )) "arch $ARCH, nvcc ${NVCC:-none}, cmake $(cmake --version 2>/dev/null | head -n1 | awk '{print $3}'), compute-sanitizer ${SANITIZER:-none}"

# ---- build -----------------------------------------------------------------------------------------
build_package() {  # in a subshell under `timeout`: exit 0 when a natgrad_cuda with CUDA kernels imports
  set -u
  export NATGRAD_CUDA=ON NATGRAD_CUDA_ARCHS="$ARCH" CMAKE_BUILD_PARALLEL_LEVEL=$(nproc)
  local pip=() site=""
  # a virtualenv that sees the system torch; a --target folder where that cannot be (no venv support,
  # or $PY itself in a virtualenv, whose packages a new one does not see)
  if "$PY" -m venv --system-site-packages "$WORK/venv" && "$WORK/venv/bin/python" -m pip --version > /dev/null 2>&1 \
      && "$WORK/venv/bin/python" -c "import torch" 2>/dev/null; then
    PYBIN="$WORK/venv/bin/python"
    pip=("$PYBIN" -m pip --disable-pip-version-check)
    echo "venv: $WORK/venv (system site-packages visible)"
  elif "$PY" -m pip --version > /dev/null 2>&1; then
    site="$WORK/site"
    pip=("$PY" -m pip --disable-pip-version-check)
    echo "no usable venv: installing into --target $site"
  else
    site="$WORK/site"
    echo "no pip at all: plain CMake only"
  fi
  # the build tools, where missing (the machine may have no network: no retries)
  local missing=()
  "$PYBIN" -c "import scikit_build_core" 2>/dev/null || missing+=("scikit-build-core>=0.10")
  "$PYBIN" -c "import pybind11" 2>/dev/null || missing+=("pybind11>=2.12")
  command -v ninja > /dev/null || "$PYBIN" -c "import ninja" 2>/dev/null || missing+=(ninja)
  if [ ${#missing[@]} -gt 0 ] && [ ${#pip[@]} -gt 0 ]; then
    echo "installing ${missing[*]}"
    "${pip[@]}" install -q --retries 0 --timeout 10 ${site:+--target "$site"} "${missing[@]}" \
      || echo "pip could not install ${missing[*]} (no network?)"
  fi
  [ -n "$site" ] && export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  local build_dir="$REPO/build/gpu-check-sm$ARCH"
  if "$PYBIN" -c "import scikit_build_core, pybind11" 2>/dev/null && [ ${#pip[@]} -gt 0 ]; then
    echo "BUILD_METHOD=pip"
    # the build folder through scikit-build-core's environment (older pips have no --config-settings)
    SKBUILD_BUILD_DIR="$build_dir" "${pip[@]}" install --no-build-isolation --no-deps ${site:+--target "$site"} \
      "$REPO" || return 1
  elif "$PYBIN" -c "import pybind11" 2>/dev/null && command -v cmake > /dev/null; then
    echo "BUILD_METHOD=cmake (scikit-build-core missing)"
    site="$WORK/site"
    local version gen=()
    version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$REPO/pyproject.toml" | head -n1)
    command -v ninja > /dev/null && gen=(-G Ninja)
    cmake -S "$REPO" -B "$build_dir-cmake" "${gen[@]}" -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$PYBIN" \
      -Dpybind11_DIR="$("$PYBIN" -m pybind11 --cmakedir)" -DSKBUILD_PROJECT_VERSION="$version" || return 1
    cmake --build "$build_dir-cmake" || return 1
    mkdir -p "$site/natgrad_cuda"
    cp -r "$REPO"/natgrad_cuda/. "$site/natgrad_cuda/"
    cp "$build_dir-cmake"/_C*.so "$site/natgrad_cuda/" || return 1
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
  else
    echo "cannot build: pybind11 (and scikit-build-core) missing and pip could not install them"
    return 1
  fi
  echo "PYBIN=$PYBIN"
  echo "PYTHONPATH=${PYTHONPATH:-}"
  (cd "$WORK" && "$PYBIN" -c "import natgrad_cuda, sys; b = natgrad_cuda.build_info(); print(b); \
sys.exit(0 if 'cuda' in b['backends'] else 1)")
}
if [ "$BUILD" = 1 ]; then
  export -f build_package
  export PY REPO WORK ARCH PYBIN
  run_stage build 300 "$WORK/build.log" bash -c build_package
  build_rc=$?
  # what the build chose, for the stages after it
  PYBIN=$(sed -n 's/^PYBIN=//p' "$WORK/build.log" | tail -n1)
  PYBIN=${PYBIN:-$PY}
  built_path=$(sed -n 's/^PYTHONPATH=//p' "$WORK/build.log" | tail -n1)
  [ -n "$built_path" ] && export PYTHONPATH="$built_path"
  method=$(sed -n 's/^BUILD_METHOD=//p' "$WORK/build.log" | tail -n1)
  printf 'build_method\tinfo\t0\t%s\n' "${method:-none}" >> "$STAGES"
else
  build_rc=0
  record build skipped 0 "--no-build: $PYBIN's natgrad_cuda"
fi
set_driver
"${DRV[@]}" env --work "$WORK" > "$WORK/env_driver.log" 2>&1 || true
if [ "$build_rc" != 0 ]; then
  for stage in ops sanitizer tests optimizer timing; do record "$stage" skipped 0 "the build failed"; done
  "${DRV[@]}" report --work "$WORK" --out "$OUT_JSON"
  log "JSON: $OUT_JSON (scratch: $WORK)"
  exit 1
fi

# ---- the stages on the GPU -------------------------------------------------------------------------
run_stage ops 120 "$WORK/ops.log" "${DRV[@]}" ops --work "$WORK"

if [ -n "$SANITIZER" ]; then
  # the four tools at once (separate processes, a few small calls each): one stage's time for all
  for tool in memcheck racecheck synccheck initcheck; do
    # no caching allocator: its pooled blocks would hide accesses past a tensor's end from memcheck
    run_stage "sanitizer_$tool" 120 "$WORK/sanitizer_$tool.log" env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
      bash -c "cd '$WORK' && '$SANITIZER' --tool $tool --print-limit 20 '$PYBIN' '$DRIVER' ops --work '$WORK/san_$tool'" &
  done
  wait
else
  record sanitizer skipped 0 "compute-sanitizer not found (PATH, \$CUDA_HOME/bin, /usr/local/cuda/bin)"
fi

# pytest and hypothesis run the tests; modules whose imports are missing here are collection errors,
# reported, while the rest still run
if ! "$PYBIN" -c "import pytest, hypothesis" 2>/dev/null; then
  "$PYBIN" -m pip install -q --retries 0 --timeout 10 pytest hypothesis > "$WORK/pip_tests.log" 2>&1 || true
fi
if "$PYBIN" -c "import pytest, hypothesis" 2>/dev/null; then
  run_stage tests 180 "$WORK/tests.log" bash -c "cd '$WORK' && NATGRAD_REQUIRE_EXTENSION=1 '$PYBIN' -m pytest \
    -p no:cacheprovider --import-mode=importlib -m cuda -q -rs --continue-on-collection-errors \
    --junitxml='$WORK/junit.xml' '$REPO/tests'"
else
  record tests skipped 0 "pytest or hypothesis not importable and pip could not install them"
fi

run_stage optimizer 60 "$WORK/optimizer.log" "${DRV[@]}" optimizer --work "$WORK"

# the timing stage gets what is left, and stops measuring 20 s before its limit
limit=$(budget 150 30)
if [ "$limit" = 0 ]; then
  record timing skipped 0 "deadline: no time left"
else
  run_stage timing "$limit" "$WORK/timing.log" "${DRV[@]}" timing --work "$WORK" --budget $(( limit - 20 ))
fi

"${DRV[@]}" report --work "$WORK" --out "$OUT_JSON"
log "JSON: $OUT_JSON (scratch: $WORK, ${SECONDS} s in all)"
