#!/usr/bin/env bash
# Static and Dynamic ConPET against sequential (PET-only) and joint on the WordNet benchmarks,
# SmolLM2-135M, 3 seeds, every learner on the same data in one process (backbone and lower-layer
# cache shared). Usage: bash bench/conpet_suite.sh [wordnet-relations wordnet-typing ...]
#
# Settings (the same for every learner; see bench/notes/2026-11-25--12-06-results.md): LoRA r=8 on every linear layer of
# the top 4 of 30 layers (train.top_layers=4, the fast path of docs/speed.md), 2 epochs per task,
# at most PER_CLASS training rows per class (default 32; the typing reference used 16 to fit the
# session); test sets complete. Method hyper-parameters are the documented defaults (the official
# code's values); nothing was tuned on a test split.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-runs/conpet}
PER_CLASS=${PER_CLASS:-32}
SEEDS=${SEEDS:-3}
LEARNERS=${LEARNERS:-"sequential,joint,emr,emr*,ea-emr,ea-emr*,ewc,ewc*,lwf,lwf*,l2,l2*,dynamic,dynamic[top_k=2]"}
for b in ${@:-wordnet-relations wordnet-typing}; do
    .venv/bin/conpet run --model smollm2 --benchmark "$b" --learner "$LEARNERS" --seeds "$SEEDS" \
        --epochs 2 --max-train-per-class "$PER_CLASS" --set train.top_layers=4 \
        --set pet.options.target_modules=all-linear --no-progress --out "$OUT/smollm2-$b"
done
