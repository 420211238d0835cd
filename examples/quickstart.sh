#!/usr/bin/env bash
# The main job end to end on the embedded default (a small Llama + a LoRA adapter, examples/default):
# install, compile for ONNX Runtime with the adapter merged into the base weights, golden-check it against
# eager PyTorch (base + adapter, unmerged, as peft runs it), benchmark against eager, and generate text
# through its KV cache (a causal LM compiles with it by default).
set -euo pipefail
cd "$(dirname "$0")/.."
bash examples/install.sh
export PATH="$PWD/.venv/bin:$PATH"
set -x
effc compile examples/default/model --adapter examples/default/adapter --passes merge_lora,cleanup --target ort \
    -o out/default-ort --force
effc inspect out/default-ort
effc golden record examples/default/model --adapter examples/default/adapter --input-shapes input_ids:4x64 \
    -o out/default-golden.npz
effc golden check out/default-ort out/default-golden.npz
effc bench out/default-ort --vs-eager --batch 1 --seq 128
effc generate out/default-ort --prompt "To be, or not to be" --max-new-tokens 16
