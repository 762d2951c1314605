#!/usr/bin/env bash
# First GPU job (about 3 minutes): the machine, the test suite, the training-step benchmark
# against a hand-written loop, and Tong's LFW-20 recipe for 4 epochs on CUDA (it runs; s/epoch).
# Run from the repository root with the LFW top-20 folder at .devdata/lfw_top20 (carried there:
# ../shared does not travel):   bash results/gpu-h200/check.sh     # writes under $OUT (default /tmp/out)
OUT=${OUT:-/tmp/out}; mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
PY=python3
{ date -u; nvidia-smi; nproc; free -g
  $PY -c "import torch, torchvision, numpy; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'cudnn', torch.backends.cudnn.version(), 'torchvision', torchvision.__version__, 'numpy', numpy.__version__, torch.cuda.get_device_name(0))"
} > "$OUT/machine.txt" 2>&1
tail -1 "$OUT/machine.txt"

# The whole suite on 5 cores of its own, beside the rest (its tests pin --device cpu except the
# benchmark's, which time CUDA cells here: fp16 + GradScaler, CUDA-graph compile modes).
(OMP_NUM_THREADS=4 taskset -c 11-15 timeout 250 $PY test_all.py > "$OUT/tests.log" 2>&1; echo "exit $?" >> "$OUT/tests.log") &
TESTS=$!

bench() {  # the project's step (torch and tensor loaders) against the hand-written loop, fp32 / bf16, NCHW / NHWC
    taskset -c 0-10 timeout 200 $PY benchmark.py --workers 6 --loaders torch,tensor,plain --amp none,bf16 \
        --channels-last off,on "$@"
}
bench --models resnet32 --batch-size 128 --out "$OUT/bench-resnet32" > "$OUT/bench-resnet32.log" 2>&1
bench --models resnet34 --batch-size 64 --image-size 224 --no-losses --out "$OUT/bench-resnet34" > "$OUT/bench-resnet34.log" 2>&1
# torch.compile where it is likeliest to pay (a small model, launch-bound): ResNet-32's fastest eager cell
start=$(date +%s)
taskset -c 0-10 timeout 150 $PY benchmark.py --models resnet32 --batch-size 128 --loaders tensor --amp bf16 \
    --channels-last on --compile none,default --no-losses --out "$OUT/bench-resnet32-compile" \
    > "$OUT/bench-resnet32-compile.log" 2>&1
echo "took $(( $(date +%s) - start )) s (two builds, one compile, timing)" >> "$OUT/bench-resnet32-compile.log"
tail -15 "$OUT/bench-resnet32.log"; tail -14 "$OUT/bench-resnet34.log"; tail -5 "$OUT/bench-resnet32-compile.log"

# Tong's LFW-20 recipe on the real data, 4 epochs each evaluated, alone on the GPU.
T=/dev/shm/timing; rm -rf $T; mkdir -p $T
OMP_NUM_THREADS=1 taskset -c 0-10 $PY train.py --recipe lfw-joint --loss joint --seed 0 --data-path .devdata/lfw_top20 \
    --amp bf16 --channels-last --loader tensor --epochs 4 --workers 4 --print-freq 10 --output-dir $T/lfw-joint \
    > "$OUT/lfw_timing.log" 2>&1
$PY -c "
import json; rows = [json.loads(l) for l in open('$T/lfw-joint/metrics.jsonl')]
s = [r['seconds'] for r in rows]; print('lfw-joint alone, seconds at each epoch end', s, 'steady s/epoch', round((s[-1] - s[1]) / (len(s) - 2), 2))
" | tee -a "$OUT/lfw_timing.log"
cp $T/lfw-joint/config.json "$OUT/lfw_timing_config.json"
wait $TESTS; tail -2 "$OUT/tests.log"; grep "^FAIL" "$OUT/tests.log"
cd "$OUT" && tar czf bench.tgz bench-* && rm -rf bench-* && ls
