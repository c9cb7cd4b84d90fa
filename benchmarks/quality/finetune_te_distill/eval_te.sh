#!/bin/bash
# Evaluation of the text-encoder-only distillation fine-tune (issue 18), 2 processes x 1 thread:
# the issue's bars, gar-shapes only (the relaxed-caption run's eval_ft.sh also ran baseline-cfg4
# and the other caption forms).
set -x
cd "$(dirname "$0")/../../.."
export PYTHONPATH=$PWD OMP_NUM_THREADS=1
PY=$PWD/.venv/bin/python
M=gnr_fast/models/shapes-v1
RUN=${RUN:-/work/runs18/te_distill}
FT=${FT:-/work/runs18/te_export}
O=${O:-/work/runs18/eval_te}
mkdir -p $O
date -u
$PY -m gnr_fast.training.export --vae $M/vae --unet-run $RUN --tokenizer $M/tokenizer --out $FT
cp $M/gnr_fast.json $FT/
# The run's UNet was frozen; runs started before update_ema skipped frozen modules carry a
# rounding-level EMA drift of it, so the export takes the committed UNet itself.
rm -rf $FT/unet && cp -r $M/unet $FT/unet
date -u
( $PY -m gnr_fast.evaluation.robustness --model $FT --methods gar-shapes --threads 1 --out $O \
      --kinds colour --per-kind 50 --forms full no_size --name colour_50 ; date -u
  $PY -m gnr_fast.training.evaluate --model $FT --steps 50 --cfg 5 --threads 1 --seed 0 --captions 0 --inversions 20 --out $O/inv.json ; date -u
) > $O/A.out 2>&1 &
( $PY -m gnr_fast.cli eval --model $FT --per-kind 50 --methods gar-shapes --threads 1 --out $O/quality ; date -u
  $PY -m gnr_fast.training.evaluate --model $FT --steps 50 --cfg 5 --threads 1 --seed 0 --captions 200 --inversions 0 --batch 32 --out $O/fid.json ; date -u
) > $O/B.out 2>&1 &
wait
date -u
