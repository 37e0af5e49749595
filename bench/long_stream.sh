#!/usr/bin/env bash
# The long stream of the Dynamic ConPET issue: wordnet-fine (121 fine-grained noun categories from
# the WordNet hypernym tree, 20 tasks), SmolLM2-135M on the fast path of the recorded table (LoRA on
# every linear layer of the top 4 layers, the default before 2026-12-05), 16 training rows per
# class, 2 epochs; PET-only, Static ConPET with dynamic replay, Dynamic ConPET k=1 and k=2.
# Usage: bash bench/long_stream.sh [SEEDS]
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/conpet run --model smollm2 --benchmark wordnet-fine \
    --learner "sequential,emr*,dynamic,dynamic[top_k=2]" --seeds "${1:-1}" --epochs 2 \
    --max-train-per-class 16 --set train.top_layers=4 --no-progress --out runs/conpet/smollm2-wordnet-fine
