#!/usr/bin/env bash
# On the GPU machine (shared/GPU.md): the binary built here, against the machine's PyTorch 2.11.
# Prints `hawada info`, HawAda's bench and PyTorch's baseline for the same workloads in the same
# call with their ratios, then runs the ResNet-18 224² recipe end to end. Results under $OUT
# (at most 8 files come back from the GPU machine: the run directory stays in a temp folder).
# Usage (from the repo root there): bash scripts/gpu-bench.sh [RECIPE]   (SKIP_RUN=1: bench only)
set -euo pipefail
OUT="${OUT:-gpu-out}"
RECIPE="${1:-recipes/h100/resnet18-224-bf16.toml}"
source "$(dirname "${BASH_SOURCE[0]}")/gpu-env.sh"
BIN=target/release/hawada
WORK="$(mktemp -d)"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu.txt") 2>&1
check_libraries gpu-bench "$BIN"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
"$BIN" info
# A-B-B-A: HawAda, PyTorch, PyTorch, HawAda; compare.py averages each side.
"$BIN" bench "$RECIPE" --out "$WORK/bench"
cp "$WORK/bench/bench.json" "$OUT/bench1.json"
python3 bench/torch_baseline.py --slim-dir "$WORK/bench/slim" --batch 256 --step-batch 128 --dtype bf16 --out "$OUT/torch1.json"
python3 bench/torch_baseline.py --slim-dir "$WORK/bench/slim" --batch 256 --step-batch 128 --dtype bf16 --out "$OUT/torch2.json"
"$BIN" bench "$RECIPE" --out "$WORK/bench"
cp "$WORK/bench/bench.json" "$OUT/bench2.json"
python3 bench/compare.py --hawada "$OUT/bench1.json" "$OUT/bench2.json" --torch "$OUT/torch1.json" "$OUT/torch2.json"
[[ "${SKIP_RUN:-0}" == 1 ]] && exit 0
"$BIN" -v run "$RECIPE" --run-dir "$WORK/run"
cp "$WORK/run/summary.json" "$WORK/run/report.html" "$WORK/run/latency.json" "$OUT/"
