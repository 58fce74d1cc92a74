#!/usr/bin/env bash
# Acceptance check of a machine with one CUDA GPU (at most 10 minutes); without CUDA it runs small and says
# what it skipped. Prints one table (bench/gpu_check.py has the rows); paste it into docs/benchmarks.md with
# the date and the machine.
#   bash bench/gpu_check.sh [--out runs/gpu-check] [--images 2000] [--steps 200]
set -euo pipefail
cd "$(dirname "$0")/.."
exec timeout 600 python bench/gpu_check.py "$@"
