#!/usr/bin/env bash
# Create .venv at the repo root and install the given requirements file into it, once.
# Re-installs only when the requirements files change (a hash stamp in .venv).
# Usage: scripts/ensure_venv.sh requirements.txt|requirements-dev.txt
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
req="${1:-requirements.txt}"
venv="$root/.venv"
py="${PYTHON:-python3}"

if ! "$py" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null; then
  echo "Python 3.10 or newer is needed (found: $("$py" --version 2>&1)). Set PYTHON=/path/to/python3.x" >&2
  exit 1
fi
if [ ! -x "$venv/bin/python" ]; then
  echo "Creating virtual environment in $venv ..." >&2
  "$py" -m venv "$venv"
fi
stamp="$venv/.installed-$(basename "$req" .txt)"
want="$(cat "$root/requirements.txt" "$root/$req" | sha256sum | cut -d' ' -f1)"
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  echo "Installing $req into .venv (first run downloads PyTorch: a few GB, a few minutes) ..." >&2
  "$venv/bin/python" -m pip install --quiet --upgrade pip >&2
  # torch first, together with torchvision, so both come from the registry as one matching pair.
  "$venv/bin/python" -m pip install --quiet "torch>=2.6" "torchvision>=0.21" >&2
  "$venv/bin/python" -m pip install --quiet -r "$root/$req" >&2
  echo "$want" > "$stamp"
fi
