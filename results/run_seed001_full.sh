#!/usr/bin/env bash
# Seed 001's whole recipe (ResNet-32, 80k iterations at batch 128, warm-up 500 at lr 0.01,
# /10 at 32k/48k/64k) on the full CIFAR-10 (50k / 10k, the JPEG-derived copy of the team's
# data folder), on CPU, across sessions. The code is pinned: the run always executes a git
# worktree of the commit it started at, so later work on train.py cannot change it.
#
# Usage (from the repository root): bash results/run_seed001_full.sh [SEED]
#   start or continue (--resume auto) in the background, appending to the log:
#   nohup bash results/run_seed001_full.sh 0 > /dev/null 2>&1 &
#   stop at a step boundary with a checkpoint: kill -TERM <the python pid>
# Settings: bf16 autocast + channels-last, eager (torch.compile measured no faster on this
# CPU at one thread: 340 vs 343 img/s over the same 300 iterations, same loss curve), one
# torch thread (the other core is for the session's own work); SEED001_THREADS=2 gives it both
# cores (a different thread count can change float summation order, so the log records it).
set -u
cd "$(dirname "$0")/.."
repo=$(pwd)
seed=${1:-0}
threads=${SEED001_THREADS:-1}
pin=$(git rev-parse --verify 5909c2f^{commit})
tree=${SEED001_WORKTREE:-$repo/../seed001-worktree}
npz=${SEED001_DATA:-$repo/../data/cifar10_full.npz}
out=$repo/results/seed001-cifar10full-resnet32-seed$seed
log=$out.log
[ -d "$tree" ] || git worktree add --detach "$tree" "$pin" > /dev/null
[ "$(git -C "$tree" rev-parse HEAD)" = "$pin" ] || { echo "worktree $tree is not at $pin" >&2; exit 2; }
if [ ! -f "$npz" ]; then
  mkdir -p "$(dirname "$npz")"
  python "$repo/../shared/data/cifar10_jpeg.py" "$npz" || exit 2
fi
echo "== segment start $(date -u +%FT%TZ) commit $pin host $(hostname) cores $(nproc) OMP_NUM_THREADS=$threads" >> "$log"
cd "$tree"
OMP_NUM_THREADS=$threads python train.py --recipe seed001-cifar10 --dataset npz --data-path "$npz" \
  --amp bf16 --channels-last --eval-every 5 --print-freq 100 --seed $seed \
  --output-dir "$out" --resume auto >> "$log" 2>&1
rc=$?
rate=$(awk '/^== segment start/ {n = 0; s = 0} / img\/s / {for (i = 1; i < NF; i++) if ($(i+1) == "img/s") {s += $i; n++}} END {if (n) printf "%.1f", s / n; else print "n/a"}' "$log")
echo "== segment end $(date -u +%FT%TZ) exit $rc, mean of this segment's img/s windows $rate" >> "$log"
