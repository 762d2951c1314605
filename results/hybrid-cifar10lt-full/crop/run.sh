#!/usr/bin/env bash
# Is the hybrids' gap to the paper the crop of their views? The digest says "32x32 random crop"; the full
# runs pad 4 px and crop (CIFAR classifiers' crop), while SupContrast's CIFAR views, whose colour jitter the
# hybrids already use, take RandomResizedCrop(32, scale=(0.2, 1)) (--hybrid-crop resized). Controlled short
# runs, as gap/run.sh for CE: `--recipe hybrid-sc-cifar10lt` cut to EPOCHS epochs (default 50; lr /10 at 60%
# and 80% of them, as 120 and 160 of 200; alpha = 1 - (t/T)^2 over the cut), the same data as the full runs,
# one torch thread each, niced, --resume auto (rerun the same command to continue). Code: PIN (default the
# commit that added --hybrid-crop), in a git worktree beside the repository.
#   bash results/hybrid-cifar10lt-full/crop/run.sh SEED VARIANT...     # VARIANT: sc-pad, sc-resized, psc-pad, psc-resized
set -u
cd "${REPO:-$(dirname "$0")/../../..}"
repo=$(pwd)
seed=${1:?SEED}; shift
epochs=${EPOCHS:-50}
pin=$(git rev-parse "${PIN:-HEAD}^{commit}") || exit 2
tree=$repo/../worktrees/${pin:0:10}
[ -d "$tree" ] || git worktree add --detach "$tree" "$pin" > /dev/null || exit 2
[ "$(git -C "$tree" rev-parse HEAD)" = "$pin" ] || { echo "worktree $tree is not at $pin" >&2; exit 2; }
npz=${DATA:-$repo/../data/cifar10_full.npz}
[ -f "$npz" ] || { echo "$npz missing: python ../shared/data/cifar10_jpeg.py $npz" >&2; exit 2; }
for variant in "$@"; do
  case $variant in sc-pad|sc-resized|psc-pad|psc-resized) ;; *) echo "unknown variant $variant" >&2; exit 2 ;; esac
  out=$repo/results/hybrid-cifar10lt-full/crop/$variant-ep$epochs-seed$seed
  echo "== start $(date -u +%FT%TZ) $variant seed $seed epochs $epochs commit $pin host $(hostname)" >> "$out.log"
  (cd "$tree" && OMP_NUM_THREADS=1 nice -n "${NICE:-10}" python train.py --recipe "hybrid-${variant%-*}-cifar10lt" \
    --hybrid-crop "${variant#*-}" --dataset npz --data-path "$npz" --amp bf16 --channels-last --epochs "$epochs" \
    --milestones $((epochs * 3 / 5)) $((epochs * 4 / 5)) --print-freq 24 --save-every 48 --seed "$seed" \
    --output-dir "$out" --resume auto >> "$out.log" 2>&1)
  rc=$?  # before the date's command substitution, which resets $?
  echo "== end $(date -u +%FT%TZ) exit $rc" >> "$out.log"
done
