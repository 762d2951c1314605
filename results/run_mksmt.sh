#!/usr/bin/env bash
# MKSMT ablation, scaled down, on the CIFAR-10 subset (10,000 train / 10,000 test).
# ResNet-32 (post-activation, option A); MKSMT heads (OPM, width 64) on the last two
# groups (stages 1 and 2, the analogues of S3 and S4). One fixed budget for every
# config: 1 epoch (78 batches of 128), SGD lr 0.1 constant, momentum 0.9, wd 1e-4.
# Configs: plain CE with the backbone's own single head; two-step without KD;
# two-step MKSMT with T = 1 and with T = 4; one-step; two-step with async KD.
# Data: the tensor-resident loader (--loader auto picks it for npz). Flip robustness
# (evaluate.py --flip h|v) for plain and two-step T = 1.
# Usage (from the repository root): bash results/run_mksmt.sh "CONFIGS" [seeds...]
set -u
cd "$(dirname "$0")/.."
configs=$1; shift
seeds=${*:-0 1 2}
echo "commit $(git rev-parse HEAD)"
for seed in $seeds; do
  for config in $configs; do
    case $config in
      plain) extra="--loss ce" ;;
      nokd) extra="--loss mksmt --multistep 2 --kd none" ;;
      t1) extra="--loss mksmt --multistep 2 --kd decision --temperature 1" ;;
      t4) extra="--loss mksmt --multistep 2 --kd decision --temperature 4" ;;
      onestep) extra="--loss mksmt --multistep 1 --kd decision --temperature 1" ;;
      async) extra="--loss mksmt --multistep 2 --kd decision --temperature 1 --kd-exec async" ;;
    esac
    out=results/mksmt-cifar10subset-resnet32-$config-seed$seed
    python train.py --dataset npz --data-path ../shared/data/cifar10_subset.npz --model resnet32 $extra \
      --epochs 1 --milestones --lr 0.1 --batch-size 128 --wd 1e-4 --workers 0 --eval-batch-size 500 \
      --print-freq 13 --seed $seed --output-dir $out > $out.log 2>&1
    echo "$out: $(tail -n 1 $out.log)"
    [ "$config" = plain ] || [ "$config" = t1 ] || continue  # flip robustness: plain vs MKSMT only
    for flip in h v; do
      python evaluate.py --checkpoint $out/checkpoint.pth --flip $flip --json --workers 0 --batch-size 500 \
        > $out-flip$flip.json 2> $out-flip$flip.err
    done
  done
done
