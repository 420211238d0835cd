#!/usr/bin/env bash
# The GPU check, one script under 10 minutes for a machine with an NVIDIA GPU, CUDA, PyTorch and Triton
# (no network; no TensorRT or onnxruntime-gpu needed). What it measures: benchmarks/gpu_check.py.
#   bash benchmarks/gpu_check.sh [--iters 50] [--out DIR]     # writes DIR/gpu_check.{json,md}
# Exit 2 with one line when there is no GPU or a package is missing; 1 when the kernel is outside tolerance.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-}"
if [[ -z "$PY" ]]; then
    if [[ -x .venv/bin/python ]]; then PY=.venv/bin/python; else PY=python3; fi
fi
if [[ " $* " != *" --dry-run "* ]] && ! command -v nvidia-smi >/dev/null 2>&1; then
    echo "gpu_check: no nvidia-smi on PATH: this needs an NVIDIA GPU with its driver (or give --dry-run)" >&2
    exit 2
fi
for pkg in torch triton transformers; do
    if ! "$PY" -c "import $pkg" >/dev/null 2>&1; then
        echo "gpu_check: $PY cannot import $pkg; install effc with its gpu extra (pip install -e '.[gpu]') or set PYTHON" >&2
        exit 2
    fi
done
# Busy-waiting off for torch's CPU threads (OpenMP spins between ops by default); a fixed thread count.
export OMP_WAIT_POLICY=PASSIVE
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-$(( $(nproc) < 8 ? $(nproc) : 8 ))}"
export TOKENIZERS_PARALLELISM=false
# The whole check stays under 10 minutes: the Python side is cut off at 570 s.
exec timeout --signal=INT 570 "$PY" benchmarks/gpu_check.py "$@"
