#!/usr/bin/env bash
# Creates .venv with keras_gemma, all three backends and the test oracles.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch 2.13.0 is the CPU build this machine carries; any other torch would
# pull a multi-GB CUDA build. Users on GPUs install their own torch.
.venv/bin/python -m pip install -q "torch==2.13.0" -e ".[jax,tensorflow,test]"
