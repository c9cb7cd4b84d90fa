#!/bin/bash
# Full-size evaluation of the relaxed-caption fine-tune (issue 18), 2 processes x 1 thread.
set -x
cd /work/main
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
PY=/work/main/.venv/bin/python
M=gnr_fast/models/shapes-v1
FT=/work/runs18/ft_export
O=/work/runs18/eval_ft
mkdir -p $O
date -u
$PY -m gnr_shapes.training.export --vae $M/vae --unet-run /work/runs18/unet_relaxed --tokenizer $M/tokenizer --out $FT --defaults-from $M
date -u
R="$PY -m gnr_shapes.evaluation.robustness --model $FT --methods gar-shapes baseline-cfg4 --threads 1 --out $O"
( $R --kinds colour --per-kind 50 --forms full no_size --name colour_50 ; date -u
  $R --kinds colour --per-kind 12 --forms synonym short comma plain_word --name colour_12 ; date -u
  $R --kinds shape background --per-kind 10 --forms full no_size --name shape_bg ; date -u
) > $O/A.out 2>&1 &
( $PY -m gnr_fast.cli eval --model $FT --per-kind 50 --methods baseline-cfg4 gar-shapes --threads 1 --out $O/quality ; date -u
  $PY -m gnr_shapes.training.evaluate --model $FT --steps 50 --cfg 5 --threads 1 --seed 0 --captions 200 --inversions 0 --batch 32 --out $O/fid.json ; date -u
  $PY -m gnr_shapes.training.evaluate --model $FT --steps 50 --cfg 5 --threads 1 --seed 0 --captions 0 --inversions 20 --out $O/inv.json ; date -u
) > $O/B.out 2>&1 &
wait
date -u
