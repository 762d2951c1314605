"""Golden short runs of every objective, to check that a refactor keeps behaviour.

    python results/refactor-golden/golden.py REPO OUT.json   # run REPO's train.py / evaluate.py
    python results/refactor-golden/golden.py --compare A.json B.json

Each run trains a few iterations on a small real slice of the CIFAR-10 subset (fp32 and
one bf16 run), then records its printed lines (timings removed), metrics.jsonl (seconds
removed) and a sha256 of every tensor of its checkpoint (model, loss parameters,
optimizer state). Two code versions agree when every record is equal, bit for bit.
"""
import hashlib
import json
import os
import re
import subprocess
import sys
import tempfile

import numpy as np

COMMON = ["--dataset", "npz", "--epochs", "2", "--batch-size", "8", "--workers", "0", "--print-freq", "1",
          "--seed", "0", "--recipe", "none", "--model", "resnet20", "--milestones", "1", "--lr", "0.05"]
# center-*: "--ctc-reduction sum", the default for --loss center until it became mean (Wen's lambda
# weighs like-reduced terms): the flag keeps these runs comparable with the older records
RUNS = {
    "ce": [],
    "ce-class-balanced": ["--sampler", "class-balanced"],
    "ce-torch-loader": ["--loader", "torch"],
    "ce-bf16-channels-last": ["--amp", "bf16", "--channels-last"],
    "ce-val-split": ["--val-split", "0.25", "--warmup-iters", "3", "--warmup-lr", "0.01"],
    "center-wen": ["--loss", "center", "--ctc-reduction", "sum"],
    "center-autograd": ["--loss", "center", "--center-update", "autograd", "--lambda", "0.01", "--ctc-reduction", "sum"],
    "joint": ["--loss", "joint"],
    "joint-mean-scheduled": ["--loss", "joint", "--ctc-reduction", "mean", "--center-lr-schedule",
                             "--center-momentum", "0.5"],
    "hybrid-sc": ["--loss", "hybrid-sc"],
    "hybrid-sc-torch-loader": ["--loss", "hybrid-sc", "--loader", "torch", "--alpha-schedule", "linear"],
    "hybrid-psc": ["--loss", "hybrid-psc", "--tau", "1"],
    "hybrid-mpsc": ["--loss", "hybrid-mpsc", "--prototype-weights", "softmax"],
    "mksmt-two-step": ["--loss", "mksmt"],
    "mksmt-one-step": ["--loss", "mksmt", "--multistep", "1"],
    "mksmt-three-step": ["--loss", "mksmt", "--multistep", "3"],
    "mksmt-async": ["--loss", "mksmt", "--kd-exec", "async"],
    "mksmt-feature-kd": ["--loss", "mksmt", "--kd", "feature"],
    "mksmt-no-kd": ["--loss", "mksmt", "--kd", "none"],
    "mksmt-t4": ["--loss", "mksmt", "--temperature", "4", "--kd-no-t2"],
    "deep-sup": ["--model", "plain20", "--deep-sup", "1"],
    "deep-sup-step": ["--model", "resnet20", "--deep-sup", "0,1", "--aux-decay", "step"],
    "probe": ["--model", "plain20", "--probe-gradients", "3"],
}


def tiny_npz(path, shared):
    """12 train / 4 test images per class of the CIFAR-10 subset (grouped by class)."""
    d = np.load(shared)
    tr = np.concatenate([np.arange(c * 1000, c * 1000 + 12) for c in range(10)])
    te = np.concatenate([np.arange(c * 1000, c * 1000 + 4) for c in range(10)])
    np.savez(path, x_train=d["x_train"][tr], y_train=d["y_train"][tr], x_test=d["x_test"][te], y_test=d["y_test"][te])


def tensor_hashes(obj, prefix=""):
    import torch
    out = {}
    if torch.is_tensor(obj):
        out[prefix] = hashlib.sha256(obj.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes()).hexdigest()[:16] \
            if obj.numel() else "empty"
    elif isinstance(obj, dict):
        for k, v in obj.items():
            out.update(tensor_hashes(v, f"{prefix}.{k}" if prefix else str(k)))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            out.update(tensor_hashes(v, f"{prefix}[{i}]"))
    return out


def record(repo, out_dir, name, extra, npz):
    import torch
    cmd = [sys.executable, os.path.join(repo, "train.py"), *COMMON, "--data-path", npz, "--output-dir", out_dir, *extra]
    p = subprocess.run(cmd, capture_output=True, text=True, cwd=repo, env={**os.environ, "OMP_NUM_THREADS": "1"})
    lines = [re.sub(r" [\d.]+ img/s eta \S+", "", l) for l in p.stdout.splitlines()
             if not l.startswith("config:")]  # the config line names the temporary folder
    rec = {"rc": p.returncode, "stdout": lines, "stderr": p.stderr.strip().splitlines()[-3:]}
    metrics = os.path.join(out_dir, "metrics.jsonl")
    if os.path.exists(metrics):
        rec["metrics"] = [{k: v for k, v in json.loads(l).items() if k != "seconds"} for l in open(metrics)]
    ckpt = os.path.join(out_dir, "checkpoint.pth")
    if os.path.exists(ckpt):
        c = torch.load(ckpt, weights_only=True)
        rec["state"] = tensor_hashes({k: c.get(k) for k in ("model", "criterion", "optimizer")})
        rec["iteration"] = c["iteration"]
        ev = subprocess.run([sys.executable, os.path.join(repo, "evaluate.py"), "--checkpoint", ckpt, "--data-path", npz,
                             "--json"], capture_output=True, text=True, cwd=repo)
        rec["evaluate"] = ev.stdout.strip().splitlines()[-40:]
    probe = os.path.join(out_dir, "gradient_probe.csv")
    if os.path.exists(probe):
        rec["probe"] = hashlib.sha256(open(probe, "rb").read()).hexdigest()[:16]
    return rec


def main():
    if sys.argv[1] == "--compare":
        # the runs' temporary folder differs from run to run
        a, b = (json.loads(re.sub(r"/tmp/tmp\w+", "<tmp>", open(p).read())) for p in sys.argv[2:4])
        a = {n: a[n] for n in b}  # the runs recorded in both
        bad = [n for n in a if a[n] != b.get(n)]
        for n in bad:
            for k in a[n]:
                if a[n][k] != b[n].get(k):
                    print(f"{n}: {k} differs\n  {str(a[n][k])[:600]}\n  {str(b[n].get(k))[:600]}")
        print(f"{len(a) - len(bad)}/{len(a)} runs equal" + (f"; differ: {', '.join(bad)}" if bad else ""))
        return 1 if bad else 0
    repo, out = os.path.abspath(sys.argv[1]), sys.argv[2]
    only = sys.argv[3:] or list(RUNS)
    shared = os.environ.get("CIFAR10_SUBSET") or os.path.join(  # our data folder beside the repository by default
        os.path.dirname(os.path.abspath(__file__)), "..", "..", "..", "shared", "data", "cifar10_subset.npz")
    with tempfile.TemporaryDirectory() as tmp:
        npz = os.path.join(tmp, "tiny.npz")
        tiny_npz(npz, shared)
        result = {name: record(repo, os.path.join(tmp, name), name, RUNS[name], npz) for name in only}
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}: " + ", ".join(f"{n} rc {r['rc']}" for n, r in result.items()))


if __name__ == "__main__":
    sys.exit(main())
