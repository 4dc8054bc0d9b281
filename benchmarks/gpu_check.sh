#!/usr/bin/env bash
# The GPU check (see benchmarks/gpu_check.py): real-size step with the autoregressive module off / all /
# sliding and a 1-GPU FSDP run; on a machine without CUDA it runs the tiny CPU mode instead.
# Usage: bash benchmarks/gpu_check.sh [--steps N] [--json PATH] ...   (writes benchmarks/RESULTS.md)
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
PYTHON="${PYTHON:-python}"
exec timeout 600 "$PYTHON" benchmarks/gpu_check.py --write "$@"
