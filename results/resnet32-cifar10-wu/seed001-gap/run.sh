#!/usr/bin/env bash
# Controlled short runs for the gap to Wu's 91.1: Wu's recipe (--recipe seed001-cifar10) cut to ITERS iterations
# (default 4000; lr steps at 40/60/80% as in the full schedule, e.g. 1600, 2400, 3200;
# warm-up 500 at 0.01 as there), from the same pinned worktree as the full runs (5909c2f),
# one torch thread (SEED001_THREADS=2: both cores), --resume auto (rerun the same command to continue a stopped run).
#   ITERS=10000 bash results/resnet32-cifar10-wu/seed001-gap/run.sh SEED VARIANT...
#   VARIANT: base-bf16 (the decoded JPEG copy), shifted-bf16 (make_data.py's shifted
#   re-encode), shifted2-bf16 (its third round: the shifted re-encode re-encoded, 2 px),
#   base-fp32 (no autocast)
set -u
cd "$(dirname "$0")/../../.."
repo=$(pwd)
seed=$1; shift
iters=${ITERS:-4000}
threads=${SEED001_THREADS:-1}
pin=$(git rev-parse 5909c2f^{commit}) || exit 2
tree=${SEED001_WORKTREE:-$repo/../worktrees/${pin:0:10}}   # run_long.sh's worktree of that commit,
# created here when it is missing
[ -d "$tree" ] || git worktree add --detach "$tree" "$pin" > /dev/null || exit 2
data=${SEED001_DATA_DIR:-$repo/../data}
[ "$(git -C "$tree" rev-parse HEAD)" = "$pin" ] || { echo "worktree not at 5909c2f" >&2; exit 2; }
for variant in "$@"; do
  case $variant in
    base-bf16) npz=cifar10_full.npz; amp="--amp bf16" ;;
    shifted-bf16) npz=cifar10_full_reenc_shifted.npz; amp="--amp bf16" ;;
    shifted2-bf16) npz=cifar10_full_reenc_shifted2.npz; amp="--amp bf16" ;;
    base-fp32) npz=cifar10_full.npz; amp="--amp none" ;;
    *) echo "unknown variant $variant" >&2; exit 2 ;;
  esac
  [ -f "$data/$npz" ] || { echo "$data/$npz missing: decode the copy once (python ../shared/data/cifar10_jpeg.py $data/cifar10_full.npz, as results/run_long.sh does), then python results/resnet32-cifar10-wu/seed001-gap/make_data.py $data/cifar10_full.npz $data" >&2; exit 2; }
  out=$repo/results/resnet32-cifar10-wu/seed001-gap/$variant-it$iters-seed$seed
  echo "== start $(date -u +%FT%TZ) $variant seed $seed iters $iters OMP_NUM_THREADS=$threads" >> "$out.log"
  (cd "$tree" && OMP_NUM_THREADS=$threads python train.py --recipe seed001-cifar10 --dataset npz --data-path "$data/$npz" \
    $amp --channels-last --iters $iters --milestones $((iters * 2 / 5)) $((iters * 3 / 5)) $((iters * 4 / 5)) --eval-every 2 --print-freq 100 \
    --seed $seed --output-dir "$out" --resume auto >> "$out.log" 2>&1)
  rc=$?  # before the date's command substitution, which resets $?
  echo "== end $(date -u +%FT%TZ) exit $rc" >> "$out.log"
done
