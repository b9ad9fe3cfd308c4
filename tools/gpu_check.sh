#!/usr/bin/env bash
# Measures a GPU in one command (<= 10 min on one H100): model parity fp32/bf16, cuDNN vs XLA attention,
# bench/gpu.py (step MFU, rollout tokens/s), the demo end to end -> OUT/summary.json + summary.md.
# Usage: tools/gpu_check.sh [--out runs/gpu_check] [--parts ...] [--dry-run]   (logic: bench/gpu_check.py)
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" -m bench.gpu_check "$@"
