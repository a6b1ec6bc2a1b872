#!/usr/bin/env bash
# Edge engines side by side: ORT-web vs our WASM engine (f32, int8), single thread, tiny and ~45M models.
# Usage: bash bench/edge_vs_ort.sh [--prefill N] [--decode N] [--repeat N] [--models tiny,bench-45m]
set -euo pipefail
cd "$(dirname "$0")/.."
bash tools/fixtures.sh >/dev/null
[ -f wasm/build/ringlinear.wasm ] || bash tools/build-wasm.sh
.venv/bin/python bench/edge_vs_ort.py 2>/dev/null
# Node 20 runs no TypeScript: bundle the bench (and the engines it imports) with esbuild, packages stay external.
npx esbuild bench/edge_vs_ort.ts --bundle --platform=node --format=esm --packages=external \
  --outfile=bench/dist/edge_vs_ort.mjs --log-level=warning
node bench/dist/edge_vs_ort.mjs "$@"
