#!/usr/bin/env bash
# What the browser test (tests/test_ui_browser.py) needs beyond the Python packages: Debian's
# Chromium at /usr/bin/chromium (or $PEFTSERVE_CHROMIUM). Playwright, a dev requirement, drives
# that browser; it never downloads one. Part of the README's test command (and so of .ci/run):
# it does nothing when the browser is there, installs it with apt-get (as root, or with
# password-less sudo) when it is not, and otherwise says why it could not; the browser test
# then fails with the same advice rather than skipping.
set -euo pipefail

CHROMIUM="${PEFTSERVE_CHROMIUM:-/usr/bin/chromium}"
if [ -x "$CHROMIUM" ]; then
    exit 0
fi
say() { echo "install-test-browser: $*" >&2; }
if ! command -v apt-get >/dev/null 2>&1; then
    say "$CHROMIUM is missing and there is no apt-get here: install Chromium and set PEFTSERVE_CHROMIUM to it"
    exit 0
fi
SUDO=()
if [ "$(id -u)" != 0 ]; then
    if sudo -n true 2>/dev/null; then
        SUDO=(sudo -n)
    else
        say "$CHROMIUM is missing; run 'sudo apt-get install chromium' (this script is not root)"
        exit 0
    fi
fi
export DEBIAN_FRONTEND=noninteractive
say "installing Debian's chromium with apt-get (for tests/test_ui_browser.py) ..."
if ! "${SUDO[@]}" apt-get install -y -q chromium >/dev/null; then
    "${SUDO[@]}" apt-get update -q >/dev/null
    "${SUDO[@]}" apt-get install -y -q chromium >/dev/null
fi
"$CHROMIUM" --version >&2 2>/dev/null || true
