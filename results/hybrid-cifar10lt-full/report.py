"""Wang et al.'s beta-100 CIFAR-10-LT runs at the paper's scale: table and plot.

    python results/hybrid-cifar10lt-full/report.py

For every run folder here (ldam-ce-seedN; hybrid-sc-seedN, hybrid-psc-seedN: one forward pass
shared by the two streams, as train.py did before 8a73f6f; hybrid-sc-twopass-seedN, ...: one pass
per branch, as it does since; all started by results/run_long.sh): epochs done of 200, the last evaluation's test top-1 and its many /
medium / few top-1 (the paper's thresholds: > 100, 20-100, < 20 training images), the best
evaluation and its epoch (chosen on test, as LDAM-DRW's code reports; not our number), and,
once a method has finished seeds, their mean +- std (sample std). With matplotlib,
curves.png: test top-1 per epoch of every run, the paper's numbers as dashed lines.
A run that has not reached its last epoch is marked "in progress": its number is not a result.
"""
import glob
import json
import math
import os

HERE = os.path.dirname(os.path.abspath(__file__))
METHODS = {  # folder prefix: label, the paper's test top-1 (Wang et al. 2021, CIFAR-10-LT, beta 100), colour
    "ldam-ce": ("CE (LDAM-DRW's code)", 70.36, "tab:gray"),
    "hybrid-sc": ("Hybrid-SC, shared pass", 81.40, "tab:blue"),
    "hybrid-psc": ("Hybrid-PSC, shared pass", 78.82, "tab:orange"),
    "hybrid-sc-twopass": ("Hybrid-SC, pass per branch", 81.40, "tab:green"),
    "hybrid-psc-twopass": ("Hybrid-PSC, pass per branch", 78.82, "tab:red")}
EPOCHS = 200


def runs():
    """{method: [(seed, rows of metrics.jsonl)]} for the run folders present."""
    found = {}
    for method in METHODS:
        for folder in sorted(glob.glob(os.path.join(HERE, f"{method}-seed*"))):
            path = os.path.join(folder, "metrics.jsonl")
            if os.path.isdir(folder) and os.path.exists(path):
                rows = [json.loads(line) for line in open(path) if line.strip()]
                if rows:
                    found.setdefault(method, []).append((int(folder.rsplit("seed", 1)[1]), rows))
    return found


def in_progress(rows):
    """The mark of a run short of its last epoch (its number is not a result): " (in progress)", else ""."""
    return "" if rows[-1]["epoch"] + 1 >= EPOCHS else " (in progress)"


def fmt(value):
    return "-" if value is None else f"{value:.2f}"


def main():
    table = runs()
    print("| method | seed | epochs done | last test top-1 (%) | many | medium | few | best evaluation (epoch) | paper |")
    print("|---|---|---|---|---|---|---|---|---|")
    for method, seeds in table.items():
        label, paper, _ = METHODS[method]
        for seed, rows in seeds:
            last = rows[-1]
            done = last["epoch"] + 1
            best = max(rows, key=lambda r: r["test_top1"])  # chosen on test: LDAM-DRW's protocol, not ours
            print(f"| {label} | {seed} | {done} / {EPOCHS}{in_progress(rows)} | {fmt(last['test_top1'])} | "
                  f"{fmt(last.get('test_many_top1'))} | {fmt(last.get('test_medium_top1'))} | "
                  f"{fmt(last.get('test_few_top1'))} | {fmt(best['test_top1'])} ({best['epoch'] + 1}) | {paper:.2f} |")
        finished = [rows[-1]["test_top1"] for _, rows in seeds if not in_progress(rows)]
        if len(finished) > 1:
            mean = sum(finished) / len(finished)
            std = math.sqrt(sum((v - mean) ** 2 for v in finished) / (len(finished) - 1))
            print(f"| {label}, {len(finished)} seeds | | | **{mean:.2f} ± {std:.2f}** | | | | | {paper:.2f} |")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("(matplotlib not installed: no curves.png)")
        return
    fig, ax = plt.subplots(figsize=(7, 4.5))
    drawn = set()
    for method, seeds in table.items():
        label, paper, colour = METHODS[method]
        for seed, rows in seeds:
            ax.plot([r["epoch"] + 1 for r in rows], [r["test_top1"] for r in rows], color=colour, lw=1,
                    label=f"{label}, seed {seed}{in_progress(rows)}")
        if paper not in drawn:  # the paper's line once per method
            drawn.add(paper)
            ax.axhline(paper, color=colour, ls="--", lw=1, label=f"{label.split(',')[0]}, paper: {paper}")
    ax.set(xlabel="epoch", ylabel="test top-1 (%)", xlim=(0, EPOCHS), ylim=(0, 100),
           title="CIFAR-10-LT, beta 100, ResNet-32 (JPEG-derived copy)")
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(os.path.join(HERE, "curves.png"), dpi=120)
    print("wrote curves.png (beside this script)")


if __name__ == "__main__":
    main()
