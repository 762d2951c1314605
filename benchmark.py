"""Training-step throughput on the current device, and vectorised losses against
their per-sample loops.

    python benchmark.py                                   # resnet32, B=128, torch vs tensor loader
    python benchmark.py --models resnet32,resnet56 --amp none,bf16 --channels-last off,on \\
        --compile none,default
    python benchmark.py --losses-only

Training grid: every model x loader x amp x channels-last x compile cell trains
(train.build_optimizer's SGD: momentum 0.9, lr 0.1, wd 1e-4; cross-entropy on ``model(x)["logits"]``) for
``--warmup`` steps, then ``--windows`` windows of ``--steps-per-window`` steps
(defaults 5, then 5 x 5; on CPU 2, then 5 x 2); a window's rate is
steps * B / seconds (CUDA events on GPU, ``perf_counter`` on CPU; data loading
included), a cell's figure the median window. The baseline,
measured in the same run for every model, is eager fp32 with the torchvision
DataLoader path of train.py (``data.cifar_transforms`` on ``data.ArrayDataset``,
PIL per sample); every ratio is against it. ``tensor`` is ``data.TensorLoader``.
``plain`` is a hand-written loop for comparison, with no code of this project in it:
``torch.optim.SGD`` (its default implementation), ``zero_grad`` / ``backward`` /
``step``, on batches already on the device (no augmentation); each other cell's
``vs_plain`` is its rate over the plain cell of the same model, amp, channels-last
and compile setting. ``--image-size`` sets the random images' side (224: ResNet-34 at
ImageNet size, the model built for it).

CUDA-only cells (``--amp fp16``: autocast + ``torch.amp.GradScaler``; ``--compile
reduce-overhead`` / ``max-autotune``: CUDA graphs, with
``torch.compiler.cudagraph_mark_step_begin()`` before each step) are skipped with a
one-line reason on CPU, not failed. Without ``--data-path`` the cells time random
uint8 32x32 images (speed does not depend on pixel values).

Losses: each entry of ``LOSS_BENCHMARKS`` times the loss module's forward pass
against a per-sample Python loop written from the paper's equation, at
``--loss-batch-size`` (512), and reports the speed-up.

Writes ``<out>/benchmark-<device>.json`` (device: "cpu" or the GPU name, slugified):
strict JSON (null, never NaN / Infinity) with the device name, GPU memory (GiB, null on
CPU), torch / torchvision versions and CPU thread counts next to the timings.
"""
import argparse
import json
import os
import re
import statistics
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
import torchvision

import data
import losses
import models
import train
import utils

AMP_MODES = ("none", *utils.AMP_DTYPES)  # train.py's --amp choices
COMPILE_MODES = ("none", "default", "reduce-overhead", "max-autotune")
LOADERS = ("torch", "tensor", "plain")
BASELINE = {"loader": "torch", "amp": "none", "channels_last": "off", "compile": "none"}
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")  # torch.compile modes that record CUDA graphs
SYNTHETIC_IMAGES = 10000


# ----------------------------------------------------------------------------------
# Device and data
# ----------------------------------------------------------------------------------
def pick_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def device_slug(device):
    """ "cpu", or the GPU name in lower case with runs of other characters as "-"."""
    if device.type != "cuda":
        return device.type
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def gpu_memory_gib(device):
    """Total memory of the CUDA device in GiB (2 decimals), None on CPU."""
    if device.type != "cuda":
        return None
    return round(torch.cuda.get_device_properties(device).total_memory / 2 ** 30, 2)


def load_train_arrays(path, image_size=32):
    """x_train (N, H, W, 3) uint8 and y_train (N,) int64 from the npz at ``path``, or
    random images of side ``image_size`` when ``path`` is None (said on stdout): speed
    does not depend on pixel values."""
    if path is None:
        n = SYNTHETIC_IMAGES if image_size <= 64 else 1024  # 1024 x 224 px: 154 MB
        print(f"no --data-path: timing on {n} random uint8 {image_size}x{image_size} images "
              f"(speed does not depend on pixel values)", flush=True)
        rng = np.random.default_rng(0)
        return (rng.integers(0, 256, (n, image_size, image_size, 3), dtype=np.uint8),
                rng.integers(0, 10, n))
    arrays = np.load(path)
    return arrays["x_train"], arrays["y_train"].astype(np.int64)


def make_loader(kind, x, y, batch_size, workers, device, image_size=32):
    """(loader, sampler) for ``kind`` "torch" (as data.make_train_loader) or "tensor"."""
    transform = data.cifar_transforms("cifar", image_size, x.shape[1:3])[0]  # resized if stored otherwise
    train_set = data.ArrayDataset(x, y, [str(k) for k in range(10)], transform)
    sampler = data.ResumableSampler(len(train_set), seed=0)
    if kind == "tensor":
        loader = data.TensorLoader(train_set, batch_size, device, data.CIFAR_MEAN, data.CIFAR_STD, sampler, seed=0)
        return loader, sampler
    loader = torch.utils.data.DataLoader(
        data.PerSampleSeed(train_set), batch_size=batch_size, sampler=sampler, num_workers=workers,
        pin_memory=device.type == "cuda", drop_last=True, persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(0))
    return loader, sampler


def endless(loader, sampler):
    """Batches of epoch 0, 1, 2, ... without end."""
    epoch = 0
    while True:
        sampler.set_epoch(epoch)
        yield from loader
        epoch += 1


# ----------------------------------------------------------------------------------
# Training-step timing
# ----------------------------------------------------------------------------------
def skip_reason(device, amp, compile_mode):
    """Why a cell cannot run on ``device``, or None."""
    if amp == "fp16" and device.type != "cuda":
        return "needs CUDA (fp16 autocast + torch.amp.GradScaler); run on a GPU"
    if amp == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        return "this GPU has no bf16"
    if compile_mode in CUDA_GRAPH_MODES and device.type != "cuda":
        return f"needs CUDA (--compile {compile_mode} records CUDA graphs); run on a GPU"
    return None


def make_step(model, optimizer, device, amp, channels_last, compile_mode):
    """One SGD step on a batch; returns the function step(images, labels)."""
    dtype = utils.AMP_DTYPES.get(amp)  # None: no autocast
    scaler = torch.amp.GradScaler("cuda") if amp == "fp16" else None
    fmt = torch.channels_last if channels_last == "on" else torch.contiguous_format
    mark_step = compile_mode in CUDA_GRAPH_MODES  # a new CUDA-graph generation per step

    def step(images, labels):
        images = images.to(device, non_blocking=True).contiguous(memory_format=fmt)  # (B, 3, H, W)
        labels = labels.to(device, non_blocking=True)
        if mark_step:
            torch.compiler.cudagraph_mark_step_begin()
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(images)["logits"], labels)
        utils.backward_and_step(optimizer, loss, scaler)  # train.py's own step

    return step


def make_plain_loop(model, x, y, batch_size, device, amp, channels_last):
    """The hand-written comparison: a textbook loop with no code of this project, on
    batches already on the device (the first ones of the set, normalised once, no
    augmentation). Returns (step, batches)."""
    fmt = torch.channels_last if channels_last == "on" else torch.contiguous_format
    n = min(4, len(x) // batch_size) * batch_size                          # whole batches only (run_cell checks >= 1)
    images = torch.from_numpy(x[:n]).to(device).permute(0, 3, 1, 2).float().div(255)
    images = ((images - 0.5) / 0.25).contiguous(memory_format=fmt)          # (n, 3, H, W)
    labels = torch.from_numpy(y[:n]).to(device)
    batches = [(images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, n, batch_size)]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-4)
    dtype = utils.AMP_DTYPES.get(amp)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")     # the textbook fp16 loop

    def step(images, labels):
        optimizer.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
            loss = F.cross_entropy(model(images)["logits"], labels)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    def cycle():
        while True:
            yield from batches
    return step, cycle()


def time_windows(step, batches, batch_size, device, warmup, windows, steps_per_window):
    """img/s of each timed window, after ``warmup`` untimed steps."""
    for _ in range(warmup):
        step(*next(batches))
    rates = []
    for _ in range(windows):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps_per_window):
                step(*next(batches))
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000
        else:
            start = time.perf_counter()
            for _ in range(steps_per_window):
                step(*next(batches))
            seconds = time.perf_counter() - start
        rates.append(steps_per_window * batch_size / seconds)
    return rates


def run_cell(args, cell, arrays, device):
    """Build the model, optimizer and loader of one grid cell and time it."""
    torch.manual_seed(0)
    model = models.build_model(cell["model"], 10, image_size=args.image_size).to(device)
    if cell["channels_last"] == "on":
        model = model.to(memory_format=torch.channels_last)
    # train.py's own optimizer for these settings (fused where train.py uses it)
    optimizer = train.build_optimizer(argparse.Namespace(lr=0.1, momentum=0.9, wd=1e-4), model, None)
    if cell["compile"] != "none":
        model = torch.compile(model, mode=cell["compile"])
    model.train()
    if cell["loader"] == "plain":
        step, batches = make_plain_loop(model, *arrays, args.batch_size, device, cell["amp"], cell["channels_last"])
    else:
        loader, sampler = make_loader(cell["loader"], *arrays, args.batch_size, args.workers, device,
                                      args.image_size)
        step = make_step(model, optimizer, device, cell["amp"], cell["channels_last"], cell["compile"])
        batches = endless(loader, sampler)
    try:
        return time_windows(step, batches, args.batch_size, device, args.warmup, args.windows,
                            args.steps_per_window)
    finally:
        batches.close()  # shuts down DataLoader workers
        if cell["compile"] != "none":
            torch.compiler.reset()


def grid_cells(args):
    """Every requested cell, plus each model's baseline cell when not requested."""
    cells = []
    for name in args.models:
        requested = [{"model": name, "loader": loader, "amp": amp, "channels_last": cl, "compile": mode}
                     for loader in args.loaders for amp in args.amp
                     for cl in args.channels_last for mode in args.compile]
        baseline = {"model": name, **BASELINE}
        cells += ([] if baseline in requested else [baseline]) + requested
    for cell in cells:
        cell["baseline"] = cell == {"model": cell["model"], **BASELINE}
    return cells


def run_grid(args, device):
    arrays = load_train_arrays(args.data_path, args.image_size)
    if args.data_path is not None:
        args.image_size = arrays[0].shape[1]  # every cell at the stored size (the tensor cells cannot resize)
    results = []
    for cell in grid_cells(args):
        label = " ".join(f"{k}={cell[k]}" for k in ("model", "loader", "amp", "channels_last", "compile"))
        reason = skip_reason(device, cell["amp"], cell["compile"])
        if len(arrays[1]) < args.batch_size:  # no whole batch: the loaders would yield nothing
            reason = f"--batch-size {args.batch_size} is larger than the {len(arrays[1])} images"
        if reason is None:
            try:
                rates = run_cell(args, cell, arrays, device)
            except Exception as e:  # e.g. torch.compile without a working compiler
                reason = f"failed: {e.__class__.__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:200]
        if reason is not None:
            print(f"skip {label}: {reason}", flush=True)
            results.append({**cell, "skipped": reason})
            continue
        results.append({**cell, "img_per_s": [round(r, 2) for r in rates], "median": statistics.median(rates)})
        print(f"{label}: {statistics.median(rates):.1f} img/s (windows {', '.join(f'{r:.0f}' for r in rates)})",
              flush=True)
    for cell in results:
        base = next((c for c in results if c["model"] == cell["model"] and c["baseline"]), None)
        if "median" in cell and base is not None and "median" in base:
            cell["ratio"] = round(cell["median"] / base["median"], 3)
        plain = next((c for c in results if c["loader"] == "plain" and "median" in c and all(
            c[k] == cell[k] for k in ("model", "amp", "channels_last", "compile"))), None)
        if "median" in cell and plain is not None and cell is not plain:
            cell["vs_plain"] = round(cell["median"] / plain["median"], 3)
    return results


def print_table(results):
    print(f"\n{'model':<12} {'loader':<7} {'amp':<5} {'ch-last':<7} {'compile':<16} {'img/s':>9} {'ratio':>6} "
          f"{'vs plain':>8}")
    for c in results:
        head = f"{c['model']:<12} {c['loader']:<7} {c['amp']:<5} {c['channels_last']:<7} {c['compile']:<16}"
        if "skipped" in c:
            print(f"{head} skipped: {c['skipped']}")
        else:
            ratio = f"{c['ratio']:.2f}" if "ratio" in c else "-"
            vs_plain = f"{c['vs_plain']:.2f}" if "vs_plain" in c else "-"
            print(f"{head} {c['median']:>9.1f} {ratio:>6} {vs_plain:>8}{'  (baseline)' if c['baseline'] else ''}")


# ----------------------------------------------------------------------------------
# Losses: vectorised module vs per-sample loop from the equation
# ----------------------------------------------------------------------------------
def center_inputs(loss, batch_size, device, seed=0):
    """Features (B, d), labels (B,) and ``loss`` with N(0, 1) centers (K, d), on
    ``device``; the same numbers as Python lists for the naive loop."""
    K, d = loss.centers.shape
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(batch_size, d, generator=g), torch.randint(0, K, (batch_size,), generator=g)
    loss.centers.data.copy_(torch.randn(K, d, generator=g))
    return {"loss": loss.to(device), "x": x.to(device), "y": y.to(device),
            "x_list": x.tolist(), "y_list": y.tolist(), "c_list": loss.centers.detach().cpu().tolist()}


def contrastive_inputs(loss, batch_size, views, dim, device, num_classes=10, seed=0):
    """Unit-norm features (B, V, d) and labels (B,) for SupCon / PSC, with the
    flattened views (view-major per image) and prototypes as lists for the loop."""
    g = torch.Generator().manual_seed(seed)
    z = F.normalize(torch.randn(batch_size, views, dim, generator=g), dim=2)
    y = torch.randint(0, num_classes, (batch_size,), generator=g)
    inputs = {"loss": loss.to(device), "z": z.to(device), "y": y.to(device),
              "z_list": z.reshape(-1, dim).tolist(), "y_list": y.repeat_interleave(views).tolist()}
    if hasattr(loss, "prototypes"):
        inputs["p_list"] = loss.prototypes.detach().cpu().tolist()
    return inputs


# (name, make_inputs(B, device) -> inputs, vectorised(inputs) -> scalar tensor, naive(inputs) -> float)
LOSS_BENCHMARKS = [
    ("ContrastiveCenterLoss K=10 d=64 delta=1",
     lambda B, device: center_inputs(losses.ContrastiveCenterLoss(10, 64, delta=1.0), B, device),
     lambda i: i["loss"](i["x"], i["y"]),
     lambda i: losses.naive_contrastive_center(i["x_list"], i["y_list"], i["c_list"], 1.0)),
    ("CenterLoss K=10 d=64",
     lambda B, device: center_inputs(losses.CenterLoss(10, 64), B, device),
     lambda i: i["loss"](i["x"], i["y"]),
     lambda i: losses.naive_center(i["x_list"], i["y_list"], i["c_list"])),
    # d = 16, not the paper's 128, only to keep the O((2B)^2 d) Python loop near ten seconds
    ("SupConLoss V=2 d=16 tau=0.1",
     lambda B, device: contrastive_inputs(losses.SupConLoss(0.1), B, 2, 16, device),
     lambda i: i["loss"](i["z"], i["y"]),
     lambda i: losses.naive_supcon(i["z_list"], i["y_list"], 0.1)),
    ("PSCLoss K=10 M=1 d=128 tau=1",
     lambda B, device: contrastive_inputs(losses.PSCLoss(10, 128, 1.0), B, 2, 128, device),
     lambda i: i["loss"](i["z"], i["y"]),
     lambda i: losses.naive_psc(i["z_list"], i["y_list"], i["p_list"], 10, 1, 1.0)),
    ("PSCLoss (MPSC) K=10 M=4 d=128 tau=0.1",
     lambda B, device: contrastive_inputs(losses.PSCLoss(10, 128, 0.1, 4), B, 2, 128, device),
     lambda i: i["loss"](i["z"], i["y"]),
     lambda i: losses.naive_psc(i["z_list"], i["y_list"], i["p_list"], 10, 4, 0.1)),
]


def _timed(fn, inputs, device):
    """(seconds, result) of one call, the device synchronised around it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    start = time.perf_counter()
    result = fn(inputs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return time.perf_counter() - start, result


def run_loss_benchmarks(batch_size=512, device=torch.device("cpu"), repeats=10):
    """Forward-pass time of every ``LOSS_BENCHMARKS`` entry, vectorised (median of
    ``repeats`` after one warm-up call) and naive (one call when it takes over a
    second, else up to 3); with the relative difference of their values."""
    rows = []
    for name, make_inputs, vectorised, naive in LOSS_BENCHMARKS:
        inputs = make_inputs(batch_size, device)
        value = vectorised(inputs).item()  # warm-up
        fast = [_timed(vectorised, inputs, device)[0] for _ in range(repeats)]
        slow_time, want = _timed(naive, inputs, device)
        slow = [slow_time] + [_timed(naive, inputs, device)[0] for _ in range(2 if slow_time < 1 else 0)]
        row = {"name": name, "batch_size": batch_size, "vectorised_s": fast, "naive_s": slow,
               "speedup": statistics.median(slow) / statistics.median(fast),
               "rel_diff": abs(value - want) / max(abs(want), 1e-12)}
        print(f"{name}: vectorised {statistics.median(fast) * 1e3:.3f} ms, naive loop "
              f"{statistics.median(slow) * 1e3:.1f} ms -> {row['speedup']:.0f}x "
              f"(B={batch_size}, values differ by {row['rel_diff']:.1e} relative)", flush=True)
        rows.append(row)
    return rows


# ----------------------------------------------------------------------------------
def check_args(args, device):
    """One-line reason why the run cannot start, or None."""
    if device.type == "cuda" and not torch.cuda.is_available():
        return f"--device {args.device}: CUDA is not available here; pass --device cpu"
    if args.data_path is not None and not os.path.isfile(args.data_path):
        return (f"--data-path {args.data_path} not found; pass an npz with x_train, y_train, "
                f"or leave it out to time random images")
    return None


def device_info(device):
    """What the timings were taken on: device name, GPU memory, versions, threads."""
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else None
    return {"device": device_slug(device), "device_name": gpu or utils.cpu_name(), "gpu": gpu, "cpu": utils.cpu_name(),
            "gpu_memory_gib": gpu_memory_gib(device), "torch": torch.__version__,
            "torchvision": torchvision.__version__, "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count()}


def main(args):
    device = pick_device(args.device)
    problem = check_args(args, device)
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    # Fewer steps by default on CPU, where a resnet32 step at B=128 takes seconds:
    # the default run stays near 2 minutes on 2 cores.
    on_cpu = device.type == "cpu"
    torch.backends.cudnn.benchmark = True  # as train.py without --deterministic
    args.warmup = (2 if on_cpu else 5) if args.warmup is None else args.warmup
    args.steps_per_window = (2 if on_cpu else 5) if args.steps_per_window is None else args.steps_per_window
    info = device_info(device)
    memory = f", {info['gpu_memory_gib']} GiB" if info["gpu_memory_gib"] is not None else ""
    print(f"device {device} ({info['device_name']}{memory}), torch {info['torch']}, "
          f"torchvision {info['torchvision']}, {info['threads']} threads of {info['cpu_count']} CPUs", flush=True)
    report = {**info,
              "grid": {"models": args.models, "batch_size": args.batch_size, "image_size": args.image_size,
                       "loaders": args.loaders,
                       "amp": args.amp, "channels_last": args.channels_last, "compile": args.compile,
                       "warmup": args.warmup, "windows": args.windows,
                       "steps_per_window": args.steps_per_window, "workers": args.workers,
                       "data_path": args.data_path},
              "cells": [], "losses": []}
    if not args.losses_only:
        report["cells"] = run_grid(args, device)
        print_table(report["cells"])
    if not args.no_losses:
        print()
        report["losses"] = run_loss_benchmarks(args.loss_batch_size, device)
    os.makedirs(args.out, exist_ok=True)
    path = os.path.join(args.out, f"benchmark-{report['device']}.json")
    with open(path, "w") as f:
        f.write(json.dumps(utils.strict_json(report), indent=2, allow_nan=False) + "\n")
    print(f"wrote {path}")
    return 0


def _choices(allowed):
    def parse(text):
        items = [t.strip() for t in text.split(",") if t.strip()]
        bad = [t for t in items if allowed is not None and t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{text!r}: choose from {', '.join(allowed)}")
        return items
    return parse


def get_args_parser(add_help=True):
    parser = argparse.ArgumentParser(description="Training-step and loss throughput", add_help=add_help)
    parser.add_argument("--models", default="resnet32", type=_choices(models.MODEL_NAMES),
                        help="comma list of models.MODEL_NAMES")
    parser.add_argument("--batch-size", default=128, type=int)
    parser.add_argument("--image-size", default=32, type=int,
                        help="side of the random images and the model's input (with --data-path: the stored side)")
    parser.add_argument("--loaders", default="torch,tensor", type=_choices(LOADERS))
    parser.add_argument("--amp", default="none", type=_choices(AMP_MODES), help="none, bf16, fp16")
    parser.add_argument("--channels-last", default="off", type=_choices(("off", "on")))
    parser.add_argument("--compile", default="none", type=_choices(COMPILE_MODES))
    parser.add_argument("--warmup", default=None, type=int, help="untimed steps per cell (5; 2 on CPU)")
    parser.add_argument("--windows", default=5, type=int, help="timed windows per cell (median reported)")
    parser.add_argument("--steps-per-window", default=None, type=int, help="(5; 2 on CPU)")
    parser.add_argument("--data-path", default=None,
                        help="npz with x_train (N, H, W, 3) uint8, y_train (default: random uint8 images)")
    parser.add_argument("--workers", default=2, type=int, help="DataLoader workers of the torch loader")
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    parser.add_argument("--out", default="runs/benchmark", help="folder for benchmark-<device>.json")
    parser.add_argument("--loss-batch-size", default=512, type=int)
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--losses-only", action="store_true", help="skip the training grid")
    group.add_argument("--no-losses", action="store_true", help="skip the loss timings")
    return parser


if __name__ == "__main__":
    raise SystemExit(main(get_args_parser().parse_args()))
