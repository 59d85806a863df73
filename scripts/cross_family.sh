#!/usr/bin/env bash
# Reproduce the cross-family section of docs/results.md (CPU, offline): every method at LLaVA-1.5's
# literature budgets (192/128/64 of 576, as fractions) on the LLaVA-1.5-format toy and on the
# Qwen2.5-VL-format toy (eval/toy/model-qwen, scripts/train_toy_qwen.py), the same 500 toy_vqa
# questions (168 px images: 144 tokens on both), then the side-by-side table. Every step resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
VTC=${VTC:-.venv/bin/vtc}
OUT=${OUT:-runs/cross-family}
BUDGETS=0.3333333,0.2222222,0.1111111
if [ ! -f eval/toy/model-qwen/config.json ]; then
  echo "no Qwen2.5-VL toy at eval/toy/model-qwen: train it first (scripts/train_toy_qwen.py)" >&2
  exit 1
fi
$VTC sweep --model toy --budgets "$BUDGETS" --batch-size 16 --out "$OUT/llava"
$VTC sweep --model toy-qwen --budgets "$BUDGETS" --batch-size 16 --out "$OUT/qwen"
.venv/bin/python scripts/cross_family.py "$OUT/llava" "$OUT/qwen" --budgets "$BUDGETS" --write
