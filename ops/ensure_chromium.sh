#!/usr/bin/env bash
# Make sure headless Chromium is there for the /ops page test: install Debian's package if missing.
# Never fails the build: without Chromium that one test skips and says why.
set -uo pipefail

if command -v chromium >/dev/null 2>&1; then
  echo "Chromium: $(command -v chromium)"
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "Chromium is not installed and apt-get is not available: the /ops browser test will skip." >&2
  exit 0
fi
sudo=""
if [ "$(id -u)" -ne 0 ]; then
  sudo="sudo"
fi
echo "Chromium: installing it for the /ops browser test ($sudo apt-get update; $sudo apt-get install -y chromium)..."
if $sudo apt-get update -qq && $sudo apt-get install -y -qq chromium; then
  echo "Chromium: installed at $(command -v chromium)"
else
  echo "Chromium could not be installed: the /ops browser test will skip." >&2
fi
exit 0
