#!/usr/bin/env bash
# The deep-supervision study: where does deep supervision help? Plain nets (no BN, no
# shortcuts) and ResNet-56 as the control, on the CIFAR-10 subset (10,000 train /
# 10,000 test). results/README.md section
# "Deep supervision on plain nets: where does an auxiliary head help?".
# MODEL: plainD (Xavier init, models.py's default: the vanishing-gradient setting Wang et al. 2015
# is about), plainD-kaiming (He init, fan_in), or resnet56.
#
#   bash results/deep-supervision-cifar10subset/run.sh sweep  MODEL LR...          # lr on a validation split, no aux head, seed 0
#   bash results/deep-supervision-cifar10subset/run.sh select MODEL LR...          # prints the lr with the best last val top-1
#   bash results/deep-supervision-cifar10subset/run.sh probe  MODEL LR DS...       # gradient probe (DS: none or --deep-sup stages)
#   bash results/deep-supervision-cifar10subset/run.sh final  MODEL LR DS SEED...  # full training set, test set
#
# Budgets (every run alike within a stage; one torch thread per run, two runs side by side):
#   sweep: 5 epochs at constant lr, --val-split 0.2 (stratified, --split-seed 0), evaluated every epoch;
#   final: 10 epochs, lr /10 after epochs 5 and 8 (He et al.'s 50% / 75% steps, scaled), evaluated every epoch.
# Both: SGD momentum 0.9, wd 1e-4, batch 128, random crop + flip. Auxiliary head: the paper's
# (conv + 2 FC with ReLU and dropout 0.5 + FC), alpha_0 = 0.3, alpha_t = alpha_0 (1 - t/N).
# Not in the paper: bf16 autocast + channels-last (x2.1 - 2.2 img/s on this CPU, measured with
# benchmark.py; weights, optimizer and loss stay fp32; bf16 has fp32's exponent range, so small
# gradients are not flushed to zero the way fp16 would flush them).
set -u
cd "$(dirname "$0")/../.."
DATA=${CIFAR10_SUBSET:-../shared/data/cifar10_subset.npz}
OUT=results/deep-supervision-cifar10subset
export OMP_NUM_THREADS=1
common=(--dataset npz --data-path "$DATA" --batch-size 128 --momentum 0.9 --wd 1e-4 --workers 0
        --amp bf16 --channels-last --eval-batch-size 500 --print-freq 20)
stage=$1; name=$2; shift 2
model=${name%-kaiming}
init=(); case $name in *-kaiming) init=(--plain-init kaiming) ;; plain*) init=(--plain-init xavier) ;; esac
mkdir -p "$OUT"
if [ "$stage" = select ]; then  # last evaluation's validation top-1 of each sweep run (a stopped run: 0); ties: the first
  for lr in "$@"; do
    echo "$lr $(python -c 'import json,sys
rows = [json.loads(l) for l in open(sys.argv[1])] if __import__("os").path.exists(sys.argv[1]) else []
print(rows[-1]["val_top1"] if rows and rows[-1]["epoch"] == 4 else 0.0)' "$OUT/sweep-$name-lr$lr/metrics.jsonl")"
  done | sort -k2,2gr -s | head -n 1 | cut -d' ' -f1
  exit 0
fi
echo "commit $(git rev-parse HEAD)"
case $stage in
  sweep)
    for lr in "$@"; do
      out=$OUT/sweep-$name-lr$lr
      python train.py "${common[@]}" --model "$model" "${init[@]}" --epochs 5 --milestones --lr "$lr" \
        --val-split 0.2 --seed 0 --output-dir "$out" > "$out.log" 2>&1
      echo "$out (exit $?): $(tail -n 1 "$out.log")"
    done ;;
  probe)  # 20 iterations at the final runs' lr from the seed-0 initialisation, the paper's 1e-7 threshold
    lr=$1; shift
    for ds in "$@"; do
      out=$OUT/probe-$name-ds${ds/,/-}
      flag=(); [ "$ds" != none ] && flag=(--deep-sup "$ds")
      python train.py "${common[@]}" --model "$model" "${init[@]}" "${flag[@]}" --lr "$lr" --probe-gradients 20 \
        --seed 0 --output-dir "$out" > "$out.log" 2>&1
      echo "$out (exit $?): $(grep -E 'attach|layers with' "$out.log" | cut -c1-160)"
    done ;;
  final)
    lr=$1; ds=$2; shift 2
    flag=(); [ "$ds" != none ] && flag=(--deep-sup "$ds")
    for seed in "$@"; do
      out=$OUT/final-$name-ds${ds/,/-}-seed$seed
      python train.py "${common[@]}" --model "$model" "${init[@]}" "${flag[@]}" --epochs 10 --milestones 5 8 \
        --lr "$lr" --seed "$seed" --output-dir "$out" > "$out.log" 2>&1
      echo "$out (exit $?): $(tail -n 1 "$out.log")"
    done ;;
  *) echo "unknown stage $stage" >&2; exit 2 ;;
esac
