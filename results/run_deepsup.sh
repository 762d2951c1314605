#!/usr/bin/env bash
# With vs without deep supervision (one aux head after stage 1), 3 seeds each,
# on the CIFAR-10 subset. One fixed, very small budget: 2 epochs, lr 0.01 constant
# (at lr 0.1 plain56 stayed at chance with either init: results/deepsup-lr-checks/),
# batch 128. plain56 uses Kaiming init here so that it can learn at all in 2 epochs.
# Usage (from the repository root): bash results/run_deepsup.sh plain56|resnet56 [seeds...]
# The two models were run side by side, one torch thread each (OMP_NUM_THREADS=1).
# --loader torch: these runs predate the tensor loader (now the default for npz); the flag
# keeps the DataLoader + PIL path they used, so the commands reproduce them.
set -u
cd "$(dirname "$0")/.."
model=$1; shift
seeds=${*:-0 1 2}
echo "commit $(git rev-parse HEAD)"
for seed in $seeds; do
  for ds in none 1; do
    out=results/deepsup-cifar10subset-$model-ds$ds-seed$seed
    flag=""; [ "$ds" != none ] && flag="--deep-sup $ds"
    # --plain-init only for plain nets: train.py now rejects a flag the model does not use
    case $model in plain*) flag="$flag --plain-init kaiming" ;; esac
    python train.py --dataset npz --data-path ../shared/data/cifar10_subset.npz --model $model \
      $flag --epochs 2 --milestones --lr 0.01 --batch-size 128 \
      --workers 0 --loader torch --eval-every 2 --print-freq 20 --seed $seed --output-dir $out > $out.log 2>&1
    echo "$out: $(tail -n 1 $out.log)"
  done
done
