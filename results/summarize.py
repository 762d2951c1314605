"""Tables for results/README.md (and the README's results table) from the study folders in results/.

    python results/summarize.py

Mean +- std is the sample std (n-1) over seeds of each run's LAST evaluation.

1. The LFW joint-supervision study (results/lfw-joint-supervision/): the lambda sweeps
   on the validation split, then CE / joint / center on the full training set (test set,
   last epoch), and the difference of means with its standard error; with matplotlib, the
   plots lfw_study_lambda.png and lfw_study_curves.png in that folder.
2. The deep-supervision study (results/deep-supervision-cifar10subset/): the lr
   sweeps on the validation split, the gradient probes per stage, and the finals
   with / without the auxiliary head (test top-1, last epoch; epochs until the
   running train top-1 first reaches 25% and 50%); with matplotlib, deepsup_study_curves.png
   in that folder.
3. The hybrid study (results/hybrid-cifar10lt-subset/): CE, CE with the
   class-balanced sampler, Hybrid-SC and Hybrid-PSC on the long-tailed CIFAR-10 subset
   at beta 100 and 10 (test, last epoch, 3 seeds): top-1 and many / medium / few at the
   scaled thresholds (metrics.jsonl) and at the paper's (evaluate.py's JSON), with the
   paper's CIFAR-10-LT numbers beside them; with matplotlib, hybrid_study_lt<beta>.png in
   that folder.
4. The MKSMT study (results/mksmt-cifar10subset/): plain, plain with twice
   the epochs (update-matched), two-step without KD, with KD T = 1 and T = 4, one-step
   (test, last epoch, 3 seeds): final-head and S3-head top-1, vertical-flip top-1.

Wu's ResNet-32 runs have their own script: results/resnet32-cifar10-wu/seed001_full_report.py.
The superseded short runs this script also tabulated until the results/ reorganisation
(10-epoch CE vs joint, 2-epoch deep supervision, plain56 probes, 6-epoch hybrid, 1-epoch
MKSMT) left the tree; they and the code that read them are at commit 0e5ddf8.
"""
import glob
import json
import os
import re
import statistics

HERE = os.path.dirname(os.path.abspath(__file__))


def read_rows(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f if line.strip()]


def last_row(run_dir):
    return read_rows(run_dir)[-1]


def difference(a, b, what="test top-1"):
    """mean(a) - mean(b) of ``what``, with the standard error of that difference."""
    diff = statistics.mean(a) - statistics.mean(b)
    se = (statistics.variance(a) / len(a) + statistics.variance(b) / len(b)) ** 0.5
    ratio = f"{abs(diff) / se:.1f}" if se > 0 else ("no spread, no difference" if diff == 0 else "inf")
    return f"{diff:+.2f} points of {what}, standard error {se:.2f} (|difference| / SE = {ratio})"


def pyplot(what):
    """matplotlib.pyplot (Agg backend), or None with a note when matplotlib is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"(matplotlib not installed: no {what})")
        return None
    return plt


def mean_std(values):
    if len(values) < 2:  # no spread from one seed; the seeds column says how many
        return f"{statistics.mean(values):.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


LFW = os.path.join(HERE, "lfw-joint-supervision")


def lfw_study_table():
    """Sweep (validation split, seed 0) and final (test, 3 seeds) tables of the LFW study."""
    sweeps = {}
    for path in sorted(glob.glob(os.path.join(LFW, "sweep-*-lam*", "metrics.jsonl"))):
        loss, lam = re.match(r"sweep-(\w+)-lam([0-9.e-]+)$", os.path.basename(os.path.dirname(path))).groups()
        row = last_row(os.path.dirname(path))
        sweeps.setdefault(loss, []).append((float(lam), row))
    print("\n| loss | lambda | epochs | val top-1 (%) | val balanced top-1 (%) |")
    print("|---|---|---|---|---|")
    for loss, runs in sweeps.items():
        best = max(runs, key=lambda r: r[1]["val_top1"])[0]
        for lam, row in sorted(runs, key=lambda r: r[0]):
            mark = " (chosen)" if lam == best else ""
            print(f"| {loss} | {lam:g}{mark} | {row['epoch'] + 1} | {row['val_top1']:.2f} | "
                  f"{row['val_balanced_top1']:.2f} |")
    finals = {}
    for path in sorted(glob.glob(os.path.join(LFW, "final-*-seed*", "metrics.jsonl"))):
        run_dir = os.path.dirname(path)
        loss = re.match(r"final-(\w+)-seed\d+$", os.path.basename(run_dir)).group(1)
        config = json.load(open(os.path.join(run_dir, "config.json")))
        row = last_row(run_dir)
        if row["epoch"] + 1 < config["epochs"]:
            print(f"(unfinished, left out: {os.path.basename(run_dir)} at epoch {row['epoch'] + 1} of {config['epochs']})")
            continue
        finals.setdefault(loss, []).append((config["lam"] if loss != "ce" else None, row))
    paper = {"ce": "93.16", "joint": "95.17", "center": "-"}
    print("\n| method | lambda | seeds | epochs | test top-1 (%) | test top-5 (%) | balanced top-1 (%) | paper top-1 (224 px, ResNet-34, 300 epochs) |")
    print("|---|---|---|---|---|---|---|---|")
    for loss in ("ce", "joint", "center"):
        runs = finals.get(loss, [])
        if not runs:
            continue
        rows = [r for _, r in runs]
        lam = "-" if loss == "ce" else f"{runs[0][0]:g}"
        cells = [mean_std([r[k] for r in rows]) for k in ("test_top1", "test_top5", "test_balanced_top1")]
        print(f"| {loss} | {lam} | {len(rows)} | {rows[0]['epoch'] + 1} | " + " | ".join(cells) + f" | {paper[loss]} |")
    ce = [r["test_top1"] for _, r in finals.get("ce", [])]
    for loss in ("joint", "center"):
        other = [r["test_top1"] for _, r in finals.get(loss, [])]
        if len(ce) > 1 and len(other) > 1:
            print(f"\n{loss} - ce: {difference(other, ce)}")
    lfw_study_plots(sweeps)


def lfw_study_plots(sweeps):
    plt = pyplot("LFW study plots")
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(5, 3.5))
    for loss, runs in sweeps.items():
        runs = sorted(runs, key=lambda r: r[0])
        ax.plot([lam for lam, _ in runs], [r["val_top1"] for _, r in runs], "o-", label=f"{loss} (val top-1)")
    ax.set_xscale("log")
    ax.set_xlabel("lambda")
    ax.set_ylabel("validation top-1 (%), last epoch")
    ax.set_title("LFW top-20, ResNet-18 72 px, 20 epochs, seed 0")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.join(LFW, "lfw_study_lambda.png"), dpi=120)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(9, 3.5))
    for loss in ("ce", "joint", "center"):
        path = os.path.join(LFW, f"final-{loss}-seed0", "metrics.jsonl")
        if not os.path.exists(path):
            continue
        rows = [json.loads(line) for line in open(path) if line.strip()]
        epochs = [r["epoch"] + 1 for r in rows]
        ax_loss.plot(epochs, [r["train_ce"] for r in rows], "o-", label=f"{loss}: train CE")
        ax_acc.plot(epochs, [r["test_top1"] for r in rows], "o-", label=f"{loss}: test top-1")
    ax_loss.set_xlabel("epoch")
    ax_loss.set_ylabel("train CE (epoch mean)")
    ax_acc.set_xlabel("epoch")
    ax_acc.set_ylabel("test top-1 (%)")
    for ax in (ax_loss, ax_acc):
        ax.legend()
    fig.suptitle("LFW top-20, seed 0: train and test curves")
    fig.tight_layout()
    fig.savefig(os.path.join(LFW, "lfw_study_curves.png"), dpi=120)
    print("wrote results/lfw-joint-supervision/lfw_study_lambda.png, results/lfw-joint-supervision/lfw_study_curves.png")


DEEPSUP = os.path.join(HERE, "deep-supervision-cifar10subset")
# train top-1 (%) levels whose first crossing measures convergence speed: 50 fixed before any
# run; 25 added after the sweeps (no plain net passed 31% in 5 epochs), before any final ended
TRAIN_TARGETS = (25.0, 50.0)


def epochs_to(rows, key, target):
    """First epoch (1-based) whose ``key`` reaches ``target``; None if never."""
    return next((r["epoch"] + 1 for r in rows if r.get(key) is not None and r[key] >= target), None)


def stage_medians(path, threshold=1e-7):
    """{stage: (layers, layers below threshold, median over layers of the mean |grad|)}
    of one gradient_probe.csv."""
    import csv
    per_layer = {}
    with open(path) as f:
        for row in csv.DictReader(f):
            per_layer.setdefault((int(row["stage"]), row["layer"]), []).append(float(row["mean_abs_grad"]))
    out = {}
    for stage in sorted({s for s, _ in per_layer}):
        means = [statistics.mean(v) for (s, _), v in per_layer.items() if s == stage]
        out[stage] = (len(means), sum(m < threshold for m in means), statistics.median(means))
    return out


def net_label(name):
    """'plain44' -> 'plain44 (Xavier)', 'plain44-kaiming' -> 'plain44 (Kaiming)'."""
    if name.endswith("-kaiming"):
        return name[:-len("-kaiming")] + " (Kaiming)"
    return name + " (Xavier)" if name.startswith("plain") else name


def net_order(name):
    """Sort key: plain nets before the rest, Xavier before Kaiming, shallow first."""
    return not name.startswith("plain"), name.endswith("kaiming"), int(re.sub(r"\D", "", name))


def split_head(name):
    """'plain32-ds1' -> ('plain32', '1'); after -ds: none or the --deep-sup stages."""
    return re.match(r"(.+?)-ds(.+)$", name).groups()


def head_label(ds):
    return "none" if ds == "none" else f"after stage {ds.replace('-', ', ')}"


def head_order(name):
    net, ds = split_head(name)
    return (*net_order(net), ds != "none", ds)


def deepsup_study_table():
    """The deep-supervision study: lr sweep (validation split), gradient probes, and the finals (test,
    3 seeds) with / without the auxiliary head; plot of the train curves."""
    sweeps = {}
    for path in sorted(glob.glob(os.path.join(DEEPSUP, "sweep-*-lr*", "metrics.jsonl"))):
        model, lr = re.match(r"sweep-(.+?)-lr([0-9.e-]+)$", os.path.basename(os.path.dirname(path))).groups()
        sweeps.setdefault(model, []).append((float(lr), read_rows(os.path.dirname(path))))
    if not sweeps:
        return
    lrs = sorted({lr for runs in sweeps.values() for lr, _ in runs}, reverse=True)
    print("\n| network | " + " | ".join(f"lr {lr:g}" for lr in lrs) + " | chosen lr |")
    print("|---|" + "---|" * (len(lrs) + 1))
    for model in sorted(sweeps, key=net_order):
        by_lr = dict(sweeps[model])
        finished = {lr: rows for lr, rows in by_lr.items() if rows and rows[-1]["epoch"] == 4}
        # the select rule of the study's run.sh: best last val top-1, ties to the first lr listed (the largest)
        best = max(sorted(finished, reverse=True), key=lambda lr: finished[lr][-1]["val_top1"]) if finished else None
        cells = [("-" if lr not in by_lr else f"{by_lr[lr][-1]['val_top1']:.1f}"
                  + ("" if lr in finished else f" (after {len(by_lr[lr])} epochs)")) for lr in lrs]
        print(f"| {net_label(model)} | " + " | ".join(cells) + f" | {best:g} |")
    probes = sorted(glob.glob(os.path.join(DEEPSUP, "probe-*", "gradient_probe.csv")),
                    key=lambda path: head_order(os.path.basename(os.path.dirname(path))[len("probe-"):]))
    if probes:
        print("\n| network, probe lr | aux head | layers < 1e-7 | median mean abs grad, stage 0 | stage 1 | stage 2 |")
        print("|---|---|---|---|---|---|")
        for path in probes:
            name = os.path.basename(os.path.dirname(path))
            net, ds = split_head(name[len("probe-"):])
            lr = json.load(open(os.path.join(os.path.dirname(path), "config.json")))["lr"]
            stages = stage_medians(path)
            below = sum(b for _, b, _ in stages.values())
            total = sum(n for n, _, _ in stages.values())
            print(f"| {net_label(net)}, lr {lr:g} | {head_label(ds)} | {below} of {total} | "
                  + " | ".join(f"{m:.1e}" for _, _, m in stages.values()) + " |")
    finals, final_lr, diverged = {}, {}, {}
    for path in sorted(glob.glob(os.path.join(DEEPSUP, "final-*-seed*", "metrics.jsonl"))):
        run_dir = os.path.dirname(path)
        setting = re.sub(r"-seed\d+$", "", os.path.basename(run_dir))[len("final-"):]
        rows = read_rows(run_dir)
        config = json.load(open(os.path.join(run_dir, "config.json")))
        epochs = config["epochs"]
        if rows[-1]["epoch"] + 1 < epochs:
            with open(run_dir + ".log") as f:
                last_line = f.read().strip().splitlines()[-1]
            if last_line.startswith("error: non-finite loss"):  # train.py stopped it (exit 3)
                diverged.setdefault(setting, []).append(f"{os.path.basename(run_dir)}: {last_line[7:last_line.index(';')]}")
            else:
                print(f"(unfinished, left out: {os.path.basename(run_dir)} at epoch {rows[-1]['epoch'] + 1} of {epochs})")
            continue
        finals.setdefault(setting, []).append(rows)
        final_lr[setting] = config["lr"]
    if not finals:
        return
    finals = {k: finals[k] for k in sorted(finals, key=head_order)}
    print("\n| network, lr | aux head | seeds (diverged) | test top-1 (%) | train top-1 (%) | "
          + " | ".join(f"epochs to {t:g}% train top-1" for t in TRAIN_TARGETS) + " | aux head test top-1 (%) |")
    print("|---|---|---|---|---|" + "---|" * len(TRAIN_TARGETS) + "---|")
    for setting, runs in finals.items():
        model, ds = split_head(setting)
        last = [rows[-1] for rows in runs]
        speeds = []
        for target in TRAIN_TARGETS:
            reach = [epochs_to(rows, "train_top1", target) for rows in runs]
            speeds.append(", ".join(str(e) if e else "-" for e in reach) if any(reach) else "never")
        aux = [v for r in last for k, v in r.items() if k.startswith("test_aux_top1")]
        n_diverged = f" ({len(diverged[setting])})" if setting in diverged else ""
        print(f"| {net_label(model)}, lr {final_lr[setting]:g} | {head_label(ds)} | {len(runs)}{n_diverged} | {mean_std([r['test_top1'] for r in last])} | "
              f"{mean_std([r['train_top1'] for r in last])} | " + " | ".join(speeds)
              + f" | {mean_std(aux) if aux else '-'} |")
    print()
    for setting, notes in diverged.items():
        for note in notes:
            print(f"diverged, not in the mean: {note}")
    for setting, runs in finals.items():
        model, ds = split_head(setting)
        base = finals.get(f"{model}-dsnone")
        if ds == "none" or not base or len(base) < 2 or len(runs) < 2:
            continue
        print(f"{net_label(model)}, head after stage {ds} - no head: "
              + difference([r[-1]["test_top1"] for r in runs], [r[-1]["test_top1"] for r in base]))
    deepsup_study_plot(finals)


def deepsup_study_plot(finals):
    plt = pyplot("deep-supervision plot")
    if plt is None:
        return
    models = sorted({split_head(s)[0] for s in finals})
    fig, axes = plt.subplots(2, len(models), figsize=(3.6 * len(models), 6), squeeze=False)
    for col, model in enumerate(models):
        for setting, runs in sorted(finals.items()):
            if not setting.startswith(model + "-ds"):
                continue
            ds = split_head(setting)[1]
            label = "no head" if ds == "none" else f"head after stage {ds}"
            for i, rows in enumerate(runs):
                epochs = [r["epoch"] + 1 for r in rows]
                kwargs = {"label": label} if i == 0 else {}
                color = {"none": "C0", "0": "C2"}.get(ds, "C1")
                axes[0][col].plot(epochs, [r["train_ce"] for r in rows], "-", color=color, alpha=0.7, **kwargs)
                axes[1][col].plot(epochs, [r["test_top1"] for r in rows], "-", color=color, alpha=0.7, **kwargs)
        axes[0][col].set_title(net_label(model))
        axes[0][col].set_ylabel("train CE of the final head")
        axes[1][col].set_ylabel("test top-1 (%)")
        axes[1][col].set_xlabel("epoch")
        axes[0][col].legend(fontsize=7)
    fig.suptitle("Deep supervision, CIFAR-10 subset, 10 epochs, one line per seed")
    fig.tight_layout()
    fig.savefig(os.path.join(DEEPSUP, "deepsup_study_curves.png"), dpi=120)
    print("wrote results/deep-supervision-cifar10subset/deepsup_study_curves.png")


HYBRID = os.path.join(HERE, "hybrid-cifar10lt-subset")
HYBRID_METHODS = {"ce": "CE", "ce-3x": "CE, 90 epochs (image-matched)", "ce-balanced": "CE, class-balanced sampler",
                  "ce-balanced-3x": "CE, class-balanced sampler, 90 epochs (image-matched)",
                  "sc": "Hybrid-SC", "psc": "Hybrid-PSC"}
# a hybrid step forwards 3 x 128 images (two contrastive views + one CE image), a CE step 128
HYBRID_DIFFERENCES = (("sc", "ce"), ("psc", "ce"), ("ce-balanced", "ce"), ("sc", "ce-balanced"),
                      ("psc", "ce-balanced"), ("sc", "psc"), ("ce-3x", "ce"), ("ce-balanced-3x", "ce-balanced"),
                      ("sc", "ce-3x"), ("sc", "ce-balanced-3x"), ("psc", "ce-balanced-3x"))
# Wang et al. CVPR 2021, Table 1 (CIFAR-10-LT, full 50k CIFAR-10 cut to n_max 5000, 200 epochs);
# the CE row is the LDAM paper's, as the hybrid paper cites it
HYBRID_PAPER = {100: {"ce": 70.36, "sc": 81.40, "psc": 78.82}, 10: {"ce": 86.39, "sc": 91.12, "psc": 90.06}}


def finished_runs(folder, pattern):
    """{setting: [metrics rows per seed]} of the runs in ``folder`` matching ``pattern``
    (a glob of run folders) that reached their configured last epoch; unfinished ones
    are listed, not averaged."""
    runs = {}
    for path in sorted(glob.glob(os.path.join(folder, pattern, "metrics.jsonl"))):
        run_dir = os.path.dirname(path)
        rows = read_rows(run_dir)
        epochs = json.load(open(os.path.join(run_dir, "config.json")))["epochs"]
        if not rows or rows[-1]["epoch"] + 1 < epochs:
            done = rows[-1]["epoch"] + 1 if rows else 0
            print(f"(unfinished, left out: {os.path.basename(run_dir)} at epoch {done} of {epochs})")
            continue
        setting = re.sub(r"-seed\d+$", "", os.path.basename(run_dir))
        runs.setdefault(setting, []).append((run_dir, rows))
    return runs


def cell(values):
    return mean_std(values) if values else "-"


def hybrid_study_table():
    """The hybrid study: one table per imbalance ratio; the groups at the scaled
    thresholds come from the run's own last evaluation (bf16 autocast, as trained),
    the groups at the paper's thresholds from evaluate.py (fp32) on the last checkpoint."""
    runs = finished_runs(HYBRID, "lt*-seed*")
    for beta in (100, 10):
        table = {m: runs[f"lt{beta}-{m}"] for m in HYBRID_METHODS if f"lt{beta}-{m}" in runs}
        if not table:
            continue
        counts = json.load(open(next(iter(table.values()))[0][0] + "-paper-thresholds.json"))["train_counts"]
        n = list(counts.values())
        groups = {t: (sum(c > t[0] for c in n), sum(t[1] <= c <= t[0] for c in n), sum(c < t[1] for c in n))
                  for t in ((200, 40), (100, 20))}
        (a, b, c), (d, e, f) = groups[(200, 40)], groups[(100, 20)]
        print(f"\n| beta {beta} ({sum(n):,} train images) | seeds | test top-1 (%) | many, > 200 ({a} classes) | "
              f"medium ({b}) | few, < 40 ({c}) | many, > 100 ({d}) | medium ({e}) | few, < 20 ({f}) | "
              f"paper, CIFAR-10-LT, 200 epochs |")
        print("|---|---|---|---|---|---|---|---|---|---|")
        for method, seeds in table.items():
            last = [rows[-1] for _, rows in seeds]
            paper = [json.load(open(run_dir + "-paper-thresholds.json")) for run_dir, _ in seeds]
            cells = [cell([r["test_top1"] for r in last])]
            cells += [cell([r[k] for r in last if r.get(k) is not None])
                      for k in ("test_many_top1", "test_medium_top1", "test_few_top1")]
            cells += [cell([j[k] for j in paper if j.get(k) is not None]) for k in ("many_top1", "medium_top1", "few_top1")]
            published = HYBRID_PAPER[beta].get(method)
            print(f"| {HYBRID_METHODS[method]} | {len(seeds)} | " + " | ".join(cells)
                  + f" | {published if published else '-'} |")
        print()
        top1 = {m: [rows[-1]["test_top1"] for _, rows in seeds] for m, seeds in table.items()}
        for a, b in HYBRID_DIFFERENCES:
            if len(top1.get(a, [])) > 1 and len(top1.get(b, [])) > 1:
                print(f"beta {beta}, {HYBRID_METHODS[a]} - {HYBRID_METHODS[b]}: " + difference(top1[a], top1[b]))
        hybrid_study_plot(beta, table)
        gap = [j["top1"] - rows[-1]["test_top1"] for seeds in table.values() for run_dir, rows in seeds
               for j in [json.load(open(run_dir + "-paper-thresholds.json"))]]
        print(f"beta {beta}: evaluate.py (fp32) top-1 minus the run's own last evaluation (bf16): "
              f"mean {statistics.mean(gap):+.3f}, largest |gap| {max(abs(g) for g in gap):.2f} points over {len(gap)} runs")


def hybrid_study_plot(beta, table):
    """Per-class test top-1 (mean over seeds, evaluate.py's JSON) against the class's
    training images: results/hybrid-cifar10lt-subset/hybrid_study_lt<beta>.png."""
    plt = pyplot("hybrid per-class plot")
    if plt is None:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    colours = {m: f"C{i}" for i, m in enumerate(m for m in HYBRID_METHODS if not m.endswith("-3x"))}
    for method, seeds in table.items():
        results = [json.load(open(run_dir + "-paper-thresholds.json")) for run_dir, _ in seeds]
        classes = list(results[0]["train_counts"])
        counts = [results[0]["train_counts"][c] for c in classes]
        per_class = [[a for r in results if (a := r["per_class"][c]) is not None] for c in classes]
        means = [statistics.mean(a) if a else float("nan") for a in per_class]  # NaN: a gap in the line
        base = method.removesuffix("-3x")   # the 90-epoch run dashed, in its 30-epoch sibling's colour
        ax.plot(counts, means, "o--" if base != method else "o-", color=colours[base],
                label=f"{HYBRID_METHODS[method]} ({len(seeds)} seeds)")
    ax.set_xscale("log")
    ax.set_xlabel("training images of the class (log)")
    ax.set_ylabel("test top-1 of the class (%)")
    ax.set_title(f"Long-tailed CIFAR-10 subset, beta {beta}, ResNet-32, 30 epochs" + (
        "\n(dashed: 90 epochs)" if any(m.endswith("-3x") for m in table) else ""), fontsize=10)
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.2), ncol=2)  # below: no data hidden
    fig.tight_layout()
    fig.savefig(os.path.join(HYBRID, f"hybrid_study_lt{beta}.png"), dpi=120, bbox_inches="tight")
    plt.close(fig)
    print(f"wrote results/hybrid-cifar10lt-subset/hybrid_study_lt{beta}.png")


MKSMT = os.path.join(HERE, "mksmt-cifar10subset")
MKSMT_CONFIGS = {"plain": "plain (backbone's own head)", "plain2x": "plain, twice the epochs (update-matched)",
                 "nokd": "two-step, no KD", "t1": "two-step MKSMT, KD T = 1", "t4": "two-step MKSMT, KD T = 4",
                 "onestep": "one-step (CE S3 + CE S4 + KD T = 1)"}
# Yu et al. 2023, CUB-200-2011, Swin-L from ImageNet-22K weights
MKSMT_PAPER = {"plain": "91.9 (v-flip about -11)", "nokd": "92.1 (S3 90.9)", "t1": "92.8 (v-flip about -7)",
               "t4": "below T = 1 (falls as T grows)"}


def mksmt_study_table():
    """The MKSMT study: final-head (S4) and S3-head top-1 on test (last epoch),
    optimizer updates per run, and the vertical-flip top-1 (evaluate.py --flip v, fp32)
    with its drop from the run's own last evaluation (bf16)."""
    runs = finished_runs(MKSMT, "*-seed*")
    if not runs:
        return
    print("\n| config | seeds | optimizer updates | final head top-1 (%) | S3 head top-1 (%) | v-flip top-1 (%) "
          "| v-flip drop (points) | paper (CUB, Swin-L) |")
    print("|---|---|---|---|---|---|---|---|")
    top1, vflip = {}, {}
    for config in (c for c in MKSMT_CONFIGS if c in runs):
        seeds = runs[config]
        last = [rows[-1] for _, rows in seeds]
        config_json = json.load(open(os.path.join(seeds[0][0], "config.json")))
        steps = 2 if config_json["loss"] == "mksmt" and config_json["multistep"] == 2 else 1
        flips = [(r["test_top1"], json.load(open(run_dir + "-flipv.json"))["top1"]) for (run_dir, _), r in zip(seeds, last)
                 if os.path.exists(run_dir + "-flipv.json") and os.path.getsize(run_dir + "-flipv.json")]
        top1[config] = [r["test_top1"] for r in last]
        vflip[config] = [f for _, f in flips]
        cells = [cell(top1[config]), cell([r["test_head_top1_stage1"] for r in last if "test_head_top1_stage1" in r]),
                 cell([f for _, f in flips]), cell([t - f for t, f in flips])]
        print(f"| {MKSMT_CONFIGS[config]} | {len(seeds)} | {steps * last[0]['iteration']:,} | " + " | ".join(cells)
              + f" | {MKSMT_PAPER.get(config, '-')} |")
    print()
    for a, b in (("t1", "plain"), ("t1", "plain2x"), ("plain2x", "plain"), ("nokd", "plain2x"), ("t1", "nokd"),
                 ("t4", "t1"), ("onestep", "plain"), ("t1", "onestep")):
        if len(top1.get(a, [])) > 1 and len(top1.get(b, [])) > 1:
            print(f"{a} - {b}: " + difference(top1[a], top1[b]))
    for a, b in (("t1", "plain"), ("t1", "plain2x")):
        if len(vflip.get(a, [])) > 1 and len(vflip.get(b, [])) > 1:
            print(f"{a} - {b}: " + difference(vflip[a], vflip[b], "v-flip top-1"))


if __name__ == "__main__":
    lfw_study_table()
    deepsup_study_table()
    hybrid_study_table()
    mksmt_study_table()
