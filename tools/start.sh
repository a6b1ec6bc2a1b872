#!/usr/bin/env bash
# The main job: the worker locally (wrangler dev on 127.0.0.1:8787) serving the embedded default model
# (models/default, int8 in the WASM engine). Usage: npm start   (PORT=... to change the port)
set -euo pipefail
cd "$(dirname "$0")/.."
export CLOUDFLARE_CF_FETCH_ENABLED=false WRANGLER_SEND_METRICS=false
bash tools/setup.sh --no-python
bash tools/build-wasm.sh
echo "worker: http://127.0.0.1:${PORT:-8787}  (development key: see README)"
exec npx wrangler dev --ip 127.0.0.1 --port "${PORT:-8787}"
