#!/usr/bin/env bash
# Runs benchmarks/gpu_check.sh on this project's lent GPU machine (the `device` tool), which reaches no
# package index and takes a working tree of at most 64 MiB. Three subcommands, run here:
#   prepare          wheels of the packages that machine lacks or has at another version than pyproject pins
#                    (diffusers, transformers, importlib_metadata; its own torch, triton and numpy are used)
#                    into .gpu-carry/whl for its Python 3.12, ignored by git; the bundled model's weights
#                    (≈ 60 MB, not read by the check) taken out of the working tree so that it fits; prints
#                    the size that will travel and the `run` call to make.
#   restore          the bundled model's weights back from git (run it right after the device call).
#   unpack ARCHIVE   the gpu.tgz the call brought back, into benchmarks/results/gpu/ (then commit it).
set -euo pipefail
cd "$(dirname "$0")/.."

CARRY=.gpu-carry
LIMIT_BYTES=$((64 * 1024 * 1024))
WEIGHTS=(gnr_fast/models/shapes-v1)  # the bundled model's folder: weights, tokenizer, configs
RUN_COMMAND='bash benchmarks/gpu_check.sh --wheels .gpu-carry/whl --out benchmarks/results/gpu; tar czf "$OUT/gpu.tgz" -C benchmarks/results gpu'

pins() {  # the exact pins of the named packages in pyproject.toml, as NAME==VERSION
    local name
    for name in "$@"; do
        grep -oE "\"$name==[^\"]+\"" pyproject.toml | head -1 | tr -d '"'
    done
}

weight_files() {  # tracked weight files of the bundled model (what prepare removes from the working tree)
    git ls-files -- "${WEIGHTS[@]}" | grep -E '\.(safetensors|pt)$'
}

travelling_bytes() {  # tracked files present + untracked files git does not ignore + the carried folder
    { git ls-files; git ls-files --others --exclude-standard; find "$CARRY" -type f; } \
        | while read -r file; do [[ -f "$file" ]] && stat -c %s "$file"; done | awk '{s += $1} END {print s + 0}'
}

case "${1:-}" in
    prepare)
        if ! git diff --quiet -- "${WEIGHTS[@]}"; then
            echo "gpu_carry.sh: ${WEIGHTS[*]} has uncommitted changes; commit them first (restore takes the weights from git)" >&2
            exit 1
        fi
        grep -qxF "/$CARRY/" .git/info/exclude 2> /dev/null || echo "/$CARRY/" >> .git/info/exclude
        rm -rf "$CARRY/whl" && mkdir -p "$CARRY/whl"
        # shellcheck disable=SC2046
        python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
            --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
            -d "$CARRY/whl" $(pins diffusers transformers) importlib_metadata
        weight_files | xargs rm -f
        bytes=$(travelling_bytes)
        echo "wheels: $(ls "$CARRY/whl" | tr '\n' ' ')"
        echo "removed from the working tree: the bundled model's weights ($(weight_files | wc -l) files; '$0 restore' brings them back)"
        echo "will travel: $((bytes / 1024 / 1024)) MiB of the device tool's 64"
        if ((bytes > LIMIT_BYTES)); then
            echo "gpu_carry.sh: over the limit; find what else is large: git ls-files | xargs du -b | sort -n | tail" >&2
            exit 1
        fi
        echo "device call: run(command='$RUN_COMMAND', carry=['$CARRY'], timeout_s=570)"
        ;;
    restore)
        git checkout -- "${WEIGHTS[@]}"
        echo "restored: $(weight_files | wc -l) weight files"
        ;;
    unpack)
        archive="${2:?unpack needs the gpu.tgz that the device call brought back}"
        mkdir -p benchmarks/results
        tar xzf "$archive" -C benchmarks/results
        echo "unpacked into benchmarks/results/gpu: $(ls benchmarks/results/gpu | tr '\n' ' ')"
        ;;
    *)
        awk 'NR > 1 && !/^#/ {exit} NR > 1' "$0"
        exit 2
        ;;
esac
