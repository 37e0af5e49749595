#!/usr/bin/env bash
# Reference runs of the Foundation issue: sequential (PET-only lower bound) vs joint (upper bound)
# on wordnet-typing, 3 seeds, with MiniLM (default config) and SmolLM2-135M.
# Usage: bash bench/foundation.sh [minilm|smollm2|all] [extra conpet-run flags for smollm2]
set -euo pipefail
cd "$(dirname "$0")/.."
which=${1:-all}
OUT=${OUT:-runs/foundation}
C=.venv/bin/conpet
if [ "$which" = minilm ] || [ "$which" = all ]; then
    for learner in sequential joint; do
        $C run --model minilm --learner "$learner" --seeds 3 --no-progress --out "$OUT/minilm-$learner"
    done
    $C report "$OUT/minilm-sequential" "$OUT/minilm-joint" --plot "$OUT/minilm-comparison.png"
fi
if [ "$which" = smollm2 ] || [ "$which" = all ]; then
    # SmolLM2 trains at ~17 samples/s here with LoRA in all 30 layers (train.top_layers=null, the
    # default when these were measured); joint re-trains on all seen tasks at every step, so this
    # reference uses 2 epochs and 32 training rows per class for both learners.
    for learner in sequential joint; do
        $C run --model smollm2 --learner "$learner" --seeds 3 --epochs 2 --max-train-per-class 32 \
            --set train.top_layers=null --no-progress --out "$OUT/smollm2-$learner"
    done
    $C report "$OUT/smollm2-sequential" "$OUT/smollm2-joint" --plot "$OUT/smollm2-comparison.png"
fi
