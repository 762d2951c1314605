#!/usr/bin/env bash
# The hybrid study: hybrid network vs CE on the CIFAR-10 subset made long-tailed,
# at an informative CPU budget. results/README.md section
# "Hybrid network on a long-tailed CIFAR-10 subset: does it beat CE, and is it the sampler?".
#
#   bash results/hybrid-cifar10lt-subset/run.sh METHOD BETA SEED...
#   # METHOD: ce, ce-balanced, sc, psc; ce-3x, ce-balanced-3x (compute-matched, see below)
#
# Data: the CIFAR-10 subset (1,000 training images per class) cut to n_i = 1000 * beta^(-i/9)
# (--imbalance-ratio beta: 2,478 images at beta 100, 4,084 at beta 10); the 10,000 test images.
# Budget (every run alike): ResNet-32, 30 epochs, batch 128 per stream, lr 0.125 (the paper's
# 0.5 at batch 512, scaled linearly), /10 after epochs 18 and 24 (the paper's 120 / 160 of 200:
# 60% and 80%), momentum 0.9, wd 1e-4, alpha = 1 - (t/30)^2 over the whole run; tau 0.1 (SC)
# and 1 (PSC), the paper's CIFAR-10 values. Nothing is tuned: every value is the paper's
# (scaled), so no validation split is needed.
# ce-balanced: plain CE with the class-balanced sampler alone (--sampler class-balanced), to
# separate "the contrastive branch helps" from "balanced sampling helps".
# ce-3x, ce-balanced-3x: the same at three times the epochs (90, lr steps at 54 and 72), as many
# images through the network as the hybrid's: each hybrid step forwards two augmented views per
# contrastive-branch image plus one CE-branch image (3 x 128), a CE step 128.
# Many / medium / few: --many-threshold 200 --few-threshold 40, the usual > 100 / < 20 of
# CIFAR-100-LT (n_max = 500: n_max / 5 and n_max / 25) scaled to n_max = 1000. At beta 100 that
# gives 4 / 3 / 3 classes (at beta 10: 7 / 3 / 0). The paper's own thresholds regroup the same
# checkpoint with evaluate.py --many-threshold 100 --few-threshold 20 (<run>-paper-thresholds.json).
# bf16 autocast + channels-last on the CPU (x2 img/s); the losses (SupCon / PSC similarities,
# CE) run in fp32 on the cast-up outputs. One torch thread per run (OMP_NUM_THREADS=1), two runs
# side by side. EPOCHS=N overrides the length (smoke tests only).
set -u
cd "$(dirname "$0")/../.."
DATA=${CIFAR10_SUBSET:-../shared/data/cifar10_subset.npz}
OUT=results/hybrid-cifar10lt-subset
export OMP_NUM_THREADS=1
method=$1; beta=$2; shift 2
epochs=${EPOCHS:-30}
case $method in
  ce) extra=(--loss ce) ;;
  ce-balanced) extra=(--loss ce --sampler class-balanced) ;;
  ce-3x) extra=(--loss ce); epochs=$((epochs * 3)) ;;
  ce-balanced-3x) extra=(--loss ce --sampler class-balanced); epochs=$((epochs * 3)) ;;
  sc) extra=(--loss hybrid-sc --tau 0.1) ;;
  psc) extra=(--loss hybrid-psc --tau 1.0) ;;
  *) echo "unknown method $method" >&2; exit 2 ;;
esac
steps=($((epochs * 6 / 10)) $((epochs * 8 / 10)))
mkdir -p "$OUT"
echo "commit $(git rev-parse HEAD)"
for seed in "$@"; do
  out=$OUT/lt$beta-$method-seed$seed
  python train.py --dataset npz --data-path "$DATA" --imbalance-ratio "$beta" --model resnet32 "${extra[@]}" \
    --epochs "$epochs" --milestones "${steps[@]}" --lr 0.125 --batch-size 128 --momentum 0.9 --wd 1e-4 \
    --many-threshold 200 --few-threshold 40 --workers 0 --eval-every 5 --eval-batch-size 500 --print-freq 10 \
    --amp bf16 --channels-last --seed "$seed" --output-dir "$out" --resume auto >> "$out.log" 2>&1  # >>: a resumed run keeps the log of its first part
  echo "$out (exit $?): $(tail -n 1 "$out.log")"
  python evaluate.py --checkpoint "$out/checkpoint.pth" --many-threshold 100 --few-threshold 20 --json \
    --workers 0 --batch-size 500 > "$out-paper-thresholds.json" 2>> "$out.log"
done
