"""CPU measurements of the training hot path, before and after the change:

1. host reads (Tensor.item / tolist / __bool__ / __float__ / __int__ / __index__: on
   a GPU each one waits for the device) per training iteration, for CE, joint,
   hybrid-SC and MKSMT;
2. img/s of the seed-001 training step (ResNet-32 pre-activation, option B, batch
   128, tensor loader) on this CPU, before and after, interleaved so that the
   ratio is taken within one run;
3. evaluation img/s on the 10k test set: DataLoader + PIL transform vs the
   tensor-resident path (after only), with the model and for the loader alone.

    python results/benchmark-cpu/measure_hotpath.py --before /path/to/old/checkout --npz cifar10_subset.npz

``--before`` is a checkout of the commit before the change (c41e594); each
measurement runs in a subprocess with that checkout (or this one) first on
sys.path. Prints one JSON object (also written to --out).
"""
import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository root

COUNT_READS = r'''
import contextlib, os, sys, tempfile, numpy as np, torch
sys.path.insert(0, sys.argv[1])
import train
READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")
counter = {"n": 0}
def counted(original):
    def wrapper(self, *a, **k):
        counter["n"] += 1
        return original(self, *a, **k)
    return wrapper
original_epoch = train.train_one_epoch
def counting(*a, **k):
    saved = {n: getattr(torch.Tensor, n) for n in READS}
    for n, f in saved.items():
        setattr(torch.Tensor, n, counted(f))
    try:
        return original_epoch(*a, **k)
    finally:
        for n, f in saved.items():
            setattr(torch.Tensor, n, f)
train.train_one_epoch = counting
d = tempfile.mkdtemp()
rng = np.random.default_rng(0)
np.savez(os.path.join(d, "t.npz"), x_train=rng.integers(0, 256, (256, 32, 32, 3), dtype=np.uint8),
         y_train=np.arange(256) % 4, x_test=rng.integers(0, 256, (8, 32, 32, 3), dtype=np.uint8),
         y_test=np.arange(8) % 4)
result = {}
for name, extra in (("ce", []), ("joint", ["--loss", "joint"]), ("hybrid-sc", ["--loss", "hybrid-sc"]),
                    ("mksmt", ["--loss", "mksmt", "--head-width", "8"])):
    counts = []
    for iters in (8, 24):  # one print window each: the difference is the per-step reads
        counter["n"] = 0
        train.main(train.parse_args(["--dataset", "npz", "--data-path", os.path.join(d, "t.npz"),
                                     "--model", "resnet20", "--batch-size", "8", "--iters", str(iters),
                                     "--print-freq", str(iters), "--device", "cpu", "--workers", "0",
                                     "--output-dir", os.path.join(d, name + str(iters)), *extra]))
        counts.append(counter["n"])
    result[name] = {"reads_8_iters": counts[0], "reads_24_iters": counts[1],
                    "reads_per_iteration": (counts[1] - counts[0]) / 16}
print("RESULT " + __import__("json").dumps(result))
'''


def run(code, repo, *args):
    out = subprocess.run([sys.executable, "-c", code, repo, *args], capture_output=True, text=True,
                         cwd=repo, timeout=1800)
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
    if out.returncode != 0 or not line:
        raise SystemExit(f"error: measurement failed in {repo}: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(line[-1][7:])


STEP_SPEED = r'''
import os, re, sys, io, contextlib, numpy as np
sys.path.insert(0, sys.argv[1])
import train
npz, folder = sys.argv[2], sys.argv[3]
buffer = io.StringIO()
with contextlib.redirect_stdout(buffer):
    train.main(train.parse_args(["--recipe", "seed001-cifar10", "--dataset", "npz", "--data-path", npz,
                                 "--iters", "40", "--print-freq", "10", "--device", "cpu", "--workers", "0",
                                 "--output-dir", folder]))
speeds = [float(m) for m in re.findall(r"([0-9.]+) img/s", buffer.getvalue())]
print("RESULT " + __import__("json").dumps(speeds[1:]))  # the first window warms up
'''

EVAL_SPEED = r'''
import sys, time, torch
sys.path.insert(0, sys.argv[1])
import data, models, train
train_set, test_set, classes = data.build_datasets("npz", sys.argv[2])
model = models.build_model("resnet32", classes).eval()
result = {}
for name, normalize in (("dataloader_2_workers", None), ("tensor", "cifar")):
    # train.py's loaders moved to utils.py in the redesign; this script also runs the older checkout
    make_test_loader = getattr(train, "make_test_loader", None) or __import__("utils").make_test_loader
    loader = make_test_loader(test_set, 256, 2, torch.device("cpu"), normalize=normalize)
    train.evaluate(model, [next(iter(loader))], torch.device("cpu"), classes)  # warm-up
    start = time.time()
    out = train.evaluate(model, loader, torch.device("cpu"), classes)
    seconds = time.time() - start
    start = time.time()
    n = sum(len(labels) for _, labels in loader)    # the loader alone: batches ready to forward
    result[name] = {"img_per_s": round(out["n"] / seconds, 1), "top1": out["top1"],
                    "loader_only_img_per_s": round(n / (time.time() - start), 1)}
print("RESULT " + __import__("json").dumps(result))
'''


def small_test_npz(npz, folder):
    """The npz with its test set cut to 64 images: the step timing then skips a long evaluation."""
    import numpy as np
    arrays = dict(np.load(npz))
    arrays["x_test"], arrays["y_test"] = arrays["x_test"][:64], arrays["y_test"][:64]
    path = os.path.join(folder, "small_test.npz")
    np.savez(path, **arrays)
    return path


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--before", required=True, help="checkout of the commit before the change")
    p.add_argument("--after", default=HERE)
    p.add_argument("--npz", required=True, help="the 10k CIFAR-10 subset (README: Data)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=os.path.join(HERE, "results", "benchmark-cpu", "hotpath-cpu.json"))
    args = p.parse_args()
    result = {"host_reads": {}, "seed001_step_img_per_s": {"before": [], "after": []}}
    for side in ("before", "after"):
        result["host_reads"][side] = run(COUNT_READS, getattr(args, side))
        print(side, "host reads:", result["host_reads"][side], flush=True)
    with tempfile.TemporaryDirectory() as folder:
        npz = small_test_npz(args.npz, folder)
        for k in range(args.repeats):  # interleaved: the ratio is what counts, not the absolute speed
            for side in ("before", "after"):
                speeds = run(STEP_SPEED, getattr(args, side), npz, os.path.join(folder, f"{side}{k}"))
                result["seed001_step_img_per_s"][side] += speeds
                print(side, "seed001 step img/s:", speeds, flush=True)
    mean = {s: sum(v) / len(v) for s, v in result["seed001_step_img_per_s"].items()}
    result["seed001_step_after_over_before"] = round(mean["after"] / mean["before"], 3)
    result["evaluation_10k_test"] = run(EVAL_SPEED, args.after, args.npz)
    result["threads"] = int(os.environ.get("OMP_NUM_THREADS", 0)) or None
    print(json.dumps(result, indent=1))
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
