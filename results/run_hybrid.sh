#!/usr/bin/env bash
# CE vs Hybrid-SC vs Hybrid-PSC on the CIFAR-10 subset made long-tailed
# (n_max = 1000 per class; beta = 100 -> 2,478 images, beta = 10 -> 4,084), 3 seeds each.
# One fixed, small budget for every method: ResNet-32, 6 epochs, batch 128 per stream,
# lr 0.125 (the paper's 0.5 at batch 512, scaled linearly), no milestones, wd 1e-4,
# alpha = 1 - (t/6)^2; tau 0.1 for SC and 1 for PSC (the paper's CIFAR-10 values).
# CE is the plain instance-sampled baseline (the LDAM paper's "CE" row).
# Many/medium/few use the paper's thresholds (> 100 / 20-100 / < 20 training images).
# Usage (from the repository root): bash results/run_hybrid.sh QUEUE [seeds...]
#   QUEUE a = beta 100 (all three methods) + beta 10 CE; QUEUE b = beta 10 hybrids.
# The two queues ran side by side, one torch thread each (OMP_NUM_THREADS=1).
# --loader torch: these runs predate the tensor loader (now the default for npz); the flag
# keeps the DataLoader + PIL path they used, so the commands reproduce them.
set -u
cd "$(dirname "$0")/.."
queue=$1; shift
seeds=${*:-0 1 2}
echo "commit $(git rev-parse HEAD)"
run() {  # beta method seed
  local beta=$1 method=$2 seed=$3 extra=""
  case $method in
    ce) extra="--loss ce" ;;
    sc) extra="--loss hybrid-sc --tau 0.1" ;;
    psc) extra="--loss hybrid-psc --tau 1.0" ;;
  esac
  local out=results/hybrid-cifar10subsetlt$beta-resnet32-$method-seed$seed
  python train.py --dataset npz --data-path ../shared/data/cifar10_subset.npz --imbalance-ratio $beta \
    --model resnet32 $extra --epochs 6 --milestones --lr 0.125 --batch-size 128 --wd 1e-4 \
    --workers 0 --loader torch --eval-every 6 --eval-batch-size 500 --print-freq 10 --seed $seed --output-dir $out > $out.log 2>&1
  echo "$out: $(tail -n 1 $out.log)"
}
for seed in $seeds; do
  if [ "$queue" = a ]; then
    for method in ce sc psc; do run 100 $method $seed; done
    run 10 ce $seed
  else
    for method in sc psc; do run 10 $method $seed; done
  fi
done
