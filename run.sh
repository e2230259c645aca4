#!/usr/bin/env bash
# One entry point for a fresh machine: it creates .venv, installs diffquant, then runs a job.
#   ./run.sh demo [ARGS]   the main job: `diffquant demo` on the built-in models
#   ./run.sh test [ARGS]   lint + the test suite (what CI runs)
#   ./run.sh setup         only install
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=.venv
TORCH_CPU_INDEX=${TORCH_CPU_INDEX:-https://download.pytorch.org/whl/cpu}  # where a plain machine finds +cpu builds
STAMP=$VENV/.installed-$(cat pyproject.toml requirements-cpu.txt requirements-lock.txt | sha1sum | cut -c1-12)

setup() {
  if [ ! -x "$VENV/bin/python" ]; then
    "$PY" -m venv "$VENV"
  fi
  if [ ! -f "$STAMP" ]; then
    "$VENV/bin/python" -m pip install -q --upgrade pip
    # torch first, pinned to its CPU build (requirements-cpu.txt): this machine's wheels if they hold
    # it, else PyTorch's CPU index; on a GPU machine install the CUDA build of torch before running
    # this script (see README).
    if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
      "$VENV/bin/python" -m pip install -q -r requirements-cpu.txt 2>/dev/null \
        || "$VENV/bin/python" -m pip install -q -r requirements-cpu.txt --extra-index-url "$TORCH_CPU_INDEX"
    fi
    "$VENV/bin/python" -m pip install -q -c requirements-lock.txt -e ".[dev,onnx]"  # the versions tested
    rm -f "$VENV"/.installed-*
    touch "$STAMP"
  fi
}

cmd=${1:-demo}
shift || true
case "$cmd" in
  setup) setup ;;
  demo) setup; exec "$VENV/bin/diffquant" demo "$@" ;;
  test)
    setup
    "$VENV/bin/ruff" check src tests benchmarks
    "$VENV/bin/ruff" format --check src tests benchmarks
    exec "$VENV/bin/python" -m pytest "$@"
    ;;
  *) echo "usage: ./run.sh demo|test|setup [ARGS]" >&2; exit 2 ;;
esac
