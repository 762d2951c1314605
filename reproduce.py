"""One command for the full-scale reproductions: runs ``train.py`` once per setup,
configuration and seed, then writes a mean ± std table per setup.

    python reproduce.py --smoke                                   # every setup on tiny made-up data, < 1 min
    python reproduce.py seed001 --data ./data --plan              # measured img/s and minutes only
    python reproduce.py seed001 hybrid-lt deepsup --data cifar10.npz --seeds 0 1 2 --parallel 2
    python reproduce.py lfw --data /path/to/lfw                   # <Name>/<Name>_NNNN.jpg
    python reproduce.py all --data cifar10.npz --data /path/to/lfw --out runs/reproduce

SETUP is a key of ``SETUPS`` (or ``all``): seed001, hybrid-lt, lfw, deepsup.
``--data`` takes a path per kind of data: a ``.npz`` file is the decoded CIFAR-10
(x_train (N, 32, 32, 3) uint8, y_train, x_test, y_test, classes), a folder holding
``cifar-10-batches-py`` is torchvision's CIFAR-10 (``train.py --dataset cifar10`` fetches
it into ``./data``), another folder is LFW; ``npz=PATH`` / ``cifar10=PATH`` / ``lfw=PATH``
say it explicitly.

Every run is ``python train.py <configuration's flags> --dataset ... --data-path PATH
--seed S --device D --output-dir OUT/SETUP/<configuration>-seed<S> --resume auto``
with stdout and stderr appended to ``OUT/SETUP/<configuration>-seed<S>.log``; the
same command run again continues interrupted runs and skips finished ones.
``--parallel N`` runs N at once (they share the device). Every command is first
checked with train.py's own argument parser, so a flag that train.py rejects stops
everything before any run starts.

Before launching, each configuration is timed for a few training steps on the
current device (train.py itself, in this process, with ``--iters`` and
``--print-freq`` overridden, into a temporary folder) and the script prints per
setup the training images, the measured img/s and the estimated minutes;
``--plan`` stops there, ``--no-estimate`` skips it. A configuration that train.py
fails on while being timed (bad data, out of memory) stops everything, too.

Afterwards ``OUT/summary.md`` (also printed) holds one table per setup: the last
evaluation of every run (never a selection on test), mean ± sample std over seeds,
the number of finished seeds and the paper's number; missing and unfinished runs
are '-' with a note. ``--summary-only`` rewrites it from the runs already on disk.

``--smoke`` runs every setup with the same commands plus ``SMOKE_OVERRIDES``
(2 iterations, batch 4, CPU, ...) on tiny data it writes to a temporary folder.
"""
import argparse
import collections
import contextlib
import gc
import io
import json
import math
import os
import re
import shlex
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN = os.path.join(HERE, "train.py")

Config = collections.namedtuple("Config", "name label args paper")   # paper: top-1 (%) as text, or None
Setup = collections.namedtuple("Setup", "title data configs metrics")

# Long-tailed CIFAR-10 at beta 100 (12,406 training images) with the paper's many /
# medium / few thresholds (> 100, 20-100, < 20 training images).
_LT = ["--imbalance-ratio", "100", "--many-threshold", "100", "--few-threshold", "20"]
# Deep supervision: 64k iterations at batch 128, lr /10 at 32k and 48k iterations (our
# choice). plain56 with Kaiming init at lr 0.001: the lr the deep-supervision study chose for it on a
# validation split of the CIFAR-10 subset (results/README.md, "Deep supervision on plain nets": at 0.1 / 0.03 / 0.01 /
# 0.003 it ends at chance after 5 epochs; at 0.001 it trains, slowly); with Xavier init no
# lr tried moved plain32-56 off chance. resnet56 at He et al.'s lr 0.1.
_DEEPSUP_SCHEDULE = ["--recipe", "none", "--iters", "64000", "--milestones", "32000", "48000",
                     "--milestone-unit", "iter", "--batch-size", "128", "--momentum", "0.9", "--wd", "1e-4"]
_PLAIN56 = ["--model", "plain56", "--plain-init", "kaiming", "--lr", "0.001", *_DEEPSUP_SCHEDULE]
_RESNET56 = ["--model", "resnet56", "--lr", "0.1", *_DEEPSUP_SCHEDULE]
_DEEP_SUP = ["--deep-sup", "1", "--aux-weight", "0.3", "--aux-decay", "linear"]

SETUPS = {
    "seed001": Setup(
        "ResNet-32 on CIFAR-10, Wu's recipe (80k iterations)", "npz",
        [Config("resnet32", "ResNet-32 (seed001-cifar10)", ["--recipe", "seed001-cifar10"],
                "91.1 (Wu); 92.49 (He et al. 2016)")],
        ["test_top1"]),
    "hybrid-lt": Setup(
        "CIFAR-10-LT, beta 100: CE (LDAM-DRW's recipe) vs hybrid SC / PSC (batch 512, lr 0.5, 200 epochs)", "npz",
        [Config("ce", "CE (LDAM-DRW's recipe)", ["--recipe", "ldam-ce-cifar10lt", *_LT], "70.36 (its best epoch)"),
         Config("sc", "Hybrid-SC", ["--recipe", "hybrid-sc-cifar10lt", *_LT], "81.40"),
         Config("psc", "Hybrid-PSC", ["--recipe", "hybrid-psc-cifar10lt", *_LT], "78.82")],
        ["test_top1", "test_many_top1", "test_medium_top1", "test_few_top1"]),
    "lfw": Setup(
        "LFW top-20 identities, ResNet-34 at 224 px, 300 epochs: joint vs CE", "lfw",
        [Config("joint", "CE + contrastive-center (joint)", ["--recipe", "lfw-joint"], "95.17"),
         Config("ce", "CE", ["--recipe", "lfw-joint", "--loss", "ce"], "93.16")],
        ["test_top1"]),
    "deepsup": Setup(
        "Deep supervision on CIFAR-10, 64k iterations (no paper number: with vs without)", "npz",
        [Config("plain56", "plain56", _PLAIN56, None),
         Config("plain56-ds1", "plain56 + deep supervision (stage 1)", _PLAIN56 + _DEEP_SUP, None),
         Config("resnet56", "resnet56", _RESNET56, None),
         Config("resnet56-ds1", "resnet56 + deep supervision (stage 1)", _RESNET56 + _DEEP_SUP, None)],
        ["test_top1"]),
}

# kind of --data: (train.py flags that take the path, what --data must point at)
DATA_KINDS = {
    "npz": (["--dataset", "npz", "--data-path"],
            "the decoded CIFAR-10 .npz, or torchvision's CIFAR-10 folder (cifar10=FOLDER)"),
    "cifar10": (["--dataset", "cifar10", "--data-path"], "torchvision's CIFAR-10 folder (cifar-10-batches-py inside)"),
    "lfw": (["--dataset", "lfw", "--data-path"], "the LFW folder <Name>/<Name>_NNNN.jpg (see README: Data)"),
}
METRIC_LABELS = {"test_top1": "top-1 (%)", "test_many_top1": "many (%)", "test_medium_top1": "medium (%)",
                 "test_few_top1": "few (%)"}

# --smoke: the only difference from the full commands (appended last, so they win), by data kind.
SMOKE_OVERRIDES = {
    "all": ["--iters", "2", "--batch-size", "4", "--workers", "0", "--device", "cpu"],
    "npz": [],
    "lfw": ["--image-size", "32"],
}
# Tiny data: 100 training images per class, so that beta 100 still leaves class 9 one image.
SMOKE_DATA = {"classes": 10, "train_per_class": 100, "test_per_class": 8, "lfw_people": 3, "lfw_images": 5}

# Throughput probe per device type: (untimed warm-up steps, timed steps, steps per progress line)
PROBE_STEPS = {"cuda": (10, 30, 10), "cpu": (1, 2, 1)}
ITER_LINE = re.compile(r"^epoch (\d+) iter (\d+)/\d+ ")
EVAL_LINE = re.compile(r"^eval epoch \d+:")
SIZES_LINE = re.compile(r"(\d+) train / (?:\d+ validation / )?(\d+) test images, \d+ classes; "
                        r"(\d+) iterations per epoch")

Run = collections.namedtuple("Run", "setup config seed args dir")  # args: train.py's, without the run folder


class UsageError(Exception):
    """Bad input: printed as one line ``error: ...``, exit code 2."""


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (exit code 2), not the usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


# ----------------------------------------------------------------------------------
# Commands
# ----------------------------------------------------------------------------------
def data_kind(path):
    """'npz' for a .npz file, 'cifar10' for a folder holding torchvision's cifar-10-batches-py, 'lfw' for
    another folder."""
    if not os.path.exists(path):
        raise UsageError(f"--data {path} does not exist")
    if os.path.isdir(path):
        return "cifar10" if os.path.isdir(os.path.join(path, "cifar-10-batches-py")) else "lfw"
    return "npz"


def setup_kind(setup_name, paths):
    """The kind of data a setup reads: its own, or for the CIFAR-10 setups ("npz") a
    torchvision CIFAR-10 folder when that is what --data gave."""
    kind = SETUPS[setup_name].data
    return "cifar10" if kind == "npz" and "npz" not in paths and "cifar10" in paths else kind


def parse_data(values):
    """['cifar.npz', 'lfw=/data/lfw'] -> {'npz': 'cifar.npz', 'lfw': '/data/lfw'}."""
    paths = {}
    for value in values or []:
        kind, sep, path = value.partition("=")
        if not sep or kind not in DATA_KINDS:
            kind, path = data_kind(value), value
        elif not os.path.exists(path):
            raise UsageError(f"--data {value}: {path} does not exist")
        paths[kind] = path
    return paths


def check_data(setup_names, paths):
    """Fail with one line for the first setup whose kind of data was not given."""
    for name in setup_names:
        kind = setup_kind(name, paths)
        if kind not in paths:
            raise UsageError(f"{name} needs --data PATH to {DATA_KINDS[kind][1]}")


def train_args(setup_name, config, seed, paths, device, overrides):
    """train.py's arguments shared by a run and its throughput probe."""
    kind = setup_kind(setup_name, paths)
    return [*config.args, *DATA_KINDS[kind][0], paths[kind], "--seed", str(seed), "--device", device,
            *overrides.get("all", []), *overrides.get(kind, [])]


def plan_runs(setup_names, seeds, paths, out, device, overrides):
    """Every (setup, configuration, seed) as a Run with its train.py arguments."""
    runs = []
    for name in setup_names:
        for config in SETUPS[name].configs:
            for seed in seeds:
                run_dir = os.path.join(out, name, f"{config.name}-seed{seed}")
                runs.append(Run(name, config, seed, train_args(name, config, seed, paths, device, overrides),
                                run_dir))
    return runs


def run_argv(run):
    """train.py's full argument list of ``run``: its own folder, resumed if there."""
    return run.args + ["--output-dir", run.dir, "--resume", "auto"]


def resolve_commands(runs):
    """train.py's resolved arguments of every run (recipe + flags), parsed by train.py's
    own parser; a command it rejects raises UsageError naming the run."""
    import train  # late: pulls in torch, which --help and --summary-only do not need
    resolved = {}
    for run in runs:
        errors = io.StringIO()
        try:
            with contextlib.redirect_stderr(errors):
                resolved[run.dir] = train.parse_args(run_argv(run))
        except SystemExit:
            reason = errors.getvalue().strip().splitlines()[-1:] or ["rejected"]
            raise UsageError(f"train.py rejects {run.setup}/{run.config.name}: "
                             f"{reason[0].removeprefix('error: ')}") from None
    return resolved


# ----------------------------------------------------------------------------------
# Throughput probe and estimate
# ----------------------------------------------------------------------------------
class TimedLines(io.TextIOBase):
    """A stdout stand-in keeping (time.perf_counter() at its newline, line) per line."""

    def __init__(self):
        super().__init__()
        self.lines, self.partial = [], ""

    def writable(self):
        return True

    def write(self, text):
        *done, self.partial = (self.partial + text).split("\n")
        now = time.perf_counter()
        self.lines += [(now, line) for line in done]
        return len(text)


def run_train_in_process(argv):
    """train.py's main() on ``argv`` here, its stdout timed line by line. Returns
    (TimedLines, error line or None)."""
    import train
    lines, errors = TimedLines(), io.StringIO()
    error = None
    try:
        with contextlib.redirect_stdout(lines), contextlib.redirect_stderr(errors):
            code = train.main(train.parse_args(argv))
        if code > 128:  # Ctrl-C / SIGTERM reached train.py's handler: stop here too
            raise KeyboardInterrupt
        if code:
            error = f"train.py exited with {code}: {errors.getvalue().strip()[-200:]}"
    except SystemExit:
        error = errors.getvalue().strip() or "rejected by train.py's parser"
    except Exception as e:  # DataError (bad data), out of memory, ...
        error = f"{e.__class__.__name__}: {(str(e).strip().splitlines() or [''])[-1]}"
    return lines, error


def read_probe(lines, warmup):
    """From the timed progress lines: steps/s (consecutive lines of one epoch, after
    ``warmup`` steps), seconds of the last evaluation, and the data sizes."""
    probe = {"steps_per_s": None, "eval_s": None, "train_size": None, "test_size": None,
             "iters_per_epoch": None}
    steps = seconds = 0.0
    previous = None  # (epoch, iteration, time) of the last progress line
    for now, line in lines:
        sizes, step = SIZES_LINE.search(line), ITER_LINE.match(line)
        if sizes:
            probe.update(train_size=int(sizes[1]), test_size=int(sizes[2]), iters_per_epoch=int(sizes[3]))
        elif step:
            epoch, iteration = int(step[1]), int(step[2])
            if previous and previous[0] == epoch and previous[1] >= warmup:
                steps, seconds = steps + iteration - previous[1], seconds + now - previous[2]
            previous = (epoch, iteration, now)
        elif EVAL_LINE.match(line) and previous:
            probe["eval_s"] = now - previous[2]
    if steps and seconds > 0:
        probe["steps_per_s"] = steps / seconds
    return probe


def probe_config(argv, steps, folder):
    """Time a few training steps of ``argv`` (train.py's arguments) into ``folder``."""
    warmup, timed, every = steps
    lines, error = run_train_in_process(argv + ["--iters", str(warmup + timed), "--print-freq", str(every),
                                                "--eval-every", "1", "--output-dir", folder])
    probe = read_probe(lines.lines, warmup)
    unparsed = error is None and (probe["steps_per_s"] is None or probe["iters_per_epoch"] is None)
    return {**probe, "error": error, "note": "train.py's progress lines not understood" if unparsed else None}


def estimate(args, probe):
    """Training images, img/s and minutes of one full run from its resolved train.py
    arguments and its probe (None where the probe could not tell)."""
    per_epoch, rate = probe["iters_per_epoch"], probe["steps_per_s"]
    if not per_epoch or not rate:
        return None
    total_iters = args.iters or args.epochs * per_epoch
    epochs = math.ceil(total_iters / per_epoch)
    evals = sum(1 for e in range(epochs) if (e + 1) % args.eval_every == 0 or e == epochs - 1)
    seconds = total_iters / rate + evals * (probe["eval_s"] or 0.0)
    return {"iterations": total_iters, "images": total_iters * args.batch_size,
            "img_per_s": rate * args.batch_size, "evals": evals, "minutes": seconds / 60}


def device_description(device_name):
    """'cuda (NVIDIA H100 80GB HBM3)' or 'cpu (AMD EPYC)' for the --device value."""
    import torch
    import benchmark
    import utils
    device = benchmark.pick_device(device_name)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else utils.cpu_name()
    return device.type, f"{device} ({name})"


def measure(runs, resolved):
    """Probe the first seed of every configuration on the runs' device (train.py's
    resolved --device); -> ({(setup, config name): row}, device, seconds)."""
    device_type, description = device_description(resolved[runs[0].dir].device)
    steps = PROBE_STEPS.get(device_type, PROBE_STEPS["cpu"])
    print(f"timing {steps[1]} training steps (after {steps[0]} warm-up) of each configuration "
          f"on {description} ...", flush=True)
    rows, start = {}, time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="reproduce-probe-") as folder:
        for run in runs:
            key = (run.setup, run.config.name)
            if key in rows:
                continue
            probe = probe_config(run.args, steps, os.path.join(folder, f"{run.setup}-{run.config.name}"))
            rows[key] = {"run": run, "probe": probe, "estimate": estimate(resolved[run.dir], probe)}
            release_memory()
    return rows, description, time.perf_counter() - start


def release_memory():
    """Free a probe's model, loader workers and cached GPU memory before the next one."""
    gc.collect()
    import torch
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def print_estimates(rows, runs, description, probe_seconds, parallel):
    """One line per configuration, then the minutes per setup and in all."""
    print(f"\nestimate on {description} (probing took {probe_seconds:.0f} s)")
    print(f"{'setup':<10} {'configuration':<14} {'iterations':>10} {'train images':>13} {'img/s':>9} "
          f"{'eval s':>7} {'min/run':>8} {'runs':>5} {'minutes':>8}")
    per_setup = collections.defaultdict(float)
    for (setup, name), row in rows.items():
        count = sum(1 for r in runs if (r.setup, r.config.name) == (setup, name))
        head = f"{setup:<10} {name:<14}"
        est, probe = row["estimate"], row["probe"]
        if est is None:
            print(f"{head} -  ({probe['error'] or probe['note']})")
            continue
        eval_s = f"{probe['eval_s']:.1f}" if probe["eval_s"] is not None else "-"
        print(f"{head} {est['iterations']:>10} {est['images']:>13,} {est['img_per_s']:>9.1f} {eval_s:>7} "
              f"{est['minutes']:>8.1f} {count:>5} {est['minutes'] * count:>8.1f}")
        per_setup[setup] += est["minutes"] * count
    totals = [*per_setup.items()] + ([("all", sum(per_setup.values()))] if len(per_setup) > 1 else [])
    for setup, minutes in totals:
        print(f"{setup}: {minutes:.1f} device-minutes one run after another" + wall_clock(minutes, parallel))
    print("img/s: training-set images per second (batch size x steps/s; a hybrid step also forwards two "
          "contrastive views per image); minutes include one test-set evaluation per epoch ('eval s' each).")
    if parallel > 1:
        print(f"--parallel {parallel}, roughly: the low end assumes parallel runs do not slow each other, "
              f"the high end that one run already fills the device (not measured).")


def wall_clock(minutes, parallel):
    """The rough wall-clock range of --parallel N runs sharing one device."""
    if parallel == 1:
        return ""
    return f", {minutes / parallel:.1f}-{minutes:.1f} min wall-clock with --parallel {parallel}"


# ----------------------------------------------------------------------------------
# Launching
# ----------------------------------------------------------------------------------
def start(run):
    """Start ``python train.py`` for ``run``, output appended to <run dir>.log."""
    os.makedirs(os.path.dirname(run.dir) or ".", exist_ok=True)
    command = [sys.executable, TRAIN, *run_argv(run)]
    log = open(run.dir + ".log", "a")
    log.write(f"# reproduce.py: {shlex.join(command)}\n")
    log.flush()
    return subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT), log


def last_line(path):
    """The log's last non-empty line (train.py's final result or its error)."""
    with open(path, errors="replace") as f:
        lines = [line.strip() for line in f if line.strip()]
    return lines[-1] if lines else ""


def launch(runs, parallel, poll_s=0.2):
    """Run every command, ``parallel`` at a time; -> {run dir: exit code}. Ctrl-C
    reaches the runs too (they save a checkpoint and stop); we wait for them."""
    pending, running, codes = list(runs), {}, {}
    try:
        while pending or running:
            while pending and len(running) < parallel:
                run = pending.pop(0)
                running[run.dir] = (run, *start(run), time.time())
                print(f"[{len(codes) + len(running)}/{len(runs)}] started {run.setup}/{run.config.name} "
                      f"seed {run.seed} -> {run.dir}.log", flush=True)
            for key, (run, proc, log, started) in list(running.items()):
                if proc.poll() is not None:
                    log.close()
                    codes[key] = proc.returncode
                    del running[key]
                    print(f"done {run.setup}/{run.config.name} seed {run.seed}: exit {proc.returncode} after "
                          f"{(time.time() - started) / 60:.1f} min: {last_line(run.dir + '.log')}", flush=True)
            time.sleep(poll_s)
    except KeyboardInterrupt:
        for run, proc, log, _ in running.values():
            proc.wait()
            log.close()
        raise
    return codes


# ----------------------------------------------------------------------------------
# Summary
# ----------------------------------------------------------------------------------
def read_jsonl(path):
    """The rows of a metrics.jsonl file."""
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def unfinished_note(last, config):
    """Why the run whose last metrics row is ``last`` is not finished, or None.
    ``config`` is its config.json (train.py's resolved arguments)."""
    if config.get("iters"):
        if last.get("iteration", 0) < config["iters"]:
            return f"unfinished (last evaluation at iteration {last.get('iteration')} of {config['iters']})"
    elif "epochs" in config and last.get("epoch", -1) < config["epochs"] - 1:
        return f"unfinished (last evaluation after epoch {last.get('epoch', -1) + 1} of {config['epochs']})"
    return None


def read_run(run_dir):
    """(last metrics row, None) of a finished run, or (None, why not)."""
    metrics, config_path = os.path.join(run_dir, "metrics.jsonl"), os.path.join(run_dir, "config.json")
    if not os.path.isdir(run_dir):
        return None, "missing (no run folder)"
    if not os.path.isfile(metrics):
        return None, "unfinished (no evaluation yet)"
    try:
        rows = read_jsonl(metrics)
        config = {}
        if os.path.isfile(config_path):
            with open(config_path) as f:
                config = json.load(f)
    except (OSError, ValueError) as e:
        return None, f"unreadable ({e.__class__.__name__})"
    if not rows:
        return None, "unfinished (no evaluation yet)"
    note = unfinished_note(rows[-1], config)
    return (None, note) if note else (rows[-1], None)


def mean_std(values):
    """'mean ± sample std' (2 decimals) of the finite numbers in ``values``; one
    value alone; '-' for none."""
    numbers = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)]
    if not numbers:
        return "-"
    if len(numbers) == 1:
        return f"{numbers[0]:.2f}"
    return f"{statistics.mean(numbers):.2f} ± {statistics.stdev(numbers):.2f}"


def setup_table(out, name, seeds):
    """Markdown of one setup: a row per configuration, then a note per missing or
    unfinished run."""
    setup = SETUPS[name]
    has_paper = any(c.paper for c in setup.configs)
    header = ["configuration", *(METRIC_LABELS[m] for m in setup.metrics), "n seeds"]
    header += ["paper top-1 (%)"] if has_paper else []
    lines = [f"## {name}: {setup.title}", "", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    notes = []
    for config in setup.configs:
        finished = []
        for seed in seeds:
            run_dir = os.path.join(out, name, f"{config.name}-seed{seed}")
            row, note = read_run(run_dir)
            if note:
                notes.append(f"- {config.label}, seed {seed}: {note} ({run_dir})")
            else:
                finished.append(row)
        cells = [config.label, *(mean_std([r.get(m) for r in finished]) for m in setup.metrics), str(len(finished))]
        cells += [config.paper or "-"] if has_paper else []
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines + ([""] + notes if notes else [])) + "\n"


def summary(out, setup_names, seeds, smoke=False):
    """The whole summary.md text."""
    head = ["# Reproduction summary", "",
            f"Last evaluation of each run (nothing is selected on the test set), mean ± sample std (n - 1) "
            f"over the seeds whose run finished (a single seed shows its value alone; '-': none). "
            f"Seeds {', '.join(map(str, seeds))}; runs in {out}/<setup>/<configuration>-seed<S>.", ""]
    if smoke:
        head += ["**--smoke: tiny made-up data and 2 iterations; the numbers mean nothing.**", ""]
    return "\n".join(head) + "\n" + "\n".join(setup_table(out, name, seeds) for name in setup_names)


def write_summary(out, setup_names, seeds, smoke=False):
    """Write OUT/summary.md and print it."""
    text = summary(out, setup_names, seeds, smoke)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(text)
    print("\n" + text + f"\nwrote {os.path.join(out, 'summary.md')}", flush=True)


# ----------------------------------------------------------------------------------
# --smoke data
# ----------------------------------------------------------------------------------
def make_smoke_data(folder):
    """A tiny CIFAR-like .npz and a tiny LFW-like folder of JPEGs in ``folder``;
    -> {'npz': path, 'lfw': path}."""
    from PIL import Image
    rng, k = np.random.default_rng(0), SMOKE_DATA["classes"]
    npz = os.path.join(folder, "tiny-cifar.npz")
    n_train, n_test = k * SMOKE_DATA["train_per_class"], k * SMOKE_DATA["test_per_class"]
    np.savez(npz, x_train=rng.integers(0, 256, (n_train, 32, 32, 3), dtype=np.uint8),
             y_train=np.repeat(np.arange(k), SMOKE_DATA["train_per_class"]),
             x_test=rng.integers(0, 256, (n_test, 32, 32, 3), dtype=np.uint8),
             y_test=np.repeat(np.arange(k), SMOKE_DATA["test_per_class"]),
             classes=np.array([f"class{c}" for c in range(k)]))
    lfw = os.path.join(folder, "tiny-lfw")
    for p in range(SMOKE_DATA["lfw_people"]):
        person = f"Person_{chr(ord('A') + p)}"
        os.makedirs(os.path.join(lfw, person))
        for i in range(1, SMOKE_DATA["lfw_images"] + 1):
            pixels = rng.integers(0, 256, (40, 40, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(os.path.join(lfw, person, f"{person}_{i:04d}.jpg"))
    return {"npz": npz, "lfw": lfw}


# ----------------------------------------------------------------------------------
def check_writable(out):
    """Create ``out`` or fail with one line."""
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UsageError(f"cannot write to --out {out} ({e.strerror}); pass a writable folder") from None


def reproduce(args, setup_names, paths, overrides):
    """Check every command, estimate, run, summarise. Returns the exit code."""
    if not args.plan:
        check_writable(args.out)
    runs = plan_runs(setup_names, args.seeds, paths, args.out, args.device, overrides)
    resolved = resolve_commands(runs)
    if not args.no_estimate:
        rows, description, probe_seconds = measure(runs, resolved)
        print_estimates(rows, runs, description, probe_seconds, args.parallel)
        broken = [(key, row["probe"]["error"]) for key, row in rows.items() if row["probe"]["error"]]
        if broken:
            (setup, name), error = broken[0]
            raise UsageError(f"train.py fails on {setup}/{name} ({error}); nothing launched")
        if args.plan:
            return 0
    print(f"\nlaunching {len(runs)} runs, {args.parallel} at a time, into {args.out}", flush=True)
    try:
        codes = launch(runs, args.parallel)
    except KeyboardInterrupt:
        write_summary(args.out, setup_names, args.seeds, args.smoke)
        print("error: interrupted; run the same command again to continue", file=sys.stderr)
        return 130
    write_summary(args.out, setup_names, args.seeds, args.smoke)
    return report_failures(runs, codes)


def report_failures(runs, codes):
    """One line on stderr for the runs stopped by a signal (resumable) and one for
    those that failed; returns the exit code (0: every run exited 0)."""
    stopped = [r for r in runs if codes.get(r.dir, 0) > 128]
    failed = [r for r in runs if codes.get(r.dir) != 0 and r not in stopped]
    if stopped:
        print(f"error: {len(stopped)} of {len(runs)} runs were stopped by a signal; run the same command again "
              f"to continue them: " + ", ".join(f"{r.dir}.log" for r in stopped), file=sys.stderr)
    if failed:
        print(f"error: {len(failed)} of {len(runs)} runs failed: " + ", ".join(f"{r.dir}.log" for r in failed),
              file=sys.stderr)
    return 1 if stopped or failed else 0


def main(args):
    unknown = [name for name in args.setups if name not in (*SETUPS, "all")]
    if unknown:
        raise UsageError(f"unknown SETUP {unknown[0]!r}; choose from {', '.join(SETUPS)} or all")
    setup_names = list(SETUPS) if not args.setups or "all" in args.setups else list(dict.fromkeys(args.setups))
    if not args.setups and not (args.smoke or args.summary_only):
        raise UsageError(f"name at least one SETUP: {', '.join(SETUPS)} or all")
    if args.parallel < 1:
        raise UsageError("--parallel must be at least 1")
    args.seeds = args.seeds if args.seeds is not None else ([0] if args.smoke else [0, 1, 2])
    args.out = args.out or ("runs/reproduce-smoke" if args.smoke else "runs/reproduce")
    if args.summary_only:
        check_writable(args.out)
        write_summary(args.out, setup_names, args.seeds, args.smoke)
        return 0
    if not args.smoke:
        paths = parse_data(args.data)
        check_data(setup_names, paths)
        return reproduce(args, setup_names, paths, {})
    with tempfile.TemporaryDirectory(prefix="reproduce-smoke-") as folder:
        return reproduce(args, setup_names, make_smoke_data(folder), SMOKE_OVERRIDES)


def get_args_parser():
    p = OneLineParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                      epilog="examples:\n" + __doc__.split("\n\n")[1])
    p.add_argument("setups", nargs="*", metavar="SETUP",
                   help=f"{', '.join(SETUPS)} or all (default with --smoke: all)")
    p.add_argument("--data", action="append", metavar="PATH",
                   help="CIFAR-10 (.npz, or torchvision's folder) or LFW folder (repeat for both; npz=PATH / "
                        "cifar10=PATH / lfw=PATH to be explicit)")
    p.add_argument("--seeds", type=int, nargs="+", help="default 0 1 2 (--smoke: 0)")
    p.add_argument("--parallel", type=int, default=1, help="runs at once (sharing the device)")
    p.add_argument("--out", help="default runs/reproduce (--smoke: runs/reproduce-smoke)")
    p.add_argument("--device", default="auto", help="train.py's --device: auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--smoke", action="store_true", help="every setup, tiny made-up data, 2 iterations, CPU")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--plan", action="store_true", help="print the measured img/s and estimated minutes, then stop")
    mode.add_argument("--no-estimate", action="store_true", help="launch without timing the configurations first")
    mode.add_argument("--summary-only", action="store_true", help="rewrite OUT/summary.md from the runs on disk")
    return p


if __name__ == "__main__":
    try:
        sys.exit(main(get_args_parser().parse_args()))
    except UsageError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted; run the same command again to continue", file=sys.stderr)
        sys.exit(130)
