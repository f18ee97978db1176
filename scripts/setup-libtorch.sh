#!/usr/bin/env bash
# Makes the Python virtual environment with torch==2.11.0 from PyPI that `tch` 0.24.0 builds and
# links against (the same libtorch as the GPU machine), and writes .cache/libtorch.env with the
# variables the build and the binary need. Idempotent: a second run only rewrites the env file.
# Usage: source <(scripts/setup-libtorch.sh)    or    scripts/setup-libtorch.sh >/dev/null; source .cache/libtorch.env
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="$ROOT/.cache/torch-venv"
TORCH_VERSION=2.11.0
PYTHON="${PYTHON:-python3}"

if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(0 if torch.__version__.split('+')[0] == '$TORCH_VERSION' else 1)" 2>/dev/null; then
  echo "setup-libtorch: installing torch==$TORCH_VERSION into $VENV (about 2.8 GB)" >&2
  # --no-cache-dir: pip would otherwise keep a second copy of the ~3 GB of wheels in ~/.cache,
  # and CI's disk is tight.
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --no-cache-dir --disable-pip-version-check "torch==$TORCH_VERSION" >&2
fi

# The CUDA C runtime headers (crt/) that the CUDA-graph shim compiles against; PyPI's torch
# brings the CUDA libraries and most headers, but not these.
# The data-parallel shim includes c10d's NCCL header, which reaches cuda_fp16.h and its CCCL
# header nv/target.
for wheel in nvidia-cuda-crt==13.0.88 nvidia-cuda-cccl==13.0.85; do
  if ! "$VENV/bin/pip" show -q "${wheel%%==*}" >/dev/null 2>&1; then
    "$VENV/bin/pip" install -q --no-cache-dir --disable-pip-version-check --no-deps "$wheel" >&2
  fi
done

# gloo's headers, which c10d's ProcessGroupGloo.hpp includes and PyPI's torch does not ship: the
# data-parallel shim (csrc/dist_shim.cpp) is compiled against them; the gloo code itself is inside
# libtorch_cpu.so. Debian's libgloo-dev, unpacked (no install, no root).
GLOO_VERSION=0.0~git20220518.5b14351-3
GLOO_SHA256=80529c9fd8af452faf489e686b94bf87075965c40673803810c4f41634b1e299
GLOO="$ROOT/.cache/gloo"
if [[ ! -f "$GLOO/usr/include/gloo/algorithm.h" ]]; then
  echo "setup-libtorch: fetching gloo headers (Debian libgloo-dev $GLOO_VERSION)" >&2
  tmp="$(mktemp -d)"
  (cd "$tmp" && { apt-get download "libgloo-dev=$GLOO_VERSION" || { apt-get update -qq && apt-get download "libgloo-dev=$GLOO_VERSION"; }; }) >&2 \
    || { echo "setup-libtorch: apt-get download libgloo-dev=$GLOO_VERSION failed (is the Debian registry reachable? try 'apt-get update')" >&2; exit 1; }
  deb="$(ls "$tmp"/libgloo-dev_*.deb)"
  got="$(sha256sum "$deb" | cut -d' ' -f1)"
  [[ "$got" == "$GLOO_SHA256" ]] || { echo "setup-libtorch: sha256 mismatch for $deb: expected $GLOO_SHA256, found $got" >&2; exit 1; }
  rm -rf "$GLOO" && mkdir -p "$GLOO" && dpkg-deb -x "$deb" "$GLOO"
  rm -rf "$tmp"
fi

SITE="$("$VENV/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
LIBS="$SITE/torch/lib"
for d in "$SITE"/nvidia/*/lib "$SITE"/nvidia/cu13/lib; do
  [[ -d "$d" ]] && LIBS="$LIBS:$d"
done
cat > "$ROOT/.cache/libtorch.env" <<ENV
export VIRTUAL_ENV="$VENV"
export PATH="$VENV/bin:\$PATH"
export LIBTORCH_USE_PYTORCH=1
export LD_LIBRARY_PATH="$LIBS\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}"
ENV
cat "$ROOT/.cache/libtorch.env"
