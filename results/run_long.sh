#!/usr/bin/env bash
# The paper-scale runs, on CPU, stopped and continued as often as needed: one script for all of them.
#
#   bash results/run_long.sh RUN SEED          # start, or continue with --resume auto
#   nohup bash results/run_long.sh hybrid-sc-twopass 0 > /dev/null 2>&1 &
#   stop at a step boundary with a checkpoint: kill -TERM <the python pid> (pgrep -f "output-dir .*RUN-seedN")
#
# RUN (the table below): the recipe, its study folder under results/ and its flags.
# The code is pinned: a run always executes a git worktree of the commit it started at (written
# to <run folder>/pinned_commit at its first start; PIN=<commit> chooses it), so later work on
# train.py cannot change a run half-way. Data: DATA=<npz> (x_train, y_train, x_test, y_test: results/DATA.md),
# by default ../data/cifar10_full.npz, decoded once from ../shared/data/cifar10_jpeg.npz when that is beside the clone.
# The log gets one line at each segment's start (commit, host, cores, threads) and end (exit
# code, mean img/s). THREADS (default 1) sets OMP_NUM_THREADS; NICE (default 10) lets other
# work on the machine go first.
set -u
cd "$(dirname "$0")/.."
repo=$(pwd)
run=${1:?RUN: seed001, hybrid-sc(-twopass), hybrid-psc(-twopass) or ldam-ce}
seed=${2:?SEED}
threads=${THREADS:-1}
case $run in  # study folder | train.py flags
  seed001)    study=resnet32-cifar10-wu; flags="--recipe seed001-cifar10 --eval-every 5 --print-freq 100" ;;
  # hybrid-sc / -psc ran one shared forward pass for both streams (their pinned commit); *-twopass
  # are the runs of the code since, one pass per branch as BBN's code does
  hybrid-sc|hybrid-sc-twopass)   study=hybrid-cifar10lt-full; flags="--recipe hybrid-sc-cifar10lt --print-freq 8 --save-every 40" ;;
  hybrid-psc|hybrid-psc-twopass) study=hybrid-cifar10lt-full; flags="--recipe hybrid-psc-cifar10lt --print-freq 8 --save-every 40" ;;
  ldam-ce)    study=hybrid-cifar10lt-full; flags="--recipe ldam-ce-cifar10lt --print-freq 32 --save-every 200" ;;
  *) echo "unknown RUN $run: seed001, hybrid-sc(-twopass), hybrid-psc(-twopass) or ldam-ce" >&2; exit 2 ;;
esac
out=$repo/results/$study/$run-seed$seed
[ "$run" = seed001 ] && out=$repo/results/$study/seed001-cifar10full-resnet32-seed$seed  # its folders' names
log=$out.log
npz=${DATA:-$repo/../data/cifar10_full.npz}
if [ -f "$out/pinned_commit" ]; then pin=$(cat "$out/pinned_commit"); else
  pin=$(git rev-parse --verify "${PIN:-HEAD}^{commit}") || exit 2; fi
two_pass=$(git merge-base --is-ancestor 8a73f6f "$pin" && echo yes || echo no)  # hybrid_step's pass per branch
case $run:$two_pass in hybrid-sc:yes|hybrid-psc:yes|hybrid-*-twopass:no)
  echo "$run does not fit commit ${pin:0:7}: hybrid-sc / hybrid-psc name the shared-pass code (before 8a73f6f)," \
    "hybrid-*-twopass the code since" >&2; exit 2 ;; esac
mkdir -p "$out"
[ -f "$out/pinned_commit" ] || echo "$pin" > "$out/pinned_commit"
tree=$repo/../worktrees/${pin:0:10}
[ -d "$tree" ] || git worktree add --detach "$tree" "$pin" > /dev/null || exit 2
[ "$(git -C "$tree" rev-parse HEAD)" = "$pin" ] || { echo "worktree $tree is not at $pin" >&2; exit 2; }
if [ ! -f "$npz" ]; then
  mkdir -p "$(dirname "$npz")"
  python "$repo/../shared/data/cifar10_jpeg.py" "$npz" || { echo "no data: set DATA=<an npz of CIFAR-10: x_train, y_train, x_test, y_test> (results/DATA.md)" >&2; exit 2; }
fi
echo "== segment start $(date -u +%FT%TZ) commit $pin host $(hostname) cores $(nproc) OMP_NUM_THREADS=$threads" >> "$log"
cd "$tree"
OMP_NUM_THREADS=$threads nice -n "${NICE:-10}" python train.py $flags --dataset npz --data-path "$npz" \
  --amp bf16 --channels-last --seed "$seed" --output-dir "$out" --resume auto >> "$log" 2>&1
rc=$?
rate=$(awk '/^== segment start/ {n = 0; s = 0} / img\/s / {for (i = 1; i < NF; i++) if ($(i+1) == "img/s") {s += $i; n++}} END {if (n) printf "%.1f", s / n; else print "n/a"}' "$log")
echo "== segment end $(date -u +%FT%TZ) exit $rc, mean of this segment's img/s windows $rate" >> "$log"
