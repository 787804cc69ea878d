#!/usr/bin/env bash
# Create .venv and install genray with everything the demo and the tests need (including the local
# S3-compatible server, moto). Idempotent: reinstalls only when pyproject.toml changed.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
stamp=.venv/.genray-installed
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  started=$(date +%s)
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[local,test,export]'
  touch "$stamp"
  echo "[setup] installed genray into .venv in $(( $(date +%s) - started ))s"
fi
