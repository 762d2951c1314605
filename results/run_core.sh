#!/usr/bin/env bash
# Measured results: CE vs joint (CE + contrastive-center, Eq. 8), 3 seeds each,
# on the real data in ../shared/data, reduced budgets for a 2-core CPU (see results/README.md).
# Usage (from the repository root): bash results/run_core.sh cifar|lfw [seeds...]
# The two queues were run side by side, one torch thread each (OMP_NUM_THREADS=1).
# --loader torch: these runs predate the tensor loader (now the default for npz); the flag
# keeps the DataLoader + PIL path they used, so the commands reproduce them.
set -u
cd "$(dirname "$0")/.."
which=$1; shift
seeds=${*:-0 1 2}
echo "commit $(git rev-parse HEAD)"
for seed in $seeds; do
  for loss in ce joint; do
    if [ "$which" = cifar ]; then
      out=results/cifar10subset-resnet32-$loss-seed$seed
      python train.py --dataset npz --data-path ../shared/data/cifar10_subset.npz \
        --model resnet32 --loss $loss --epochs 10 --milestones 5 8 --lr 0.1 --batch-size 128 \
        --workers 0 --loader torch --eval-every 5 --print-freq 20 --seed $seed --output-dir $out > $out.log 2>&1
    else
      out=results/lfw20-resnet18-112px-$loss-seed$seed
      python train.py --dataset lfw --data-path ../shared/data/lfw_top20 --image-size 112 \
        --model resnet18 --loss $loss --epochs 10 --milestones --lr 0.01 --wd 5e-4 --batch-size 64 \
        --workers 1 --loader torch --eval-every 5 --print-freq 10 --seed $seed --output-dir $out > $out.log 2>&1
    fi
    echo "$out: $(tail -n 1 $out.log)"
  done
done
