#!/usr/bin/env bash
# On the GPU machine (shared/GPU.md): the stage commands on a real card. Carry
# target/release/hawada and .cache/assets/fashion-mnist. Writes under $OUT:
#   tiny/      a tiny self-trained ResNet run on CUDA (f32), `export --gates` of its gates into a
#              second run directory (compared byte for byte), `export --fraction 0.6`, and
#              `finetune` of that slim model on the GPU; fixture/ holds its teacher and slim model
#              for the CPU fine-tune test (fixtures/gpu-slim-resnet);
#   fmnist/    recipes/h100/fmnist-resnet18-small-bf16.toml run, then `export --fraction 0.6`
#              from its gates: the export search's candidates measured on the card.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck disable=SC1091
source scripts/gpu-env.sh
ROOT="$PWD"
H="$ROOT/target/release/hawada"
check_libraries gpu-stages.sh "$H"
OUT="${OUT:-out}"
mkdir -p "$OUT/tiny" "$OUT/fmnist"
nvidia-smi --query-gpu=name,driver_version --format=csv,noheader | tee "$OUT/card.txt"

tiny="$OUT/tiny/tiny.toml"
cat > "$tiny" <<TOML
name = "tiny-gpu"
device = "cuda"
[model]
dir = "$OUT/tiny/teacher"
[teacher_training]
epochs = 0.05
batch = 64
lr = 0.003
[teacher_training.config]
architectures = ["ResNet"]
model_type = "resnet"
block_type = "basic"
layers = [1, 1]
stem = "small"
num_channels = 1
image_size = 28
num_labels = 10
base_width = 8
channels_per_gate = 2
[data]
format = "idx"
dir = "$ROOT/.cache/assets/fashion-mnist"
holdout = 500
[latency]
batch = 256
[target]
fraction = 0.7
[adapt]
steps = 40
batch = 64
probe_every = 10
checkpoint_every = 20
[finetune]
steps = 40
batch = 64
lr = 0.003
checkpoint_every = 20
[eval]
batch = 2000
TOML
( cd "$OUT/tiny"
  "$H" run tiny.toml --run-dir first
  "$H" export tiny.toml --gates first/gates.json --run-dir second
  if cmp first/slim-before-finetune/model.safetensors second/slim-before-finetune/model.safetensors; then
    echo "export --gates: slim model identical to the run's"
  else
    echo "export --gates: slim model DIFFERS from the run's (picks: $(grep -o '"picked": true' -c first/export.json))"
  fi
  "$H" export tiny.toml --gates first --fraction 0.6 --run-dir third
  "$H" finetune third/slim-before-finetune --teacher teacher --recipe tiny.toml --run-dir tuned
  "$H" eval tuned/slim --recipe tiny.toml
  mkdir -p fixture && cp -r teacher fixture/teacher && cp -r third/slim-before-finetune fixture/slim
  rm -rf first/checkpoints second/checkpoints third/checkpoints tuned/checkpoints
) 2>&1 | tee "$OUT/tiny/log.txt"

( $H run recipes/h100/fmnist-resnet18-small-bf16.toml --run-dir "$OUT/fmnist/run"
  $H export recipes/h100/fmnist-resnet18-small-bf16.toml --gates "$OUT/fmnist/run" --fraction 0.6 --run-dir "$OUT/fmnist/export-0.6"
  rm -rf "$OUT/fmnist/run/checkpoints" "$OUT/fmnist/run/slim" "$OUT/fmnist/run/slim-before-finetune" "$OUT/fmnist/export-0.6/slim-before-finetune"
) 2>&1 | tee "$OUT/fmnist/log.txt"
