#!/usr/bin/env bash
# Create .venv (once) and install vtc with the eval extra (lmms-eval, torch 2.14.1 and
# torchvision 0.29.1, which run on CPU) and the dev tools. Idempotent.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip >/dev/null
.venv/bin/python -m pip install -q -e ".[eval,dev]"
