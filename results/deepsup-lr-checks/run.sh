#!/usr/bin/env bash
# Why the deep-supervision study (results/run_deepsup.sh) trains at a constant lr 0.01 with
# Kaiming init: 40-iteration checks of plain56 at lr 0.1 on the CIFAR-10 subset, same
# batch (128) and data as the study, one torch thread each.
# Usage (from the repository root): bash results/deepsup-lr-checks/run.sh [path/to/cifar10_subset.npz]
set -u
cd "$(dirname "$0")/../.."
npz=${1:-../shared/data/cifar10_subset.npz}
out=results/deepsup-lr-checks
echo "commit $(git rev-parse HEAD)" > $out/commit.txt
for case in "kaiming-dsnone --plain-init kaiming" "xavier-dsnone --plain-init xavier" \
            "xavier-ds1 --plain-init xavier --deep-sup 1"; do
  set -- $case; name=$1; shift
  OMP_NUM_THREADS=1 python train.py --dataset npz --data-path "$npz" --model plain56 "$@" --lr 0.1 \
    --iters 40 --milestones --batch-size 128 --workers 0 --print-freq 10 --seed 0 \
    --output-dir /tmp/deepsup-lr-checks/$name > $out/plain56-$name-lr0.1.log 2>&1
  echo "plain56 $name lr 0.1: exit $? ($(grep -c 'iter ' $out/plain56-$name-lr0.1.log) progress lines)"
done
