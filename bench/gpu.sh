#!/usr/bin/env bash
# The GPU benchmark, one command (docs/gpus.md, docs/speed.md#gpu):
#   bash bench/gpu.sh [OUT_DIR]
# 1. conpet vs HF Trainer + peft on SmolLM2-135M, wordnet-typing (first 2 tasks), same LoRA (r 8, q/v),
#    same optimizer groups and epochs: tokens/s, peak device memory, accuracy, the default fast path's
#    ratio (LoRA on every linear layer of the top 12 layers, what train.top_layers: auto picks);
# 2. training throughput on random-weight Llama 3.2 1B and Llama 3.1 8B models (all layers vs fast path).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${1:-bench/results}"
mkdir -p "$OUT"
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$OUT/gpu-name.txt"
"$PY" bench/speed.py --device cuda --epochs 3 --top-layers 12 --fast-pet-options '{"target_modules": "all-linear"}' --json "$OUT/speed-gpu-smollm2.json" | tee "$OUT/speed-gpu-smollm2.txt"
"$PY" bench/synthetic_throughput.py --device cuda --sizes llama-1b,llama-8b --steps 20 \
    --json "$OUT/synthetic-gpu-llama.json" | tee "$OUT/synthetic-gpu-llama.txt"
