#!/usr/bin/env bash
# Regenerate the default model's training data: Debian text packages -> cleaned JSONL splits -> BPE tokenizer
# -> uint16 token streams. Deterministic: the same packages give the same files (sha256 in sources.json).
#   bash tools/data/prepare.sh [DATA_DIR=.traindata/default] [TOKENIZER_DIR=models/default]
set -euo pipefail
cd "$(dirname "$0")/../.."
DATA=${1:-.traindata/default}
TOK=${2:-models/default}
PY=${PYTHON:-.venv/bin/python}
PKGS="bible-kjv-text bible-kjv dict-gcide dict-devil fortunes-min"
missing=$(for p in $PKGS; do dpkg-query -W -f='${Status}\n' "$p" 2>/dev/null | grep -q "install ok installed" || echo "$p"; done)
if [ -n "$missing" ]; then
  echo "installing: $missing"
  SUDO=$([ "$(id -u)" = 0 ] || echo sudo)
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q $missing
fi
export PYTHONPATH="gpu-backend${PYTHONPATH:+:$PYTHONPATH}"
"$PY" tools/data/corpus.py --out "$DATA"
if [ "${RETRAIN_TOKENIZER:-0}" = 1 ] || [ ! -f "$TOK/tokenizer.json" ]; then
  "$PY" -m ringlinear train tokenizer --data "$DATA" --out "$TOK" --vocab-size 6144
fi
"$PY" -m ringlinear train encode --data "$DATA" --tokenizer "$TOK"
