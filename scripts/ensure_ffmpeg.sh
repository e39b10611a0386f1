#!/usr/bin/env bash
# The app runs with imageio-ffmpeg's bundled ffmpeg (no ffprobe). The video tests also cover the ffprobe probe
# path and an older system ffmpeg when Debian's ffmpeg is installed: install it with apt when we are root and it
# is missing; otherwise leave things as they are (those tests are then skipped).
set -uo pipefail
command -v ffprobe >/dev/null 2>&1 && exit 0
if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "Installing Debian's ffmpeg (for the ffprobe tests) ..." >&2
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends ffmpeg) \
    >/dev/null 2>&1
fi
command -v ffprobe >/dev/null 2>&1
