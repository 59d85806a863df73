#!/usr/bin/env bash
# Reproduce docs/results.md on the bundled toy model (CPU, offline): the method sweep (each
# method's own position rule), the position ablations (original positions kept; the toy model
# v1 trained without removal), the searched schedules and their check on the held-out
# questions. Every step resumes.
set -euo pipefail
cd "$(dirname "$0")/.."
VTC=${VTC:-.venv/bin/vtc}
OUT=${OUT:-runs/results-toy}
# Literature budgets 576/192/128/64 of LLaVA-1.5's 576 tokens, as fractions of the toy's 144.
BUDGETS=1.0,0.3333333,0.2222222,0.1111111

# Each method with its own position rule: what a user gets (the README's main job).
$VTC sweep --methods aim,cdpruner,dart,divprune,downsample,fastv,merge,pdrop,pool,psigmoid,random,sparsevlm,tome,visionzip,vispruner,vtc_cls,vtc_cls+pdrop \
  --budgets "$BUDGETS" --out "$OUT"

# Ablation: survivors keep their original positions.
ABLATE=merge,pdrop,pool,random,tome,visionzip,vtc_cls,vtc_cls+pdrop
$VTC sweep --methods "$ABLATE" --budgets 0.3333333,0.2222222,0.1111111 --param positions=keep --out "$OUT-keep"

# Ablation: the toy model v1 (trained with tokens hidden by the mask, never removed), shipped
# until commit 2d96370's successor; both position rules.
V1=runs/toy-v1
if [ ! -f "$V1/eval/toy/model/model.safetensors" ]; then
  mkdir -p "$V1" && git archive 2d96370 eval/toy/model | tar -x -C "$V1"
fi
V1_ABLATE=pool,random,tome,visionzip,vtc_cls
$VTC sweep --model "$V1/eval/toy/model" --methods "$V1_ABLATE" --budgets 0.3333333,0.2222222,0.1111111 --out "$OUT-v1"
$VTC sweep --model "$V1/eval/toy/model" --methods "$V1_ABLATE" --budgets 0.3333333,0.2222222,0.1111111 \
  --param positions=keep --out "$OUT-v1-keep"

mkdir -p runs/search
# Calibration: questions of seed 2718 (neither training's nor the evaluation's).
$VTC search gsearch --metric accuracy --limit 200 --tolerance 0.01 --out runs/search/gsearch.json
$VTC search gsearch --metric accuracy --limit 300 --tolerance 0.003 --out runs/search/gsearch_strict.json
$VTC search psigmoid --metric accuracy --limit 200 --budget 48 --trials 16 --out runs/search/psigmoid48.json
$VTC search psigmoid --metric accuracy --limit 200 --budget 32 --trials 16 --out runs/search/psigmoid32.json

# The searched schedules on the held-out evaluation questions, beside the sweep.
$VTC sweep --methods gsearch --param gsearch.schedule=runs/search/gsearch.json --out "$OUT"
$VTC sweep --methods gsearch --param gsearch.schedule=runs/search/gsearch_strict.json --out "$OUT"
$VTC sweep --methods schedule --param schedule.schedule=runs/search/psigmoid48.json --out "$OUT"
$VTC sweep --methods schedule --param schedule.schedule=runs/search/psigmoid32.json --out "$OUT"

.venv/bin/python scripts/plot_schedules.py runs/search/gsearch.json runs/search/gsearch_strict.json \
  runs/search/psigmoid48.json runs/search/psigmoid32.json --out docs/results/toy_schedules.png
