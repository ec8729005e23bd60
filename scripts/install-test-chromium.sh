#!/usr/bin/env bash
# Debian's chromium, for the HTML report's browser test (tests/test_report_browser.py).
#
#   scripts/install-test-chromium.sh    print the browser's path on stdout, nothing else
#
# Idempotent and quiet: when chromium (or chromium-browser) is on PATH it only
# prints its path. Otherwise, as root, it installs Debian's chromium package
# (apt's output goes to a log, shown only if the install fails). Not as root it
# says what to install and exits 1.
set -euo pipefail

LOG=${TRAINGUARD_CHROMIUM_LOG:-/tmp/trainguard-install-chromium.log}

log() { echo "install-test-chromium: $*" >&2; }

find_browser() {
  command -v chromium 2>/dev/null || command -v chromium-browser 2>/dev/null
}

if BROWSER=$(find_browser); then
  echo "$BROWSER"
  exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
  log "chromium not found; install Debian's chromium package (as root: apt-get install chromium)"
  exit 1
fi
log "installing Debian's chromium package (log: $LOG)"
if ! { apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } \
  >"$LOG" 2>&1; then
  tail -n 30 "$LOG" >&2
  log "apt-get failed"
  exit 1
fi
BROWSER=$(find_browser) || { log "chromium installed but not found on PATH"; exit 1; }
echo "$BROWSER"
