#!/usr/bin/env bash
# Tong's LFW-20 recipe (--recipe lfw-joint: ResNet-34, 224 px, 300 epochs, batch 64, lr 0.01) with
# --loss ce and --loss joint, seeds 0, 1, 2: six processes side by side on the one GPU, bf16 autocast
# + channels-last, checkpoints in /dev/shm (a ResNet-34 checkpoint is 170 MB: it cannot come back).
# A run must finish inside the call, so a watcher projects each run's end from its progress lines
# every 20 s and, while the slowest would end after DEADLINE seconds, stops the pair of the highest
# seed still running (SIGTERM: it saves and stops; its log says where). Logs, config.json and
# metrics.jsonl of every run come back in lfw.tgz.
#   DEADLINE=480 bash results/gpu-h200/run_lfw.sh        # from the repository root, LFW at .devdata/lfw_top20
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
DEADLINE=${DEADLINE:-480}
# tensor: images decoded once onto the GPU, RandomResizedCrop there (the first session's PIL loader,
# LOADER=torch with 2 workers a run, fed about 675 img/s per run and no run finished)
LOADER=${LOADER:-tensor}
export PYTHONUNBUFFERED=1 OMP_NUM_THREADS=1
R=/dev/shm/lfw; rm -rf $R; mkdir -p $R
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader > $R/gpu.txt
start=$(date +%s)
declare -A PID
for seed in 0 1 2; do for loss in ce joint; do
    name=lfw20-resnet34-224px-$loss-seed$seed
    python3 train.py --recipe lfw-joint --loss $loss --seed $seed --data-path .devdata/lfw_top20 --amp bf16 \
        --channels-last --loader $LOADER --workers 2 --eval-every 10 --print-freq 23 $EXTRA --output-dir $R/$name \
        > $R/$name.log 2>&1 &
    PID[$name]=$!
done; done
(nvidia-smi dmon -s um -d 10 > $R/dmon.txt 2>&1 &)
# projected end of a run (seconds from start): now + (total - iter) / rate over its last two progress lines
project() {
    python3 - "$R" "$start" <<'PY'
import glob, os, re, sys, time
folder, start = sys.argv[1], float(sys.argv[2])
worst = 0
for log in glob.glob(folder + "/*.log"):
    lines = [l for l in open(log) if re.match(r"epoch \d+ iter \d+/\d+", l)]
    if len(lines) < 3:
        worst = max(worst, 0); continue
    (i1, total), mtime = map(int, re.search(r"iter (\d+)/(\d+)", lines[-1]).groups()), os.path.getmtime(log)
    rate = float(re.search(r"([\d.]+) img/s", lines[-1]).group(1)) / 64  # steps/s of the last window
    if i1 < total:
        worst = max(worst, time.time() - start + (total - i1) / rate)
print(int(worst))
PY
}
for seed in 2 1; do
    while :; do
        sleep 20
        alive=$(for p in ${PID[@]}; do kill -0 $p 2>/dev/null && echo $p; done | wc -l)
        [ "$alive" -eq 0 ] && break 2
        end=$(project); echo "$(( $(date +%s) - start )) s: $alive running, slowest ends at ~$end s" >> $R/watch.txt
        [ "$end" -gt 0 ] && [ $(( $(date +%s) - start )) -ge 60 ] && break
    done
    if [ "$end" -gt "$DEADLINE" ]; then
        echo "$(( $(date +%s) - start )) s: projected $end s > $DEADLINE s: stopping seed $seed" | tee -a $R/watch.txt
        for loss in ce joint; do kill -TERM ${PID[lfw20-resnet34-224px-$loss-seed$seed]} 2>/dev/null; done
        sleep 25
    else
        break
    fi
done
while [ $(( $(date +%s) - start )) -lt $(( DEADLINE + 90 )) ]; do  # the last runs finish (or are cut off)
    alive=$(for p in ${PID[@]}; do kill -0 $p 2>/dev/null && echo $p; done | wc -l)
    [ "$alive" -eq 0 ] && break
    sleep 10; echo "$(( $(date +%s) - start )) s: $alive running, ends ~$(project) s" >> $R/watch.txt
done
cat $R/watch.txt; for f in $R/*.log; do echo "== $f"; grep -E "^final|error|Traceback" $f; tail -1 $f; done
cd $R && tar czf "$OUT/lfw.tgz" --exclude='*.pth' --exclude='*.pth.tmp' . && ls -la "$OUT"
