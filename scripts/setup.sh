#!/usr/bin/env bash
# Sets up .venv with ctmtl and everything it needs to run (add --dev for the test tools and
# the optional OpenVINO engine and ONNX export, extras `openvino` and `onnx`, which CI tests).
# Torch is installed first as a pinned CPU-capable release so that the `torch>=2.4` range in
# pyproject.toml is already satisfied and pip does not fetch a multi-GB CUDA build; a GPU
# host can install its own CUDA torch into .venv before running this.
set -euo pipefail
cd "$(dirname "$0")/.."
extra=""
[ "${1:-}" = "--dev" ] && extra="[dev,openvino,onnx]"
PY="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  .venv/bin/python -m pip install -q "torch==2.13.0" || .venv/bin/python -m pip install -q "torch>=2.4"
fi
.venv/bin/python -m pip install -q -e ".${extra}"
echo "ctmtl installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
