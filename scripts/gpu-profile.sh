#!/usr/bin/env bash
# On the GPU machine: `hawada profile` of each recipe given (keep-all latency, measured site
# tables, fidelity of the table and FLOP proxies on held-out random sub-architectures).
# Prints each report and copies each profile.json to $OUT/<recipe name>.profile.json.
# Usage: bash scripts/gpu-profile.sh recipes/h100/resnet18-224-bf16.toml [...]
set -euo pipefail
OUT="${OUT:-gpu-out}"
SITE=/opt/torch/.venv/lib/python3.12/site-packages
export LD_LIBRARY_PATH="$SITE/torch/lib:$SITE/nvidia/cu13/lib:$SITE/nvidia/cudnn/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
WORK="$(mktemp -d)"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu-profile.txt") 2>&1
for recipe in "$@"; do
  name="$(basename "$recipe" .toml)"
  target/release/hawada profile "$recipe" --run-dir "$WORK/$name"
  cp "$WORK/$name/profile.json" "$OUT/$name.profile.json"
done
