"""Mean +- std (sample std, n-1) of the LAST evaluation of each run in results/.

    python results/summarize.py            # prints the markdown table used in README.md

A run is a folder results/<setting>-seed<N>/ holding metrics.jsonl.
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


def main():
    groups = {}
    for path in sorted(glob.glob(os.path.join(HERE, "*-seed*", "metrics.jsonl"))):
        run_dir = os.path.dirname(path)
        setting = re.sub(r"-seed\d+$", "", os.path.basename(run_dir))
        groups.setdefault(setting, []).append(last_row(run_dir))
    print("| setting | seeds | epochs | test top-1 (%) | test top-5 (%) | balanced top-1 (%) |")
    print("|---|---|---|---|---|---|")
    for setting, rows in groups.items():
        cells = []
        for key in ("test_top1", "test_top5", "test_balanced_top1"):
            values = [r[key] for r in rows]
            std = statistics.stdev(values) if len(values) > 1 else float("nan")
            cells.append(f"{statistics.mean(values):.2f} ± {std:.2f}")
        print(f"| {setting} | {len(rows)} | {rows[0]['epoch'] + 1} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
