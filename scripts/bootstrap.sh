#!/usr/bin/env bash
# Create .venv with CPU torch first, then fedmq and its dev extras. Idempotent: a stamp file
# skips the install when pyproject.toml has not changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv
TORCH_VERSION=2.13.0

if [ ! -x "$VENV/bin/python" ]; then
  if ! "$PY" -m venv "$VENV" 2>/dev/null; then
    # Debian's python3 ships without ensurepip until python3-venv is installed
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
      apt-get update -qq && apt-get install -y -qq python3-venv >/dev/null
      rm -rf "$VENV"; "$PY" -m venv "$VENV"
    else
      echo "bootstrap: cannot create a venv; install python3-venv" >&2; exit 1
    fi
  fi
fi
stamp="$VENV/.fedmq-installed"
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first: an unpinned torch would pull a multi-GB CUDA build
  "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION"
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
  touch "$stamp"
fi
