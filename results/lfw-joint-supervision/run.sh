#!/usr/bin/env bash
# The LFW study: does joint supervision (CE + lambda * contrastive-center,
# Eq. 8) beat softmax CE on LFW top-20? CPU scale; results/README.md section
# "Joint supervision on LFW top-20: does CE + contrastive-center beat CE?".
#
#   bash results/lfw-joint-supervision/run.sh sweep  joint|center LAMBDA...   # lambda on a validation split, seed 0
#   bash results/lfw-joint-supervision/run.sh select joint|center LAMBDA...   # prints the lambda with the best val top-1
#   bash results/lfw-joint-supervision/run.sh final  ce|joint|center LAMBDA SEED...   # full training set, test set
#
# Order used: the sweeps and final ce - 0 1 2, then final with the selected lambda:
#   bash results/lfw-joint-supervision/run.sh final joint $(bash results/lfw-joint-supervision/run.sh select joint 0.01 0.1 1) 0 1 2
#
# Budget (all runs alike): ResNet-18 (ImageNet stem, from scratch) at 72 px, 20 epochs,
# batch 64, lr 0.01 (the paper's), /10 after epoch 15 (not in the paper: a pilot at
# constant lr swung by up to 12.9 points of test top-1 between consecutive late evaluations, see
# results/lfw-joint-supervision/pilot-constant-lr), momentum 0.9, wd 5e-4, centers by plain SGD at
# lr 0.5, the center term summed over the batch (both losses; --ctc-reduction sum, the default for center until
# it became mean), RandomResizedCrop + flip / resize + center crop. One torch thread per run
# (OMP_NUM_THREADS=1), two runs side by side on 2 cores. Data: LFW top-20 (1906 images;
# README.md, section Data), 8:2 split per identity (--split-seed 0).
set -u
cd "$(dirname "$0")/../.."
DATA=${LFW_TOP20:-../shared/data/lfw_top20}
export OMP_NUM_THREADS=1
common=(--dataset lfw --data-path "$DATA" --image-size 72 --model resnet18 --epochs 20 --milestones 15
        --lr 0.01 --momentum 0.9 --wd 5e-4 --batch-size 64 --workers 0 --loader torch
        --eval-every 2 --print-freq 24)
stage=$1; loss=$2; shift 2
if [ "$stage" = select ]; then  # last evaluation's validation top-1 of each sweep run; ties: the first
  for lam in "$@"; do
    echo "$lam $(tail -n 1 results/lfw-joint-supervision/sweep-$loss-lam$lam/metrics.jsonl | python -c 'import json,sys; print(json.load(sys.stdin)["val_top1"])')"
  done | sort -k2,2gr -s | head -n 1 | cut -d' ' -f1
  exit 0
fi
echo "commit $(git rev-parse HEAD)"
if [ "$stage" = sweep ]; then
  for lam in "$@"; do
    out=results/lfw-joint-supervision/sweep-$loss-lam$lam
    python train.py "${common[@]}" --loss "$loss" --lambda "$lam" --center-lr 0.5 --ctc-reduction sum --val-split 0.2 --seed 0 \
      --output-dir "$out" > "$out.log" 2>&1
    echo "$out: $(tail -n 1 "$out.log")"
  done
else
  lam=$1; shift
  for seed in "$@"; do
    out=results/lfw-joint-supervision/final-$loss-seed$seed
    extra=(); [ "$loss" != ce ] && extra=(--lambda "$lam" --center-lr 0.5 --ctc-reduction sum)
    python train.py "${common[@]}" --loss "$loss" "${extra[@]}" --seed "$seed" \
      --output-dir "$out" > "$out.log" 2>&1
    echo "$out: $(tail -n 1 "$out.log")"
  done
fi
