#!/usr/bin/env bash
# The MKSMT study: MKSMT against an update-matched baseline on the CIFAR-10 subset
# (10,000 train / 10,000 test). results/README.md section
# "MKSMT on a CIFAR-10 subset: does it beat a plain network given as many updates?".
#
#   bash results/mksmt-cifar10subset/run.sh CONFIG SEED...    # CONFIG: plain plain2x nokd t1 t4 onestep
#
# ResNet-32 (post-activation, option A); the MKSMT configs put OPM heads (width 64) on the
# last two groups (stages 1 and 2: the analogues of S3 and S4); plain is the backbone with its
# own single head (avgpool + FC). Budget: 10 epochs, batch 128, SGD lr 0.1, momentum 0.9,
# wd 1e-4, lr /10 after epochs 5 and 8 (He et al.'s ResNet-32 lr and its 50% / 75% steps,
# rounded). Nothing is tuned (He et al.'s values), so no validation split.
# plain2x: the update-matched baseline. Two-step MKSMT takes two optimizer updates per batch
# (CE(S3), then CE(S4) + KD), so plain runs twice the epochs (20, steps after 10 and 16):
# the same number of updates (1,560) and of forward / backward passes through S1..S3.
# onestep: one update per batch on CE(S3) + CE(S4) + KD (as many updates as plain).
# bf16 autocast + channels-last on the CPU (x2 img/s); the losses and the KD softmax run in fp32.
# Vertical-flip robustness of every run: evaluate.py --flip v on the last checkpoint.
# One torch thread per run (OMP_NUM_THREADS=1), two runs side by side. EPOCHS=N overrides the
# length (smoke tests only).
set -u
cd "$(dirname "$0")/../.."
DATA=${CIFAR10_SUBSET:-../shared/data/cifar10_subset.npz}
OUT=results/mksmt-cifar10subset
export OMP_NUM_THREADS=1
epochs=${EPOCHS:-10}
config=$1; shift
case $config in
  plain) extra=(--loss ce) ;;
  plain2x) extra=(--loss ce); epochs=$((epochs * 2)) ;;
  nokd) extra=(--loss mksmt --multistep 2 --kd none) ;;
  t1) extra=(--loss mksmt --multistep 2 --kd decision --temperature 1) ;;
  t4) extra=(--loss mksmt --multistep 2 --kd decision --temperature 4) ;;
  onestep) extra=(--loss mksmt --multistep 1 --kd decision --temperature 1) ;;
  *) echo "unknown config $config" >&2; exit 2 ;;
esac
steps=($((epochs / 2)) $((epochs * 8 / 10)))
mkdir -p "$OUT"
echo "commit $(git rev-parse HEAD)"
for seed in "$@"; do
  out=$OUT/$config-seed$seed
  python train.py --dataset npz --data-path "$DATA" --model resnet32 "${extra[@]}" \
    --epochs "$epochs" --milestones "${steps[@]}" --lr 0.1 --batch-size 128 --momentum 0.9 --wd 1e-4 \
    --amp bf16 --channels-last --workers 0 --eval-every 5 --eval-batch-size 500 --print-freq 13 \
    --seed "$seed" --output-dir "$out" --resume auto >> "$out.log" 2>&1  # >>: a resumed run keeps the log of its first part
  echo "$out (exit $?): $(tail -n 1 "$out.log")"
  python evaluate.py --checkpoint "$out/checkpoint.pth" --flip v --json --workers 0 --batch-size 500 \
    > "$out-flipv.json" 2>> "$out.log"  # its warnings, if any, in the log
done
