#!/bin/bash
# Evaluation of a text-encoder-only distillation fine-tune (issue 18): export of the run, then the
# issue's bars by ../eval_model.sh (gar-shapes only; the relaxed-caption run's eval_ft.sh also ran
# baseline-cfg4 and the other caption forms).
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
$PY -m gnr_shapes.training.export --vae $M/vae --unet-run $RUN --tokenizer $M/tokenizer --out $FT --defaults-from $M
# The run's UNet was frozen; runs started before update_ema skipped frozen modules carry a
# rounding-level EMA drift of it, so the export takes the committed UNet itself.
rm -rf $FT/unet && cp -r $M/unet $FT/unet
MODEL=$FT O=$O bash benchmarks/quality/eval_model.sh
