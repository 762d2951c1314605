#!/usr/bin/env bash
# SIGTERM to torchrun itself (not only to the workers, as test_all.py does): do both ranks stop at
# the same step, does rank 0 save, and does the same command plus --resume auto end bit-identical
# to an uninterrupted run? Tiny data (random 32x32 images), resnet20 with an auxiliary head (dropout:
# each rank's RNG state must come back), hybrid-sc, gloo on CPU.
# Usage (from the repository root): bash results/torchrun-sigterm/run.sh
set -u
cd "$(dirname "$0")/../.."
out=$(mktemp -d)
python - "$out/t.npz" <<'PY'
import sys, numpy as np
rng = np.random.default_rng(0)
np.savez(sys.argv[1], x_train=rng.integers(0, 256, (512, 32, 32, 3), dtype=np.uint8), y_train=np.arange(512) % 8,
         x_test=rng.integers(0, 256, (64, 32, 32, 3), dtype=np.uint8), y_test=np.arange(64) % 8)
PY
run() {  # run <folder> [extra flags]
  OMP_NUM_THREADS=1 exec python -m torch.distributed.run --nproc_per_node 2 --master_port $((29000 + RANDOM % 900)) \
    train.py --dataset npz --data-path "$out/t.npz" --model resnet20 --deep-sup 1 --loss hybrid-sc --recipe none --workers 0 \
    --batch-size 16 --iters 60 --lr 0.05 --milestones --print-freq 4 --output-dir "$out/$1" "${@:2}"
}
echo "== uninterrupted"; (run whole) 2>&1 | grep -E "^(final|error)"
echo "== SIGTERM to torchrun once iteration 8 has been printed"
run cut > "$out/cut.log" 2>&1 &   # run execs torchrun: $! is torchrun's pid
pid=$!
until grep -q "iter 8/60" "$out/cut.log" 2>/dev/null; do sleep 0.2; done
kill -TERM $pid
wait $pid; echo "torchrun exit code $?"
grep -E "^(signal|error: stopped)|closing signal" "$out/cut.log" | cut -c1-160
python -c "import torch; print('checkpoint at iteration', torch.load('$out/cut/checkpoint.pth', weights_only=True)['iteration'])"
echo "== the same command plus --resume auto"; (run cut --resume auto) 2>&1 | grep -E "^(resumed|final|error)"
python - "$out" <<'PY'
import sys, torch
a, b = (torch.load(f"{sys.argv[1]}/{n}/checkpoint.pth", weights_only=True) for n in ("whole", "cut"))
same = all(torch.equal(a[p][k], b[p][k]) for p in ("model", "criterion") for k in a[p])
print("resumed run equals the uninterrupted one, bit for bit:", same, "(iteration", b["iteration"], ")")
PY
rm -rf "$out"
