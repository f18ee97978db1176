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
  "$PYTHON" -m venv "$VENV"
  "$VENV/bin/pip" install -q --disable-pip-version-check "torch==$TORCH_VERSION" >&2
fi

# The CUDA C runtime headers (crt/) that the CUDA-graph shim compiles against; PyPI's torch
# brings the CUDA libraries and most headers, but not these.
if ! "$VENV/bin/pip" show -q nvidia-cuda-crt >/dev/null 2>&1; then
  "$VENV/bin/pip" install -q --disable-pip-version-check --no-deps "nvidia-cuda-crt==13.0.88" >&2
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
