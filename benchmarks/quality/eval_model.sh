#!/bin/bash
# Issue 18's bars for one model folder, 2 processes x 1 thread (~15 min on 2 cores): relaxed vs full
# colour edits (50 cases, gar-shapes), the edit benchmark (50 per kind), text-to-image fidelity
# (200 held-out captions) and DDIM inversion PSNR (20 held-out scenes).
# Usage: MODEL=<model folder> O=<output folder> bash benchmarks/quality/eval_model.sh
set -x
cd "$(dirname "$0")/../.."
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
PY=$PWD/.venv/bin/python
: "${MODEL:?set MODEL to the model folder}" "${O:?set O to the output folder}"
mkdir -p $O
date -u
( $PY -m gnr_shapes.evaluation.robustness --model $MODEL --methods gar-shapes --threads 1 --out $O \
      --kinds colour --per-kind 50 --forms full no_size --name colour_50 ; date -u
  $PY -m gnr_shapes.training.evaluate --model $MODEL --steps 50 --cfg 5 --threads 1 --seed 0 --captions 0 --inversions 20 --out $O/inv.json ; date -u
) > $O/A.out 2>&1 &
( $PY -m gnr_fast.cli eval --model $MODEL --per-kind 50 --methods gar-shapes --threads 1 --out $O/quality ; date -u
  $PY -m gnr_shapes.training.evaluate --model $MODEL --steps 50 --cfg 5 --threads 1 --seed 0 --captions 200 --inversions 0 --batch 32 --out $O/fid.json ; date -u
) > $O/B.out 2>&1 &
wait
date -u
