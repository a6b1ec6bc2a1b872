#!/usr/bin/env bash
# Writes the deterministic tiny checkpoints into test/fixtures/<variant>/ (git-ignored), skipping ones already there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
for v in tiny tiny-h6 tiny-tail tiny-hfslope; do
  [ -f "test/fixtures/$v/model.safetensors" ] && [ -f "test/fixtures/$v/tokenizer.json" ] || \
    "$PY" -m ringlinear make-tiny --variant "$v" --out "test/fixtures/$v" >/dev/null
done
echo "fixtures ready: test/fixtures/{tiny,tiny-h6,tiny-tail,tiny-hfslope}"
