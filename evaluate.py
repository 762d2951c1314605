"""Evaluate a checkpoint written by train.py, or plot its metrics.

    python evaluate.py --checkpoint runs/<name>/checkpoint.pth --json
    python evaluate.py --checkpoint runs/<name>/checkpoint.pth --plot

The checkpoint is loaded with ``torch.load(..., weights_only=True)``; the model and
the test split are rebuilt from the arguments saved in it (``--data-path`` overrides
where the data now lives). Reports top-1, top-5, class-balanced top-1 and per-class
top-1 (%) on the test split.
"""
import json
import os
import sys
from types import SimpleNamespace

import torch

import data
from train import (build_datasets_from_args, build_model_from_args, evaluate, load_checkpoint,
                   load_state_checked, make_test_loader, one_line, resolve_device)
from train import OneLineErrorParser, get_args_parser as train_args_parser


def _pyplot():
    """matplotlib.pyplot (headless), or None with one line when it is not installed."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed; skipping the plot (pip install matplotlib to enable it)")
        return None
    return plt


def plot_metrics(metrics_path, png_path):
    """Loss and accuracy curves from metrics.jsonl; needs matplotlib (optional)."""
    plt = _pyplot()
    if plt is None:
        return None
    with open(metrics_path) as f:
        rows = [json.loads(line) for line in f if line.strip()]
    epochs = [r["epoch"] + 1 for r in rows]
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r.get("train_loss") for r in rows], label="train loss")
    ax_loss.plot(epochs, [r.get("test_loss") for r in rows], label="test CE")
    ax_acc.plot(epochs, [r["test_top1"] for r in rows], label="test top-1")
    ax_acc.plot(epochs, [r["test_top5"] for r in rows], label="test top-5")
    for ax, label in ((ax_loss, "loss"), (ax_acc, "accuracy (%)")):
        ax.set_xlabel("epoch")
        ax.set_ylabel(label)
        ax.legend()
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    print(f"wrote {png_path}")
    return png_path


def plot_probe(csv_path):
    """Mean |grad| of every layer (averaged over the probe's iterations) against its
    depth, log scale, from train.py --probe-gradients; needs matplotlib."""
    plt = _pyplot()
    if plt is None:
        return None
    import csv
    per_layer = {}
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            per_layer.setdefault(row["layer"], []).append(float(row["mean_abs_grad"]))
    means = [sum(v) / len(v) for v in per_layer.values()]
    fig, ax = plt.subplots(figsize=(8, 4))
    ax.semilogy(range(len(means)), [max(m, 1e-30) for m in means], marker=".")
    ax.axhline(1e-7, color="gray", linestyle="--", label="1e-7 (paper's threshold)")
    ax.set_xlabel("layer (input to output)")
    ax.set_ylabel("mean |grad| of weights")
    ax.legend()
    png_path = os.path.splitext(csv_path)[0] + ".png"
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    print(f"wrote {png_path}")
    return png_path


def main(args):
    if args.probe:
        if not os.path.isfile(args.probe):
            raise data.DataError(f"{args.probe} not found: pass the gradient_probe.csv of a --probe-gradients run")
        plot_probe(args.probe)
        if not args.checkpoint:
            return 0
    if not args.checkpoint:
        raise data.DataError("pass --checkpoint runs/<name>/checkpoint.pth (or --probe CSV)")
    ckpt = load_checkpoint(args.checkpoint)
    if args.plot:
        metrics = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "metrics.jsonl")
        plot_metrics(metrics, os.path.splitext(metrics)[0] + ".png")
        return 0
    defaults = vars(train_args_parser().parse_args([]))  # for flags newer than the checkpoint
    train_args = SimpleNamespace(**{**defaults, **ckpt["args"]})
    train_args.download = False
    if args.data_path:
        train_args.data_path = args.data_path
    device = resolve_device(args.device)
    train_set, test_set, num_classes = build_datasets_from_args(train_args)
    train_counts = torch.bincount(torch.as_tensor(train_set.targets), minlength=num_classes).tolist()
    test_loader = make_test_loader(test_set, args.batch_size, args.workers, device)
    model = build_model_from_args(train_args, num_classes, load_weights=False)
    load_state_checked(model, ckpt["model"], args.checkpoint, train_args.model)
    result = evaluate(model.to(device), test_loader, device, num_classes, train_counts,
                      train_args.many_threshold, train_args.few_threshold)
    result["per_class"] = dict(zip(test_set.classes, result["per_class"]))
    result.update(checkpoint=args.checkpoint, epoch=ckpt["epoch"], iteration=ckpt["iteration"])
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.checkpoint} (epoch {ckpt['epoch']}, iteration {ckpt['iteration']}): "
              f"top1 {result['top1']:.2f} top5 {result['top5']:.2f} "
              f"balanced top1 {result['balanced_top1']:.2f} on {result['n']} test images")
        print("  many / medium / few-shot top1 (> {} / {}-{} / < {} training images): ".format(
              train_args.many_threshold, train_args.few_threshold, train_args.many_threshold,
              train_args.few_threshold)
              + " / ".join(f"{result[g + '_top1']:.2f}" for g in ("many", "medium", "few")))
        for name, acc in result["per_class"].items():
            print(f"  {name:30s} {acc:6.2f}")
    return 0


def get_args_parser(add_help=True):
    p = OneLineErrorParser(description=__doc__.split("\n\n")[0], add_help=add_help)
    p.add_argument("--checkpoint", help="checkpoint.pth written by train.py")
    p.add_argument("--probe", help="gradient_probe.csv of train.py --probe-gradients: plot it")
    p.add_argument("--data-path", help="where the test data lives now (default: as in training)")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", action="store_true", help="draw metrics.jsonl curves to PNG (matplotlib)")
    return p


if __name__ == "__main__":
    try:
        sys.exit(main(get_args_parser().parse_args()))
    except data.DataError as e:
        print(f"error: {one_line(e)}", file=sys.stderr)
        sys.exit(2)
