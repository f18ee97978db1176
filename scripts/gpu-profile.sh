#!/usr/bin/env bash
# On the GPU machine: `hawada profile` of each recipe given (keep-all latency, measured site
# tables, fidelity of the table and FLOP proxies on held-out random sub-architectures).
# Prints each report and copies each profile.json to $OUT/<recipe name>.profile.json.
# Usage: bash scripts/gpu-profile.sh recipes/h100/resnet18-224-bf16.toml [...]
set -euo pipefail
OUT="${OUT:-gpu-out}"
source "$(dirname "${BASH_SOURCE[0]}")/gpu-env.sh"
WORK="$(mktemp -d)"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/gpu-profile.txt") 2>&1
check_libraries gpu-profile target/release/hawada
for recipe in "$@"; do
  name="$(basename "$recipe" .toml)"
  target/release/hawada profile "$recipe" --run-dir "$WORK/$name"
  cp "$WORK/$name/profile.json" "$OUT/$name.profile.json"
done
