#!/usr/bin/env bash
# The GPU check (issue 33): one command on a machine with a CUDA GPU, from a fresh checkout, ≤ 8 minutes on
# one H100. Writes JSON and a markdown table to benchmarks/results/gpu/ (committable):
#   1. venv     .venv with the pinned dependencies (pip's torch==2.13.0 is the CUDA build on Linux x86-64)
#   2. kernels  the Triton kernel tests on the GPU, compiled (not interpreted): fp32, fp16, bf16 cases
#   3. native   the native CUDA ops' tests, where CMakeLists.txt builds CUDA sources (today none: recorded)
#   4. precision  benchmarks/gpu_precision_check.py: a 512² SD 1.5-architecture random-weight edit,
#               fp16 and bf16 against fp32
#   5. latency  benchmarks/gpu_edit_latency.py: eager vs compiled latency of a 512² fp16 edit
#   6. report   benchmarks/gpu_check_report.py: gpu_check.json + gpu_check.md from what finished
# Each step has its own time limit (together 495 s); a failed or timed-out step is recorded and the next one runs.
# Usage: benchmarks/gpu_check.sh [--dry-run] [--out DIR] [--steps N]
#   --dry-run  parse the arguments and list the commands without running anything (CI runs this)
set -uo pipefail
cd "$(dirname "$0")/.."

OUT=benchmarks/results/gpu
STEPS=25
DRY_RUN=0
while [[ $# -gt 0 ]]; do
    case "$1" in
        --dry-run) DRY_RUN=1 ;;
        --out) OUT="${2:?--out needs a folder}"; shift ;;
        --steps) STEPS="${2:?--steps needs a number}"; shift ;;
        -h|--help) sed -n '2,14p' "$0"; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done
[[ "$STEPS" =~ ^[1-9][0-9]*$ ]] || { echo "gpu_check.sh: --steps must be a positive integer, got '$STEPS'" >&2; exit 2; }

PY=.venv/bin/python
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

if [[ -x $PY ]]; then
    step venv 60 "$PY" -c "import torch; assert torch.cuda.is_available(), 'torch sees no CUDA GPU'"
else
    step venv 180 bash -c "python3 -m venv .venv && .venv/bin/pip install --quiet -e '.[test]' && \
        .venv/bin/python -c \"import torch; assert torch.cuda.is_available(), 'torch sees no CUDA GPU'\""
fi
step kernels 60 "$PY" -m pytest tests/kernels -q -rs -p no:cacheprovider -k "cuda" --junitxml="$OUT/kernels.xml"
if grep -Eqi 'LANGUAGES[^)]*CUDA|enable_language\(CUDA' CMakeLists.txt; then
    step native 120 "$PY" -m pytest tests/kernels/test_native_ops.py -q -rs -p no:cacheprovider -k "cuda" \
        --junitxml="$OUT/native.xml"
elif [[ $DRY_RUN == 1 ]]; then
    echo "native: none wired (CMakeLists.txt builds no CUDA sources): recorded, nothing to run"
else
    printf 'native\tnot wired\t0\n' >> "$STATUS"
fi
step precision 90 "$PY" benchmarks/gpu_precision_check.py --model sd15-random --size 512 --steps "$STEPS" \
    --out "$OUT/precision"
step latency 150 "$PY" benchmarks/gpu_edit_latency.py --size 512 --steps "$STEPS" --dtype float16 --rounds 2 \
    --cache "$OUT/inductor-cache" --out "$OUT/latency.json"
step report 15 "$PY" benchmarks/gpu_check_report.py "$OUT"
[[ $DRY_RUN == 1 ]] || rm -rf "$OUT/inductor-cache"
