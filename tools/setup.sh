#!/usr/bin/env bash
# Installs what the project needs on a fresh Debian machine (idempotent; quick when everything is there):
#   apt: emscripten (the WASM kernel's compiler); npm: the lockfile's packages; Python: .venv with gpu-backend[test,export].
# `setup.sh --no-python` skips the Python part (the worker alone needs none of it).
set -euo pipefail
cd "$(dirname "$0")/.."

need() { command -v "$1" >/dev/null 2>&1 || { echo "setup: '$1' is required but missing ($2)" >&2; exit 1; }; }
need node "install Node.js 20"
need npm "install npm"
need python3 "install Python 3.11+"

if ! command -v emcc >/dev/null 2>&1; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "setup: installing emscripten from Debian"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq emscripten >/dev/null
  else
    echo "setup: emcc is missing: run 'sudo apt-get install emscripten'" >&2; exit 1
  fi
fi

if [ ! -d node_modules ] || [ package-lock.json -nt node_modules/.package-lock.json ]; then
  echo "setup: npm ci"
  npm ci --no-audit --no-fund --loglevel=error
fi

[ "${1:-}" = "--no-python" ] && exit 0

if [ ! -x .venv/bin/python ]; then
  echo "setup: creating .venv"
  python3 -m venv .venv
fi
stamp=.venv/.ringlinear-installed
if [ ! -f "$stamp" ] || [ gpu-backend/pyproject.toml -nt "$stamp" ]; then
  echo "setup: pip install -e gpu-backend[test,export] (first run downloads torch, ~3 GB)"
  .venv/bin/python -m pip install -q --upgrade pip
  .venv/bin/python -m pip install -q -e "gpu-backend[test,export]"
  touch "$stamp"
fi
