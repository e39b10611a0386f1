#!/usr/bin/env bash
# The browser test drives Debian's Chromium through Playwright (browser downloads are not possible offline).
# Installs it with apt when we are root and it is missing; otherwise leaves things as they are.
set -uo pipefail
command -v chromium >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing Debian's chromium for the browser test ..." >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1
fi
command -v chromium >/dev/null 2>&1
