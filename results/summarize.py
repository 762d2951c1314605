"""Tables for README.md from the runs in results/.

    python results/summarize.py

1. Mean +- std (sample std, n-1) of the LAST evaluation of each training run
   (a folder results/<setting>-seed<N>/ holding metrics.jsonl); the deep-supervision
   runs (deepsup-*) get their own table with the auxiliary head's top-1.
   The hybrid runs (hybrid-*) get many / medium / few-shot columns, the MKSMT runs
   (mksmt-*) one column per head plus the flipped-test-image accuracy.
2. Gradient probes (results/probe-*/gradient_probe.csv): per stage, how many conv /
   linear layers have a mean |grad| (averaged over the probe's iterations) below
   1e-7, and the median of those means.
"""
import glob
import json
import os
import re
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))


def last_row(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()][-1]


def mean_std(values):
    std = statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{statistics.mean(values):.2f} ± {std:.2f}"


def main():
    groups = {}
    for path in sorted(glob.glob(os.path.join(HERE, "*-seed*", "metrics.jsonl"))):
        run_dir = os.path.dirname(path)
        setting = re.sub(r"-seed\d+$", "", os.path.basename(run_dir))
        groups.setdefault(setting, []).append(last_row(run_dir))
    print("| setting | seeds | epochs | test top-1 (%) | test top-5 (%) | balanced top-1 (%) |")
    print("|---|---|---|---|---|---|")
    for setting, rows in groups.items():
        if not setting.startswith(("deepsup-", "hybrid-", "mksmt-")):
            cells = [mean_std([r[k] for r in rows]) for k in ("test_top1", "test_top5", "test_balanced_top1")]
            print(f"| {setting} | {len(rows)} | {rows[0]['epoch'] + 1} | " + " | ".join(cells) + " |")
    print("\n| setting | seeds | epochs | test top-1 (%) | test top-5 (%) | aux head top-1 (%) |")
    print("|---|---|---|---|---|---|")
    for setting, rows in groups.items():
        if setting.startswith("deepsup-"):
            aux = [v for r in rows for k, v in r.items() if k.startswith("test_aux_top1")]
            cells = [mean_std([r[k] for r in rows]) for k in ("test_top1", "test_top5")]
            cells.append(mean_std(aux) if aux else "-")
            print(f"| {setting} | {len(rows)} | {rows[0]['epoch'] + 1} | " + " | ".join(cells) + " |")
    hybrid_table(groups)
    mksmt_table(groups)


def hybrid_table(groups):
    print("\n| setting | seeds | epochs | top-1 (%) | many (%) | medium (%) | few (%) |")
    print("|---|---|---|---|---|---|---|")
    for setting, rows in groups.items():
        if setting.startswith("hybrid-"):
            cells = []
            for key in ("test_top1", "test_many_top1", "test_medium_top1", "test_few_top1"):
                values = [r[key] for r in rows if key in r and r[key] == r[key]]  # NaN: an empty group
                cells.append(mean_std(values) if values else "-")
            print(f"| {setting} | {len(rows)} | {rows[0]['epoch'] + 1} | " + " | ".join(cells) + " |")


def mksmt_table(groups):
    print("\n| setting | seeds | epochs | final head top-1 (%) | stage-1 head top-1 (%) | h-flip top-1 (%) "
          "| v-flip top-1 (%) |")
    print("|---|---|---|---|---|---|---|")
    for setting, rows in groups.items():
        if setting.startswith("mksmt-"):
            cells = [mean_std([r["test_top1"] for r in rows])]
            shallow = [r["test_head_top1_stage1"] for r in rows if "test_head_top1_stage1" in r]
            cells.append(mean_std(shallow) if shallow else "-")
            for flip in ("h", "v"):
                files = sorted(glob.glob(os.path.join(HERE, f"{setting}-seed*-flip{flip}.json")))
                values = [json.load(open(f))["top1"] for f in files if os.path.getsize(f)]
                cells.append(mean_std(values) if values else "-")
            print(f"| {setting} | {len(rows)} | {rows[0]['epoch'] + 1} | " + " | ".join(cells) + " |")


def probe_table(threshold=1e-7):
    import csv
    print("\n| probe | stage | layers | layers < 1e-7 | median mean abs grad |")
    print("|---|---|---|---|---|")
    for path in sorted(glob.glob(os.path.join(HERE, "probe-*", "gradient_probe.csv"))):
        per_layer = {}
        with open(path) as f:
            for row in csv.DictReader(f):
                per_layer.setdefault((int(row["stage"]), row["layer"]), []).append(float(row["mean_abs_grad"]))
        name = os.path.basename(os.path.dirname(path))
        for stage in sorted({s for s, _ in per_layer}):
            means = [statistics.mean(v) for (s, _), v in per_layer.items() if s == stage]
            print(f"| {name} | {stage} | {len(means)} | {sum(m < threshold for m in means)} | "
                  f"{statistics.median(means):.1e} |")


if __name__ == "__main__":
    main()
    probe_table()
