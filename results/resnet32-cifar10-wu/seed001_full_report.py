"""Where the full-scale runs of Wu's recipe (--recipe seed001-cifar10) stand (results/resnet32-cifar10-wu/seed001-cifar10full-resnet32-seed<N>/),
in markdown for results/README.md, from the files the runs write and nothing else:

    python results/resnet32-cifar10-wu/seed001_full_report.py            # tables; with matplotlib also the plot

1. One row per seed: iterations done of the recipe's, the last evaluation (epochs done,
   counted from 1, where metrics.jsonl's "epoch" counts from 0; test top-1, epoch-mean
   train CE, lr), training time (the run's own clock in the checkpoint,
   summed over its segments), segments and the mean of their img/s (the log's
   "== segment" lines, written by results/run_long.sh, and before it by
   run_seed001_full.sh, now deleted). Once two or more seeds have
   finished: mean +- sample std of the last evaluation.
2. Every evaluation so far, one column per evaluation (epochs done).
3. With matplotlib: seed001_full_curves.png (test top-1 and train CE against iterations).
"""
import glob
import json
import os
import re
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))
PATTERN = os.path.join(HERE, "seed001-cifar10full-resnet32-seed*")


def read_run(run_dir):
    """(seed, config, evaluation rows, segments) of one run folder and its log."""
    seed = int(run_dir.rsplit("seed", 1)[1])
    with open(os.path.join(run_dir, "config.json")) as f:
        config = json.load(f)
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    segments = []  # [(start, end or None, mean img/s or None)]
    with open(run_dir + ".log") as f:
        for line in f:
            if line.startswith("== segment start"):
                segments.append([line.split()[3], None, None])
            elif line.startswith("== segment end") and segments:
                rate = re.search(r"windows ([0-9.]+)", line)
                segments[-1][1:] = [line.split()[3], float(rate.group(1)) if rate else None]
    return seed, config, rows, segments


def checkpoint_progress(run_dir):
    """(iterations done, seconds of training) from the checkpoint (torch only for this)."""
    import torch
    path = os.path.join(run_dir, "checkpoint.pth")
    if not os.path.exists(path):
        return 0, 0.0
    progress = torch.load(path, weights_only=True, map_location="cpu")["progress"]
    return progress["iteration"], progress["seconds"]


def main():
    runs = [(read_run(d), checkpoint_progress(d)) for d in sorted(glob.glob(PATTERN)) if os.path.isdir(d)]
    if not runs:
        print(f"no run folders matching {PATTERN}")
        return 1
    print("| seed | iterations | last evaluation: after epoch | test top-1 (%) | train CE | lr | training time "
          "| segments | mean img/s of the ended segments |")
    print("|---|---|---|---|---|---|---|---|---|")
    finals = []
    for (seed, config, rows, segments), (done, seconds) in runs:
        last = rows[-1] if rows else {}
        rates = [r for _, _, r in segments if r is not None]
        minutes = round(seconds / 60)
        running = " (one running)" if segments and segments[-1][1] is None else ""
        rate = f"{statistics.mean(rates):.1f}" if rates else "-"
        finished = done >= config["iters"]
        if finished:
            finals.append(last["test_top1"])
        print(f"| {seed} | {done:,} / {config['iters']:,}{' (done)' if finished else ''} | {last['epoch'] + 1 if rows else '-'} "
              f"| {last.get('test_top1', '-')} | {last.get('train_loss', float('nan')):.4f} | {format(last['lr'], '.4g') if 'lr' in last else '-'} "
              f"| {minutes // 60} h {minutes % 60} min | {len(segments)}{running} | {rate} |")
    if len(finals) >= 2:
        print(f"\nlast evaluation over {len(finals)} finished seeds: {statistics.mean(finals):.2f} "
              f"+- {statistics.stdev(finals):.2f} (sample std)")
    epochs = sorted({r["epoch"] for (_, _, rows, _), _ in runs for r in rows})
    print("\n| after epoch | " + " | ".join(str(e + 1) for e in epochs) + " |")
    print("|---|" + "---|" * len(epochs))
    for (seed, _, rows, _), _ in runs:
        by_epoch = {r["epoch"]: r for r in rows}
        for key, name, fmt in (("test_top1", "test top-1 (%)", "{:.2f}"), ("train_loss", "train CE (epoch mean)", "{:.3f}")):
            cells = [fmt.format(by_epoch[e][key]) if e in by_epoch else "-" for e in epochs]
            print(f"| seed {seed}, {name} | " + " | ".join(cells) + " |")
    plot(runs)
    return 0


def plot(runs):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("\n(matplotlib not installed: no plot)")
        return
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(7, 6), sharex=True)
    for (seed, _, rows, _), _ in runs:
        its = [r["iteration"] for r in rows]
        top.plot(its, [r["test_top1"] for r in rows], marker=".", label=f"seed {seed}")
        bottom.plot(its, [r["train_loss"] for r in rows], marker=".", label=f"seed {seed}")
    top.axhline(91.1, color="gray", linestyle="--", linewidth=1, label="Wu: 91.1")
    top.axhline(92.49, color="gray", linestyle=":", linewidth=1, label="He et al.: 92.49")
    top.set_ylabel("test top-1 (%)")
    bottom.set_ylabel("train CE (epoch mean)")
    bottom.set_yscale("log")
    bottom.set_xlabel("iteration (lr /10 at 32k, 48k, 64k)")
    bottom.set_xlim(0, max(config["iters"] for (_, config, _, _), _ in runs))
    for axis in (top, bottom):
        for milestone in (32000, 48000, 64000):
            axis.axvline(milestone, color="lightgray", linewidth=0.8)
        axis.legend(fontsize=8)
    fig.tight_layout()
    out = os.path.join(HERE, "seed001_full_curves.png")
    fig.savefig(out, dpi=120)
    print(f"\nplot: {os.path.relpath(out, os.path.dirname(os.path.dirname(HERE)))}")


if __name__ == "__main__":
    raise SystemExit(main())
