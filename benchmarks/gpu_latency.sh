#!/usr/bin/env bash
# The Llama-3-8B reference's latency per action chunk on one CUDA GPU (batch 1, the instruction as a cached
# key/value prefix and, on the same weights, as a joint sequence), in well under 5 minutes:
#   bash benchmarks/gpu_latency.sh [OUT_DIR]            # goal: <= 15 ms per chunk (docs/SCALING.md)
#   PYTHON=.venv/bin/python bash benchmarks/gpu_latency.sh /tmp/out --tiny --device cpu   # CPU smoke test
set -euo pipefail
out=$(mkdir -p "${1:-runs/benchmarks}" && cd "${1:-runs/benchmarks}" && pwd)
shift || true
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
"${PYTHON:-python}" benchmarks/gpu_reference.py --latency-only --out "$out/llama3_8b_latency.json" "$@"
