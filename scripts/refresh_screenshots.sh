#!/usr/bin/env bash
# Refresh the committed browser screenshots in bench/results/browser/. The test suite itself writes its screenshots
# to a temporary folder, so running the tests never changes tracked files; this script is the explicit way to
# update the committed ones (review them, then commit). Extra arguments go to pytest (e.g. -k layout).
# Needs the set-up (scripts/setup.sh) and starts its own Label Studio and backend: a few minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
out=bench/results/browser
mkdir -p "$out"
VLM_AL_SCREENSHOTS="$PWD/$out" .venv/bin/python -m pytest tests/e2e/test_browser.py -m browser -q -p no:cacheprovider "$@"
echo "refresh_screenshots: screenshots written to $out (git diff --stat $out)"
