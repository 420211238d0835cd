#!/usr/bin/env bash
# Install effc and its test dependencies into .venv (idempotent). torch is pinned first: an unpinned
# torch would pull a multi-GB CUDA build instead of the CPU wheel (docs/ONNXRUNTIME.md, Installing).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3.11}
command -v "$PY" >/dev/null || PY=python3
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q "torch==2.13.0"
.venv/bin/python -m pip install -q -e ".[test]"
