#!/usr/bin/env bash
# Why does LDAM-DRW's CE recipe end under its paper's 70.36 on our CIFAR-10-LT? Controlled short
# runs, as for Wu's gap (results/resnet32-cifar10-wu/seed001-gap/): `--recipe ldam-ce-cifar10lt`
# cut to EPOCHS epochs (default 50; warm-up 5 epochs as there, x0.01 at 80% and x0.0001 at 90%
# of the epochs, as 160 and 180 of 200), from the same pinned worktree as the full CE run of
# seed 0 (1443ed6; the full run of seed 1 ran b76683b), one torch thread, niced, --resume auto
# (rerun the same command to continue).
#   EPOCHS=50 bash results/hybrid-cifar10lt-full/gap/run.sh SEED VARIANT...
#   VARIANT: base-bf16 (the decoded JPEG copy, as the full runs), shifted-bf16 (one more JPEG
#   round at the copy's settings, shifted so that it is a fresh one: make_data.py of Wu's study),
#   ldamcut-bf16 (the images LDAM-DRW's own cut keeps: make_ldam_cut.py), base-fp32 (no autocast)
# The long-tailed cut keeps the same images in every variant (it draws from the labels, with
# --split-seed 0, whatever --seed). REPO: the repository (to run a copy of this script from elsewhere).
set -u
cd "${REPO:-$(dirname "$0")/../../..}"
repo=$(pwd)
seed=${1:?SEED}; shift
epochs=${EPOCHS:-50}
pin=$(git rev-parse 1443ed6^{commit})
tree=$repo/../worktrees/${pin:0:10}  # the worktree results/run_long.sh makes for the full CE run
[ -d "$tree" ] || git worktree add --detach "$tree" "$pin" > /dev/null || exit 2
[ "$(git -C "$tree" rev-parse HEAD)" = "$pin" ] || { echo "worktree $tree is not at $pin" >&2; exit 2; }
data=${DATA_DIR:-$repo/../data}
for variant in "$@"; do
  case $variant in
    base-bf16) npz=cifar10_full.npz; amp="--amp bf16" ;;
    shifted-bf16) npz=cifar10_full_reenc_shifted.npz; amp="--amp bf16" ;;
    ldamcut-bf16) npz=cifar10_full_ldamcut.npz; amp="--amp bf16" ;;
    base-fp32) npz=cifar10_full.npz; amp="--amp none" ;;
    *) echo "unknown variant $variant" >&2; exit 2 ;;
  esac
  [ -f "$data/$npz" ] || { echo "$data/$npz missing: python ../shared/data/cifar10_jpeg.py $data/cifar10_full.npz, then python results/resnet32-cifar10-wu/seed001-gap/make_data.py $data/cifar10_full.npz $data (shifted) or python results/hybrid-cifar10lt-full/gap/make_ldam_cut.py $data/cifar10_full.npz $data/cifar10_full_ldamcut.npz" >&2; exit 2; }
  out=$repo/results/hybrid-cifar10lt-full/gap/$variant-ep$epochs-seed$seed
  echo "== start $(date -u +%FT%TZ) $variant seed $seed epochs $epochs commit $pin host $(hostname)" >> "$out.log"
  (cd "$tree" && OMP_NUM_THREADS=1 nice -n "${NICE:-10}" python train.py --recipe ldam-ce-cifar10lt --dataset npz \
    --data-path "$data/$npz" $amp --channels-last --epochs $epochs --milestones $((epochs * 4 / 5)) $((epochs * 9 / 10)) \
    --print-freq 96 --save-every 200 --seed $seed --output-dir "$out" --resume auto >> "$out.log" 2>&1)
  rc=$?  # before the date's command substitution, which resets $?
  echo "== end $(date -u +%FT%TZ) exit $rc" >> "$out.log"
done
