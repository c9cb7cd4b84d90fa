#!/usr/bin/env bash
# The GPU check (issue 33): one command on a machine with a CUDA GPU, from a checkout, ≤ 8 minutes on
# one H100. Writes JSON and a markdown table to benchmarks/results/gpu/ (committable):
#   1. env      the Python that runs the check, its versions (env.txt) and a CUDA device seen by torch
#   2. kernels  the Triton kernel tests on the GPU, compiled (not interpreted): fp32, fp16, bf16 cases
#   3. native   the native CUDA ops' tests, where CMakeLists.txt builds CUDA sources (today none: recorded)
#   4. precision  benchmarks/gpu_precision_check.py: a 512² SD 1.5-architecture random-weight edit,
#               fp16 and bf16 against fp32
#   5. latency  benchmarks/gpu_edit_latency.py: eager vs compiled latency of a 512² fp16 edit
#   6. report   benchmarks/gpu_check_report.py: gpu_check.json + gpu_check.md from what finished
# Each step has its own time limit (together 475 s with --wheels); a failed or timed-out step is recorded and the
# next one runs.
# The Python: with --wheels DIR, the machine's own python3 and its torch, the checkout run from source and
# the wheels (packages that machine lacks, e.g. diffusers) put on PYTHONPATH — for a machine without a
# package index, like this project's lent GPU machine (benchmarks/gpu_carry.sh prepares the wheels and the
# call); else the checkout's .venv when it has one; else a new .venv installed from the index.
# Usage: benchmarks/gpu_check.sh [--dry-run] [--out DIR] [--steps N] [--wheels DIR]
#   --dry-run  parse the arguments and list the commands without running anything (CI runs this)
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=benchmarks/results/gpu
STEPS=25
DRY_RUN=0
WHEELS=""
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --out) OUT="${2:?--out needs a folder}"; shift ;;
        --steps) STEPS="${2:?--steps needs a number}"; shift ;;
        --wheels) WHEELS="${2:?--wheels needs a folder of .whl files}"; shift ;;
        -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ "$STEPS" =~ ^[1-9][0-9]*$ ]] || { echo "gpu_check.sh: --steps must be a positive integer, got '$STEPS'" >&2; exit 2; }
if [[ -n "$WHEELS" ]] && ! compgen -G "$WHEELS/*.whl" > /dev/null; then
    echo "gpu_check.sh: --wheels $WHEELS holds no .whl files (benchmarks/gpu_carry.sh prepare fetches them)" >&2
    exit 2
fi
STATUS="$OUT/steps.tsv"

step() {  # step NAME LIMIT_S COMMAND...: run (or list) one step, recording its exit status and seconds
    local name="$1" limit="$2"; shift 2
    if [[ $DRY_RUN == 1 ]]; then
        echo "$name (limit ${limit}s): $*"
        return 0
    fi
    echo "== $name: $*" >&2
    local start=$SECONDS rc=0
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1 || rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" >> "$STATUS"
    echo "== $name: exit $rc after $((SECONDS - start)) s (log: $OUT/$name.log)" >&2
}

if [[ $DRY_RUN == 0 ]]; then
    command -v nvidia-smi > /dev/null || { echo "gpu_check.sh: no nvidia-smi: this check needs a CUDA GPU" >&2; exit 1; }
    mkdir -p "$OUT"
    : > "$STATUS"
    nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > "$OUT/gpu.txt"
fi
# Compiled Triton kernels: the interpreter must be off (tests/conftest.py sets it only without a GPU).
unset TRITON_INTERPRET

if [[ -n "$WHEELS" ]]; then
    PY=python3
    SITE="${TMPDIR:-/tmp}/gnr-fast-gpu-check-site"
    echo "python: the machine's python3 with its torch, the checkout from source, $WHEELS installed into $SITE" >&2
    export PYTHONPATH="$PWD:$SITE${PYTHONPATH:+:$PYTHONPATH}"
    step env 60 bash -c "rm -rf $SITE && $PY -m pip install --quiet --no-index --no-deps --no-compile --target $SITE \
$WHEELS/*.whl && $PY benchmarks/gpu_env.py --out $OUT/env.txt"
elif [[ -x .venv/bin/python ]]; then
    PY=.venv/bin/python
    echo "python: the checkout's .venv" >&2
    step env 60 "$PY" benchmarks/gpu_env.py --out "$OUT/env.txt"
else
    PY=.venv/bin/python
    echo "python: a new .venv from the package index" >&2
    step env 240 bash -c "python3 -m venv .venv && .venv/bin/pip install --quiet -e '.[test]' && \
$PY benchmarks/gpu_env.py --out $OUT/env.txt"
fi
step kernels 120 "$PY" -m pytest tests/kernels -q -rs -p no:cacheprovider -k "cuda" --junitxml="$OUT/kernels.xml"
if grep -Eqi 'LANGUAGES[^)]*CUDA|enable_language\(CUDA' CMakeLists.txt; then
    step native 120 "$PY" -m pytest tests/kernels/test_native_ops.py -q -rs -p no:cacheprovider -k "cuda" \
        --junitxml="$OUT/native.xml"
elif [[ $DRY_RUN == 1 ]]; then
    echo "native: none wired (CMakeLists.txt builds no CUDA sources): recorded, nothing to run"
else
    printf 'native\tnot wired\t0\n' >> "$STATUS"
fi
step precision 120 "$PY" benchmarks/gpu_precision_check.py --model sd15-random --size 512 --steps "$STEPS" \
    --out "$OUT/precision"
step latency 160 "$PY" benchmarks/gpu_edit_latency.py --size 512 --steps "$STEPS" --dtype float16 --rounds 2 \
    --cache "$OUT/inductor-cache" --out "$OUT/latency.json"
step report 15 "$PY" benchmarks/gpu_check_report.py "$OUT"
[[ $DRY_RUN == 1 ]] || rm -rf "$OUT/inductor-cache"
