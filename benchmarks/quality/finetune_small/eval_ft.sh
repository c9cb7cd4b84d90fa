#!/bin/bash
# Small-sample evaluation of the relaxed-caption fine-tune against the committed model.
set -x
cd /work/wt/model
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
PY=/work/main/.venv/bin/python
M=gnr_fast/models/shapes-v1
FT=runs/ft_export
date -u
nice -n 19 $PY -m gnr_shapes.training.export --vae $M/vae --unet-run runs/unet_relaxed --tokenizer $M/tokenizer --out $FT --defaults-from $M
date -u
R="nice -n 19 $PY -m gnr_shapes.evaluation.robustness --model $FT --methods gar-shapes --threads 1 --out runs/eval_ft"
( $R --kinds colour --per-kind 3 --forms full --name colour_full ; date -u
  $R --kinds colour --per-kind 3 --forms no_size --name colour_no_size ; date -u
  $R --kinds shape background --per-kind 2 --forms full --name shape_bg_full ; date -u
  $R --kinds colour --per-kind 3 --forms comma --name colour_comma ; date -u
  $R --kinds colour --per-kind 3 --forms short --name colour_short ; date -u
) > runs/eval_ft_A.out 2>&1 &
E="nice -n 19 $PY -m gnr_shapes.training.evaluate --steps 50 --cfg 5 --threads 1 --seed 0"
( $E --model $FT --captions 32 --inversions 0 --batch 32 --out runs/eval_ft/fid_ft.json ; date -u
  $E --model $FT --captions 0 --inversions 8 --out runs/eval_ft/inv_ft.json ; date -u
  $E --model $M --captions 32 --inversions 0 --batch 32 --out runs/eval_ft/fid_committed.json ; date -u
  $E --model $M --captions 0 --inversions 8 --out runs/eval_ft/inv_committed.json ; date -u
) > runs/eval_ft_B.out 2>&1 &
wait
date -u
