#!/usr/bin/env bash
# The test suite. First run installs the runtime and test dependencies into .venv.
# Extra arguments go to pytest:  ./test.sh -k tiling -x
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$root/scripts/ensure_venv.sh" requirements-dev.txt
"$root/scripts/ensure_browser.sh" || echo "No Chromium found: the browser test will be skipped." >&2
"$root/scripts/ensure_ffmpeg.sh" || echo "No system ffmpeg/ffprobe: the ffprobe video tests will be skipped." >&2
cd "$root"
exec "$root/.venv/bin/python" -m pytest "$@"
