#!/usr/bin/env bash
# The default model's real training run, as one device call (nvidia-h200):
#   run(command="bash gpu-backend/ringlinear/train/h200_run.sh", carry=[".traindata/tokens"])
# Needs the token streams from tools/data/prepare.sh copied to .traindata/tokens/ and the tokenizer in models/default/.
# Writes to $OUT (at most 8 files of <= 16 MiB come back): ckpt/ (config + 2 bf16 shards + index), the loss log,
# the CUDA held-out perplexity, and the console log.
set -euo pipefail
cd "$(dirname "$0")/../../.."
export PYTHONPATH=gpu-backend PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ringlinear-out}
BUDGET=${BUDGET:-230}
mkdir -p "$OUT/ckpt"
{
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  python3 -c "import torch, tokenizers, safetensors; print('torch', torch.__version__, 'tokenizers', tokenizers.__version__)"
  python3 -m ringlinear train run --data .traindata/tokens --tokenizer models/default --out /tmp/ckpt --config default \
    --device cuda --seq-len 512 --batch-size 128 --lr 2e-3 --warmup 150 --bias-rate 3e-3 --time-budget "$BUDGET" \
    --log-every 20 --eval-every 250 --shards 2 --log "$OUT/train_log.jsonl"
  python3 -m ringlinear train perplexity --model /tmp/ckpt --data .traindata/tokens --device cuda --windows 64 \
    --json "$OUT/perplexity_cuda.json"
  cp /tmp/ckpt/config.json /tmp/ckpt/model-0000*-of-00002.safetensors /tmp/ckpt/model.safetensors.index.json "$OUT/ckpt/"
} 2>&1 | tee "$OUT/run.log"
