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
  .venv/bin/python -m pip install --quiet --disable-pip-version-check -e '.[local,test,export,tracking]'
  touch "$stamp"
  echo "[setup] installed genray into .venv in $(( $(date +%s) - started ))s"
fi
# Headless Chromium renders the pages genray writes and serves in the tests (Debian's package; CI's machine starts
# without it). Needs root or sudo; elsewhere say how, and the browser tests will say it again.
if ! command -v chromium >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    started=$(date +%s)
    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) >/dev/null 2>&1 \
      || { echo "[setup] apt-get install chromium failed" >&2; exit 1; }
    echo "[setup] installed chromium in $(( $(date +%s) - started ))s"
  elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo apt-get update -qq && sudo DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null
  else
    echo "[setup] chromium is missing: install it (apt-get install -y chromium) for the browser tests" >&2
  fi
fi
