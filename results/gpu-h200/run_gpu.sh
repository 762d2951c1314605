#!/usr/bin/env bash
# Paper-scale runs side by side on one GPU, inside one job of 10 minutes at most: a run
# must finish there, since a ResNet-34 checkpoint (170 MB) cannot come back. Checkpoints go to
# /dev/shm; logs, config.json and metrics.jsonl of every run come back in $OUT/runs.tgz.
#   SET=lfw DEADLINE=420 bash results/gpu-h200/run_gpu.sh   # from the repository root
# SET=lfw: Tong's LFW-20 recipe (--recipe lfw-joint: ResNet-34, 224 px, 300 epochs, batch 64,
#   lr 0.01, lambda 1), --loss ce and joint, seeds 0, 1, 2; LFW top-20 at .devdata/lfw_top20.
#   LOADER=tensor (default): images decoded once onto the GPU, RandomResizedCrop there;
#   LOADER=torch is the first GPU job's PIL DataLoader (2 workers a run: about 675 img/s a run).
# SET=lt: Wang et al.'s CIFAR-10-LT (beta 100) table: --recipe ldam-ce-cifar10lt,
#   hybrid-sc-cifar10lt and hybrid-psc-cifar10lt, seeds 0, 1, 2, from
#   .devdata/cifar10lt100_pack.npz (make_lt_pack.py: the kept images only; train.py's own cut
#   then keeps exactly them).
# EXTRA="...": more train.py flags for every run (default none).
# A watcher measures each run's iterations per second every 20 s and, while the slowest would
# end after DEADLINE seconds, stops (SIGTERM: it saves and says where) every run of the highest
# seed still running; the rest run on to their last epoch or to DEADLINE + 90 s.
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
SET=${SET:-lfw}; DEADLINE=${DEADLINE:-420}; LOADER=${LOADER:-tensor}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
R=/dev/shm/runs; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > $R/gpu.txt
case $SET in
  lfw) names="ce joint"; flags() { echo "--recipe lfw-joint --loss $1 --data-path .devdata/lfw_top20 --loader $LOADER \
           --workers 2 --eval-every 10 --print-freq 23"; }; folder() { echo "lfw20-resnet34-224px-$1-seed$2"; } ;;
  lt)  python3 results/gpu-h200/make_lt_pack.py --decode .devdata/cifar10lt100_pack.npz /tmp/cifar10_lt.npz || exit 2
       names="ldam-ce hybrid-sc hybrid-psc"; flags() { echo "--recipe $1-cifar10lt --dataset npz \
           --data-path /tmp/cifar10_lt.npz --print-freq 24"; }
       # hybrid-*-twopass: one forward pass per branch, as run_long.sh names the code since 8a73f6f
       folder() { case $1 in hybrid-*) echo "$1-twopass-seed$2" ;; *) echo "$1-seed$2" ;; esac; } ;;
  *) echo "SET=lfw or SET=lt" >&2; exit 2 ;;
esac
# Beside the runs, on cores of its own and no GPU: the distributed test that the first GPU job
# saw fail on this machine's CPU (its comparison has changed since; TESTS=0 skips it).
if [ "${TESTS:-1}" = 1 ]; then
    (CUDA_VISIBLE_DEVICES= taskset -c 11-15 timeout 300 python3 -c "import test_all as t
t.test_distributed_training_equals_one_process_on_the_global_batch(); print('PASS')" > $R/tests.txt 2>&1
     echo "exit $?" >> $R/tests.txt) &
    TESTS_PID=$!
fi
start=$(date +%s)
declare -A PIDS  # seed -> pids
for seed in 0 1 2; do for name in $names; do
    out=$R/$(folder $name $seed)
    taskset -c 0-10 python3 train.py $(flags $name) --seed $seed --amp bf16 --channels-last $EXTRA --output-dir $out > $out.log 2>&1 &
    PIDS[$seed]="${PIDS[$seed]} $!"
done; done
(nvidia-smi dmon -s um -d 10 > $R/dmon.txt 2>&1 &)
alive() { for p in ${PIDS[@]}; do kill -0 $p 2>/dev/null && echo $p; done | wc -l; }
# seconds from start at which the slowest unfinished run ends, from its iterations per second since the last poll
project() {
    python3 - "$R" "$start" <<'PY'
import glob, json, os, re, sys, time
folder, start = sys.argv[1], float(sys.argv[2])
state_path, now = os.path.join(folder, "watch.json"), time.time()
state = json.load(open(state_path)) if os.path.exists(state_path) else {}
worst = 0
for log in glob.glob(folder + "/*.log"):
    found = re.findall(r"iter (\d+)/(\d+)", open(log).read())
    if not found:
        continue
    it, total = map(int, found[-1])
    before = state.get(log)
    if before and it > before[0] and it < total:
        worst = max(worst, now - start + (total - it) * (now - before[1]) / (it - before[0]))
    if not before or it > before[0]:
        state[log] = [it, now]
json.dump(state, open(state_path, "w"))
print(int(worst))
PY
}
for seed in 2 1; do
    while :; do
        sleep 20
        [ "$(alive)" -eq 0 ] && break 2
        end=$(project); echo "$(( $(date +%s) - start )) s: $(alive) running, slowest ends at ~$end s" >> $R/watch.txt
        [ "$end" -gt 0 ] && [ $(( $(date +%s) - start )) -ge 60 ] && break
    done
    [ "$end" -le "$DEADLINE" ] && break
    echo "$(( $(date +%s) - start )) s: projected $end s > $DEADLINE s: stopping seed $seed" | tee -a $R/watch.txt
    kill -TERM ${PIDS[$seed]} 2>/dev/null
    sleep 25; project > /dev/null  # restart the rates: the survivors speed up
done
while [ $(( $(date +%s) - start )) -lt $(( DEADLINE + 90 )) ] && [ "$(alive)" -gt 0 ]; do
    sleep 10; echo "$(( $(date +%s) - start )) s: $(alive) running, ends ~$(project) s" >> $R/watch.txt
done
[ -n "${TESTS_PID:-}" ] && wait $TESTS_PID
cat $R/watch.txt; tail -3 $R/tests.txt 2>/dev/null; for f in $R/*.log; do echo "== $f"; grep -E "^final|error|Traceback" $f; tail -1 $f; done
cd $R && tar czf "$OUT/runs.tgz" --exclude='*.pth' --exclude='*.pth.tmp' . && ls -la "$OUT"
