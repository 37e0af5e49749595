#!/usr/bin/env bash
# The GPU check sized for the GPU machine this project can sometimes borrow. `bash bench/gpu_check.sh --help`.
set -euo pipefail
cd "$(dirname "$0")/.."

usage() {
    cat <<'EOF'
bench/gpu_check.sh: the GPU check sized for the GPU machine this project can sometimes borrow.

  bash bench/gpu_check.sh --prepare               HERE (conpet set up in .venv): write what travels
  bash bench/gpu_check.sh [OPTIONS]               THERE, on the GPU machine, from the repository root
  bash bench/gpu_check.sh --device cpu --smoke    here: the CPU path (2 learners, 2 steps, 2 layers; ~1-2 min)

The machine and its limits (the device tool; /work/.library/device/README.md):
  - one H100 (80 GB) or H200 (141 GB), 16 cores, 128 GB, lent to only some tasks; its image has
    torch 2.11 (CUDA), transformers 5.17, peft, accelerate, sacrebleu, scikit-learn, but not
    bitsandbytes, optuna, rouge-score or gguf, and nothing can be downloaded there. conpet is not
    installed there: this script runs it from src/ (PYTHONPATH).
  - at most 64 MiB travels per call (tracked and untracked files + the carried ignored paths): the
    tree is ~3 MB, .gpu_check 3.4 MB (SmolLM2-135M's tokenizer and config.json; the 93 MB model
    wheel never travels: every model is random-weight, built in memory, the 8B one directly on the
    GPU in bf16), .whl 0.8 MB (peft pinned to the version conpet is tested with here, installed
    only when the image's differs). The check imports neither optuna nor rouge-score nor gguf.
  - one command runs at most 10 minutes; 15 minutes of device time per session, the machine's
    start (1-2 min) included: one full run (~8 min), then at most one --quick or one-phase rerun.

What a run does there (the --budget, 480 s, bounds it; nothing starts that would end later, an
alarm writes the record at budget + 30 s, `timeout` stops everything at 570 s):
  1. installs the carried wheels the image lacks or has at another version (pip --no-index
     --no-deps --target /tmp/gpu-check-site);
  2. parity (at most 60% of the budget): every learner (26; the 22 that train generative streams
     again on freedict-translation) learns ONE short task (the stream's first task, 4 steps of 4
     rows, 1 epoch, train.top_layers auto) on a random-weight model built from SmolLM2-135M's
     config, through conpet's Python API, on CUDA in bf16 and in fp16, against the same run on the
     CPU in fp32 (a second process on 14 of the 16 cores, beside the GPU runs). Per learner: the
     per-step losses, the relative difference of the first step (same parameters: rounding alone)
     and of the worst step, fp16's skipped steps, whether the backbone came back unchanged.
     Tolerance (bench/gpu_check.py TOLERANCE, measured on a CPU: bf16 drifts 0.1-0.3% on the
     first step, at most 2.3% over 4 steps): bf16 2% first / 5% any step, fp16 0.5% / 2%;
  3. speed: HF Trainer + peft (trainer-bf16: every frozen weight in bf16, the careful user's load)
     against conpet's loop (conpet: the same LoRA r 8 on q/v in every layer; conpet-fast:
     train.top_layers auto), random weights built on the GPU from the configs of SmolLM2-135M,
     Llama-3.2-1B and Llama-3.1-8B: tokens/s and peak device memory of 20 steps of 16 rows after
     3 warm-up steps;
  4. writes the record (bench/record.py's write_record, provenance included; the commit comes from
     .gpu_check/commit.json when .git does not travel) after every learner and every arm, to
     $OUT/gpu-check-<gpu>.json when $OUT is set (the device tool brings it back), else to
     bench/results/gpu-check-<gpu>.json, and the log to $OUT/gpu-check.log (else /tmp). It prints
     each phase's seconds.
Estimated on an H100 (no GPU was lent while this was written, so not measured): start-up ~0.5 min,
parity ~3-4.5 min (the CPU reference is the long pole; what is left at its deadline is recorded as
skipped), speed ~1.5-2.5 min (the 8B model ~1 min): ~6-7.5 min of the 10.

Not covered: real weights (so no accuracy), backbone.quantize (no bitsandbytes), the `conpet`
command line (it imports optuna, for conpet search: carry optuna, alembic, sqlalchemy, greenlet,
colorlog and mako wheels too to run it there), several GPUs and FSDP.

The device call (the `run` tool), after --prepare here:
  command:   bash bench/gpu_check.sh
  carry:     [".gpu_check", ".whl"]
  timeout_s: 600
  a rerun:   bash bench/gpu_check.sh --phases speed    (or --phases parity, or --quick: ~2 min, 12
             learners, SmolLM2-135M and Llama-3.2-1B only)

Options (passed to bench/gpu_check.py; `python bench/gpu_check.py --help` lists them all):
  --phases parity,speed   --quick   --smoke   --device cuda|cpu   --budget SECONDS   --out DIR
  --learners all|a,b,c    --streams wordnet-typing,freedict-translation   --steps 4   --batch-size 4
  --sizes smollm2-135m,llama-1b,llama-8b   --arms trainer-bf16,conpet,conpet-fast   --speed-steps 20
Environment: PYTHON (default .venv/bin/python when present, else python3), GPU_CHECK_TIMEOUT
(the hard stop; default 570 s, or --budget + 90).
EOF
}

PY="${PYTHON:-}"
if [ -z "$PY" ]; then
    if [ -x .venv/bin/python ]; then PY=.venv/bin/python; else PY=python3; fi
fi

prepare() {
    # HERE: SmolLM2's tokenizer + config (from the packaged GGUF), the commit, the peft wheel.
    "$PY" bench/gpu_check.py --save-tokenizer .gpu_check/smollm2 >/dev/null
    "$PY" - <<'PY'
import json, subprocess
run = lambda *a: subprocess.run(["git", *a], capture_output=True, text=True).stdout.strip()
json.dump({"commit": run("rev-parse", "HEAD"), "status": run("status", "--porcelain", "--untracked-files=no")},
          open(".gpu_check/commit.json", "w"))
PY
    local peft
    peft=$("$PY" -c 'import importlib.metadata as m; print(m.version("peft"))')
    mkdir -p .whl
    rm -f .whl/peft-*.whl
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 \
        -d .whl "peft==$peft"
    echo "prepared (what the device call carries):"
    du -sh .gpu_check .whl
    ls .whl
    local tree
    tree=$(git ls-files -z --cached --others --exclude-standard | xargs -0 du -cb 2>/dev/null | tail -1 | cut -f1)
    echo "working tree that travels: $((tree / 1024)) KiB (+ the carried folders above; limit 64 MiB)"
    echo "device call: command 'bash bench/gpu_check.sh', carry [\".gpu_check\", \".whl\"], timeout_s 600"
}

install_wheels() {
    # THERE: the carried wheels whose package the image lacks or has at another version.
    compgen -G ".whl/*.whl" >/dev/null || return 0
    local need
    need=$("$PY" - <<'PY'
import glob, importlib.metadata as m, os
for path in sorted(glob.glob(".whl/*.whl")):
    name, version = os.path.basename(path).split("-")[:2]
    try:
        have = m.version(name.replace("_", "-"))
    except m.PackageNotFoundError:
        have = None
    if have != version:
        print(path)
PY
)
    [ -n "$need" ] || { echo "gpu_check: carried wheels already installed at their versions"; return 0; }
    echo "gpu_check: installing $(echo "$need" | xargs -n1 basename | tr '\n' ' ')"
    # shellcheck disable=SC2086
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target /tmp/gpu-check-site $need; then
        export PYTHONPATH="/tmp/gpu-check-site${PYTHONPATH:+:$PYTHONPATH}"
    else
        echo "gpu_check: installing the carried wheels failed; going on with the image's packages" >&2
    fi
}

case "${1:-}" in
    -h|--help) usage; exit 0 ;;
    --prepare) prepare; exit 0 ;;
esac

install_wheels
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
if [[ " $* " != *" --device cpu "* ]] && command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
fi
LOG_DIR="${OUT:-${TMPDIR:-/tmp}}"
mkdir -p "$LOG_DIR"
# the hard stop: 570 s (the 480 s budget, its 30 s alarm, a minute of margin), or --budget + 90
LIMIT=570
ARGS=("$@")
for i in "${!ARGS[@]}"; do
    if [ "${ARGS[$i]}" = --budget ] && [ -n "${ARGS[$((i + 1))]:-}" ]; then
        LIMIT=$(( ${ARGS[$((i + 1))]%.*} + 90 ))
    fi
done
timeout -k 10 "${GPU_CHECK_TIMEOUT:-$LIMIT}" "$PY" -u bench/gpu_check.py "$@" 2>&1 | tee "$LOG_DIR/gpu-check.log"
