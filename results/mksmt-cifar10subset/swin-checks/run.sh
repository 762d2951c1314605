#!/usr/bin/env bash
# The Swin path end to end: swin_t (random init, no weights can be fetched here)
# with two-step MKSMT on S3 and S4 (heads on stages 2 and 3, OPM width 512), 32 px
# CIFAR-10-subset images, 10 iterations of batch 16, then evaluate.py with every head,
# the vertical flip, the complexity count and Grad-CAM overlays of 4 test images.
# To keep it short on 2 CPU cores the test set is cut to its first 20 images per class
# (200 images; the subset's x_test is grouped by class), written to /tmp.
# Usage (from the repository root): bash results/mksmt-cifar10subset/swin-checks/run.sh
set -u
cd "$(dirname "$0")/../../.."
echo "commit $(git rev-parse HEAD)"
small=/tmp/cifar10_subset_test200.npz
python - "$small" "${CIFAR10_SUBSET:-../shared/data/cifar10_subset.npz}" <<'PY'
import sys
import numpy as np
a = np.load(sys.argv[2])
keep = np.concatenate([np.flatnonzero(a["y_test"] == c)[:20] for c in range(10)])
np.savez(sys.argv[1], x_train=a["x_train"], y_train=a["y_train"], x_test=a["x_test"][keep],
         y_test=a["y_test"][keep], classes=a["classes"])
PY
out=results/mksmt-cifar10subset/swin-checks/mksmt-swin-t-32px-smoke
python train.py --dataset npz --data-path $small --model swin_t --loss mksmt \
  --multistep 2 --kd decision --temperature 1 --iters 10 --batch-size 16 --lr 0.01 --milestones \
  --workers 0 --eval-batch-size 200 --print-freq 2 --seed 0 --output-dir $out > $out.log 2>&1
echo "$out: $(tail -n 1 $out.log)"
python evaluate.py --checkpoint $out/checkpoint.pth --flip v --complexity --gradcam 4 \
  --gradcam-dir $out/gradcam --workers 0 --batch-size 200 > $out-evaluate.log 2>&1
grep -v "^  [a-z]* *[0-9.]*$" $out-evaluate.log
