#!/usr/bin/env bash
# Sets up a virtual environment (if absent) and runs the whole test suite on the CPU.
#   bash tests/run.sh [extra pytest args]
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.11}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
. .venv/bin/activate
python -m pip install -q --upgrade pip
python -m pip install -q -e ".[test,parity]"
# One line width and no unused or undefined names (ruff.toml); fails on drift before any test runs.
python -m ruff check --no-cache .
# Tests never use an accelerator; a persistent compilation cache speeds up the subprocess tests.
export JAX_PLATFORMS=cpu TF_CPP_MIN_LOG_LEVEL=2 CUDA_VISIBLE_DEVICES=""
export JAX_COMPILATION_CACHE_DIR="$PWD/.jax_cache" JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0.5
exec python -m pytest -n 2 --dist loadfile --durations=25 "$@"
