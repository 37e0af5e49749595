#!/usr/bin/env bash
# The GPU benchmark, one command (docs/gpus.md, docs/speed.md#gpu):
#   bash bench/gpu.sh [OUT_DIR]
# 1. conpet vs HF Trainer + peft on SmolLM2-135M, wordnet-typing (first 2 tasks), same LoRA (r 8, q/v),
#    same optimizer groups and epochs: tokens/s, peak device memory, accuracy, the default fast path's
#    ratio (LoRA on every linear layer of the top 12 layers, what train.top_layers: auto picks);
# 2. training throughput on random-weight Llama 3.2 1B and Llama 3.1 8B models (all layers vs fast path).
set -euo pipefail
cd "$(dirname "$0")/.."
# The Python whose torch is a CUDA build: not .venv's (setup.sh installs the CPU build there).
PY="${PYTHON:-python3}"
"$PY" -c "import torch, sys; sys.exit(not torch.cuda.is_available())" 2>/dev/null || {
    echo "gpu.sh: error: $PY has no CUDA torch ($("$PY" -c 'import torch; print("torch", torch.__version__)' 2>&1 | tail -1)); set PYTHON to a Python with a CUDA build of torch" >&2
    exit 2
}
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"
OUT="${1:-bench/results}"
mkdir -p "$OUT"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu-name.txt"
"$PY" bench/speed.py --device cuda --epochs 3 --top-layers 12 --fast-pet-options '{"target_modules": "all-linear"}' --json "$OUT/speed-gpu-smollm2.json" | tee "$OUT/speed-gpu-smollm2.txt"
"$PY" bench/synthetic_throughput.py --device cuda --sizes llama-1b,llama-8b --steps 20 \
    --json "$OUT/synthetic-gpu-llama.json" | tee "$OUT/synthetic-gpu-llama.txt"
