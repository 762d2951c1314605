#!/usr/bin/env bash
# Controlled 50-epoch cuts of the hybrids, as gap/run.sh for CE: is their gap to the paper the crop of
# their views, the JPEG copy of the data, or the CE sampler? `--recipe hybrid-sc-cifar10lt` (or psc) cut to EPOCHS epochs
# (default 50; lr /10 at 60% and 80% of them, as 120 and 160 of 200; alpha = 1 - (t/T)^2 over the cut), one
# torch thread each, niced, --resume auto (rerun the same command to continue). Code: PIN (default HEAD;
# the runs here: 680eae1, the commit that added --hybrid-crop), in a git worktree beside the repository.
#   PIN=680eae1 bash results/hybrid-cifar10lt-full/cuts/run.sh SEED VARIANT...   # -ceinstance: PIN=96aad0f
# VARIANT: LOSS-CROP[-shifted][-ceinstance], LOSS sc or psc. CROP: pad (4 px padding + 32x32 crop, the full
# runs') or resized (SupContrast's CIFAR views, RandomResizedCrop(32, scale=(0.2, 1)), --hybrid-crop
# resized): the digest says "32x32 random crop". -shifted: the data after one more JPEG round at the copy's
# settings (make_data.py of Wu's study, results/resnet32-cifar10-wu/seed001-gap/), else the copy the full
# runs read. -ceinstance: --hybrid-ce-sampler instance (the CE batch shuffled, not class-balanced; a PIN
# from 96aad0f, which added the flag, on: its default path equals 680eae1's, refactor-golden/).
# The long-tailed cut keeps the same images in every variant (drawn from the labels, --split-seed 0).
set -u
cd "${REPO:-$(dirname "$0")/../../..}"
repo=$(pwd)
seed=${1:?SEED}; shift
epochs=${EPOCHS:-50}
pin=$(git rev-parse "${PIN:-HEAD}^{commit}") || exit 2
tree=$repo/../worktrees/${pin:0:10}
[ -d "$tree" ] || git worktree add --detach "$tree" "$pin" > /dev/null || exit 2
[ "$(git -C "$tree" rev-parse HEAD)" = "$pin" ] || { echo "worktree $tree is not at $pin" >&2; exit 2; }
data=${DATA_DIR:-$repo/../data}
for variant in "$@"; do
  [[ $variant =~ ^(sc|psc)-(pad|resized)(-shifted)?(-ceinstance)?$ ]] || { echo "unknown variant $variant" >&2; exit 2; }
  loss=${BASH_REMATCH[1]} crop=${BASH_REMATCH[2]} npz=cifar10_full.npz extra=""
  [ -n "${BASH_REMATCH[3]}" ] && npz=cifar10_full_reenc_shifted.npz
  [ -n "${BASH_REMATCH[4]}" ] && extra="--hybrid-ce-sampler instance"
  [ -z "$extra" ] || git -C "$tree" grep -q -- --hybrid-ce-sampler utils.py || {
    echo "$variant needs a PIN with --hybrid-ce-sampler (96aad0f or later), not ${pin:0:7}" >&2; exit 2; }
  [ -f "$data/$npz" ] || { echo "$data/$npz missing: python ../shared/data/cifar10_jpeg.py $data/cifar10_full.npz, then (shifted) python results/resnet32-cifar10-wu/seed001-gap/make_data.py $data/cifar10_full.npz $data" >&2; exit 2; }
  out=$repo/results/hybrid-cifar10lt-full/cuts/$variant-ep$epochs-seed$seed
  echo "== start $(date -u +%FT%TZ) $variant seed $seed epochs $epochs commit $pin host $(hostname)" >> "$out.log"
  (cd "$tree" && OMP_NUM_THREADS=1 nice -n "${NICE:-10}" python train.py --recipe "hybrid-$loss-cifar10lt" \
    --hybrid-crop "$crop" $extra --dataset npz --data-path "$data/$npz" --amp bf16 --channels-last --epochs "$epochs" \
    --milestones $((epochs * 3 / 5)) $((epochs * 4 / 5)) --print-freq 24 --save-every 48 --seed "$seed" \
    --output-dir "$out" --resume auto >> "$out.log" 2>&1)
  rc=$?  # before the date's command substitution, which resets $?
  echo "== end $(date -u +%FT%TZ) exit $rc" >> "$out.log"
done
