#!/usr/bin/env bash
# The main job: start Real-ESRGAN Ultimate (web UI by default; any main.py subcommand works too).
# First run installs everything into .venv.   Examples:  ./run.sh    ./run.sh enhance photo.jpg -o out.png
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
"$root/scripts/ensure_venv.sh" requirements.txt
exec "$root/.venv/bin/python" "$root/main.py" "$@"
