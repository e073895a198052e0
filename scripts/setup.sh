#!/usr/bin/env bash
# Creates .venv and installs the project with its CPU PyTorch. Idempotent: a second run is quick.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
# torch first and pinned: this takes the CPU wheel; an unpinned torch would pull a multi-GB CUDA build.
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[dev]"
echo "environment ready: $(.venv/bin/python -c 'import torch, transformers, robosuite; print(f"torch {torch.__version__}, transformers {transformers.__version__}, robosuite {robosuite.__version__}")' 2>/dev/null)"
