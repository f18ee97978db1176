#!/usr/bin/env bash
# Renders a run's report.html in headless Chromium to a PNG, to look at the report as a reader
# would. Installs Debian's chromium-headless-shell when missing (needs apt and root).
# Usage: scripts/screenshot-report.sh RUN_DIR [OUT.png]   (default OUT: RUN_DIR/report.png)
set -euo pipefail
RUN_DIR="$(cd "${1:?usage: screenshot-report.sh RUN_DIR [OUT.png]}" && pwd)"
OUT="${2:-$RUN_DIR/report.png}"
command -v chromium-headless-shell >/dev/null || apt-get install -y -q chromium-headless-shell >&2
chromium-headless-shell --no-sandbox --disable-gpu --hide-scrollbars --window-size=1280,2700 \
  --screenshot="$OUT" "file://$RUN_DIR/report.html" 2>/dev/null
echo "$OUT"
