"""Table of gap runs: last evaluation (and its many / medium-shot top-1 on long-tailed data),
train CE of the last epoch, mean img/s of the log's progress windows; then mean +- sample std
over seeds per variant, and the paired differences (same seed, so same initialisation and batch
order) of each variant against base-bf16, and of shifted2-bf16 (a third JPEG round) against
shifted-bf16 (the second), of X-resized against X-pad (the hybrids' crop), of X-shifted against X
(one more JPEG round for the hybrids) and of X-ceinstance against X (their CE batch shuffled), with
their mean +- std and standard error. Run folders are named VARIANT-itN-seedS (N iterations) or
VARIANT-epN-seedS (N epochs).

    python results/resnet32-cifar10-wu/seed001-gap/report.py > results/resnet32-cifar10-wu/seed001-gap/report.txt
    python results/resnet32-cifar10-wu/seed001-gap/report.py results/hybrid-cifar10lt-full/gap   # LDAM CE's
    python results/resnet32-cifar10-wu/seed001-gap/report.py results/hybrid-cifar10lt-full/cuts  # the hybrids' crop, JPEG, sampler
"""
import glob
import json
import os
import re
import statistics
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def main(where=HERE):
    rows = {}  # variant-itN / variant-epN -> {seed: last test top-1}
    for folder in sorted(glob.glob(os.path.join(where, "*-seed*/"))):
        name = os.path.basename(folder.rstrip("/"))
        variant, seed = name.rsplit("-seed", 1)
        unit = "iteration" if re.search(r"-it\d+$", variant) else "epoch"
        total = int(re.search(r"\d+$", variant).group())
        path = os.path.join(folder, "metrics.jsonl")
        metrics = [json.loads(line) for line in open(path)] if os.path.exists(path) else []
        evals = [m for m in metrics if m.get("test_top1") is not None]
        done = (metrics[-1][unit] + (unit == "epoch")) if metrics else 0  # epochs counted from 0
        if done < total:
            print(f"{name}: unfinished ({done} / {total} {unit}s)")
            continue
        rates = [float(r) for r in re.findall(r"([\d.]+) img/s", open(folder.rstrip("/") + ".log").read())]
        rows.setdefault(variant, {})[int(seed)] = evals[-1]["test_top1"]
        long_tailed = evals[-1].get("test_medium_top1") is not None  # balanced sets: every class "many"
        shots = "".join(f", {g} {evals[-1][f'test_{g}_top1']:.2f}" for g in ("many", "medium") if long_tailed)
        print(f"{name}: test top-1 {evals[-1]['test_top1']:.2f}{shots} at iteration {evals[-1]['iteration']} "
              f"({'evaluations' if len(evals) <= 15 else 'last 10 evaluations'}: "
              f"{', '.join('%.2f' % m['test_top1'] for m in (evals if len(evals) <= 15 else evals[-10:]))}); "
              f"train CE last epoch {metrics[-1]['train_ce']:.4f}"
              + (f", contrastive term {metrics[-1]['train_con']:.4f}" if "train_con" in metrics[-1] else "")
              + f"; {statistics.mean(rates):.0f} img/s")
    for variant, by_seed in rows.items():
        values = list(by_seed.values())
        spread = f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else ""
        print(f"{variant}: {len(values)} seed(s), last test top-1 {statistics.mean(values):.2f}{spread}")
    pairs = [(variant, "base-bf16-" + variant.rsplit("-", 1)[1]) for variant in rows]
    pairs += [(variant, variant.replace("shifted2-", "shifted-")) for variant in rows if variant.startswith("shifted2-")]
    pairs += [(variant, variant.replace("-resized-", "-pad-")) for variant in rows if "-resized-" in variant]
    pairs += [(variant, variant.replace(mark, "-")) for mark in ("-shifted-", "-ceinstance-") for variant in rows
              if mark in variant]
    for variant, reference_name in pairs:
        by_seed, reference = rows[variant], rows.get(reference_name, {})
        seeds = sorted(set(by_seed) & set(reference))
        if variant == reference_name or not seeds:
            continue
        diffs = [by_seed[s] - reference[s] for s in seeds]
        line = f"{variant} minus {reference_name}, seeds {seeds}: " + ", ".join("%+.2f" % d for d in diffs)
        if len(diffs) > 1:
            sd = statistics.stdev(diffs)
            line += f"; mean {statistics.mean(diffs):+.2f} ± {sd:.2f} (standard error {sd / len(diffs) ** 0.5:.2f})"
        print(line)


if __name__ == "__main__":
    main(*sys.argv[1:])
