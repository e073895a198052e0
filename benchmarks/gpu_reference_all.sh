#!/usr/bin/env bash
# Every GPU measurement in docs/SCALING.md, one JSON (+ log) each, on one CUDA GPU:
#   bash benchmarks/gpu_reference_all.sh [OUT_DIR] [extra gpu_reference.py flags, e.g. --tiny --device cpu]
# A 32 GB card (the design card's V100) has 31.7 GiB; the cap of 30 GiB leaves room for the CUDA context and
# cuBLAS workspaces, which torch's per-process memory fraction does not count.
set -uo pipefail
out=$(mkdir -p "${1:-runs/benchmarks}" && cd "${1:-runs/benchmarks}" && pwd) || exit 2
shift || true
export HF_HUB_OFFLINE=1 PYTHONUNBUFFERED=1
cd "$(dirname "$0")/.."
status=0
measure() {
  local name=$1
  shift
  echo "=== $name: gpu_reference.py $*"
  "${PYTHON:-python}" benchmarks/gpu_reference.py --out "$out/$name.json" "$@" || status=1
}
# the reference YAML as written (micro-batch 16 x 8 accumulations), on a card of 32 GB
measure llama3_8b_yaml_cap30 --memory-cap-gib 30 "$@"
# the largest micro-batch that fits on a card of 32 GB (128: the whole batch in one pass)
measure llama3_8b_auto_cap30 --memory-cap-gib 30 --micro-batch auto "$@"
# ... without gradient checkpointing (no recomputation, more activation memory)
measure llama3_8b_auto_nockpt_cap30 --memory-cap-gib 30 --micro-batch auto --gradient-checkpointing off "$@"
# the default VLA recipe (MiniLM, configs/vla_minilm_cpu.yaml: batch 256 since 2026-12-04, fp32) on a GPU
measure minilm_yaml --backbone minilm "$@"
exit $status
