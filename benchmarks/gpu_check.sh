#!/usr/bin/env bash
# backend fsdp on one CUDA GPU (at most 8 minutes): ~1B parameters, 30 steps, tokens/s and MFU, then decode (TP 1).
# Usage, in the repository root of a machine whose python has a CUDA torch and this package's dependencies:
#   bash benchmarks/gpu_check.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:-python3}
nvidia-smi --query-gpu=name,memory.total --format=csv,noheader
PYTHONPATH=. timeout 480 "$PY" benchmarks/gpu_check.py /tmp/gpu-check
