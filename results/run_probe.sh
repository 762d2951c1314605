#!/usr/bin/env bash
# Gradient probe of plain56 (no BN, no shortcuts, Xavier init) at initialisation,
# 10 iterations, without and with the auxiliary head the probe suggests (after stage 1).
# --loader torch: these runs predate the tensor loader (now the default for npz); the flag
# keeps the DataLoader + PIL path they used, so the commands reproduce them.
set -u
cd "$(dirname "$0")/.."
echo "commit $(git rev-parse HEAD)"
for ds in none 1 0,1; do
  out=results/probe-plain56-deepsup-${ds/,/-}
  flag=""; [ "$ds" != none ] && flag="--deep-sup $ds"
  python train.py --dataset npz --data-path ../shared/data/cifar10_subset.npz --model plain56 $flag \
    --probe-gradients 10 --workers 0 --loader torch --seed 0 --output-dir $out > $out.log 2>&1
  grep -E "layers with|attach|wrote" $out.log | cut -c1-400
done
