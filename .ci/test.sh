#!/usr/bin/env bash
# Runs the whole suite once per Keras backend, then the lint.
set -uo pipefail
cd "$(dirname "$0")/.."
export TF_CPP_MIN_LOG_LEVEL=3 PYTHONUNBUFFERED=1
status=0
for backend in jax torch tensorflow; do
  echo "=== KERAS_BACKEND=$backend"
  # The docstring examples run too, so they stay runnable.
  KERAS_BACKEND=$backend .venv/bin/python -m pytest -q -p no:cacheprovider \
    tests --doctest-modules keras_gemma "$@" || status=1
done
echo "=== ruff"
.venv/bin/ruff check keras_gemma tests training benchmarks || status=1
exit $status
