#!/usr/bin/env bash
# Every test of the project: Python (pytest) and TypeScript (tsc + vitest, in workerd and Node).
# Installs what it needs first (tools/setup.sh). Usage: npm test
set -euo pipefail
cd "$(dirname "$0")/.."
export CLOUDFLARE_CF_FETCH_ENABLED=false WRANGLER_SEND_METRICS=false

bash tools/setup.sh
echo "== fixtures and golden vectors"
bash tools/fixtures.sh
.venv/bin/python -m ringlinear golden --check
echo "== wasm build"
bash tools/build-wasm.sh --test
echo "== pytest"
.venv/bin/python -m pytest gpu-backend/tests -q
# ONNX exports for the ORT-web tests (git-ignored): the tiny fixture, and models/default for the perplexity test
.venv/bin/python -m ringlinear export-onnx --model test/fixtures/tiny --out test/fixtures/onnx/tiny.onnx --skip-existing
.venv/bin/python -m ringlinear export-onnx --model models/default --out test/fixtures/onnx/default.onnx --skip-existing
echo "== typecheck"
npx tsc --noEmit
echo "== vitest"
npx vitest run
