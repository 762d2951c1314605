"""Evaluate a checkpoint written by train.py, or plot its metrics.

    python evaluate.py --checkpoint runs/<name>/checkpoint.pth --json
    python evaluate.py --checkpoint runs/<name>/checkpoint.pth --plot
    python evaluate.py --checkpoint runs/<name>/checkpoint.pth --flip v --complexity --gradcam 8

The checkpoint is loaded with ``torch.load(..., weights_only=True)``; the model and
the test split are rebuilt from the arguments saved in it (``--data-path`` overrides
where the data now lives). Reports top-1, top-5, class-balanced top-1 and per-class
top-1 (%) on the test split; many / medium / few-shot top-1 when the training set
is long-tailed; every MKSMT head's top-1. ``--flip h|v`` evaluates on mirrored test
images, ``--complexity`` counts parameters and FLOPs against the plain backbone,
``--gradcam N`` writes Grad-CAM overlays per stage, for any checkpoint (PIL only).
"""
import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.nn.functional as F
from PIL import Image
from torch.utils.flop_counter import FlopCounterMode

import data
from train import build_model_from_args, evaluate, get_args_parser as train_args_parser
from utils import AT_LEAST_1, COUNT, SMALL_DATASETS, OneLineErrorParser, build_datasets_from_args, \
    load_checkpoint, load_state_checked, resolve_device, run_with_one_line_errors, \
    split_off_validation, stage_list, strict_json


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
    ax.axhline(1e-7, color="gray", linestyle="--", label="1e-7 (the paper's threshold; --probe-threshold may differ)")
    ax.set_xlabel("layer (input to output)")
    ax.set_ylabel("mean |grad| of weights")
    ax.legend()
    png_path = os.path.splitext(csv_path)[0] + ".png"
    fig.tight_layout()
    fig.savefig(png_path, dpi=100)
    print(f"wrote {png_path}")
    return png_path


# ----------------------------------------------------------------------------------
# MKSMT extras (Yu et al. 2023): Grad-CAM per stage, parameters / FLOPs
# ----------------------------------------------------------------------------------
def gradcam(model, images, stage):
    """Grad-CAM (Selvaraju et al. 2017, Eq. 1, 2) of one stage's feature map.

        alpha_k^c = 1/(H W) sum_{h,w} d y^c / d A^k_{h,w}          (Eq. 1; k a channel, c the class)
        L^c       = ReLU(sum_k alpha_k^c A^k)                      (Eq. 2)

    A = ``out["stages"][stage]``. y^c is the logit of the predicted class of the head
    that reads A (MKSMT's per-stage heads), or, for a stage no head reads, of the
    final classifier, differentiated through A (the usual Grad-CAM of an inner
    layer; a plain backbone's maps). L is upsampled bilinearly to the image size and
    min-max normalised per image to [0, 1] (an all-zero map stays 0).

    Args:
        model: ``forward(images)`` returns a dict with ``"stages"`` (list of (B, C, H, W))
            and ``"logits"``, optionally ``"head_logits"`` / ``"head_stages"``. Run in
            eval mode; the previous mode is restored.
        images: (B, 3, H_img, W_img).
        stage: index into ``out["stages"]``.
    Returns:
        cams (B, H_img, W_img) float in [0, 1], predictions (B,) int64 of the logits used.
    """
    was_training = model.training
    model.eval()
    try:
        with torch.enable_grad():
            out = model(images)
            A = out["stages"][stage]                                               # (B, C, h, w)
            head_stages = list(out.get("head_stages", []))
            logits = out["head_logits"][head_stages.index(stage)] if stage in head_stages else out["logits"]  # (B, K)
            predictions = logits.argmax(dim=1)                                     # (B,)
            score = logits.gather(1, predictions[:, None]).sum()  # samples are independent in eval mode
            (grad,) = torch.autograd.grad(score, A, allow_unused=True)
    finally:
        model.train(was_training)
    if grad is None:
        raise ValueError(f"the logits do not depend on out['stages'][{stage}]; Grad-CAM needs the map they are "
                         f"computed from")
    weights = grad.mean(dim=(2, 3))                                               # (B, C)  Eq. (1)
    cam = F.relu((weights[:, :, None, None] * A.detach()).sum(dim=1))             # (B, h, w)  Eq. (2)
    cam = F.interpolate(cam[:, None], size=images.shape[-2:], mode="bilinear", align_corners=False)[:, 0]
    low = cam.amin(dim=(1, 2), keepdim=True)
    span = cam.amax(dim=(1, 2), keepdim=True) - low
    cam = (cam - low) / span.clamp_min(1e-12)                                     # (B, H_img, W_img)
    return cam, predictions


def jet(values):
    """A jet-like colour map written out: blue (0) -> cyan -> green -> yellow -> red (1).
    values (...) in [0, 1] -> (..., 3) in [0, 1]."""
    v = values.clamp(0, 1)[..., None]
    centres = torch.tensor([0.75, 0.5, 0.25], dtype=v.dtype)  # where R, G, B peak
    return (1.5 - (4 * (v - centres)).abs()).clamp(0, 1)


def save_overlays(images_uint8, cams, path_prefix, alpha=0.5):
    """Write one PNG per image: (1 - alpha) * image + alpha * jet(cam).

    Args:
        images_uint8: (B, 3, H, W) uint8.
        cams: (B, H, W) in [0, 1] (``gradcam``'s output).
        path_prefix: files are ``{path_prefix}_{b:03d}.png``.
    Returns:
        list of the B paths.
    """
    folder = os.path.dirname(path_prefix)
    if folder:
        os.makedirs(folder, exist_ok=True)
    images = images_uint8.detach().cpu().permute(0, 2, 3, 1).float() / 255      # (B, H, W, 3)
    colours = jet(cams.detach().cpu().float())                                   # (B, H, W, 3)
    blended = ((1 - alpha) * images + alpha * colours) * 255
    paths = []
    for b in range(len(blended)):
        path = f"{path_prefix}_{b:03d}.png"
        Image.fromarray(blended[b].round().clamp(0, 255).to(torch.uint8).numpy()).save(path)
        paths.append(path)
    return paths


def complexity(model, image_size):
    """Parameters and FLOPs of one forward pass on a (1, 3, S, S) input (eval mode,
    no grad), counted by ``torch.utils.flop_counter.FlopCounterMode`` (a
    multiply-add counts 2; element-wise ops, norms and softmax are not counted).
    Returns {"params": int, "flops": int}."""
    was_training = model.training
    model.eval()
    parameter = next(model.parameters(), None)
    device = parameter.device if parameter is not None else "cpu"
    counter = FlopCounterMode(display=False)
    try:
        with torch.no_grad(), counter:
            model(torch.zeros(1, 3, image_size, image_size, device=device))
    finally:
        model.train(was_training)
    return {"params": sum(p.numel() for p in model.parameters()), "flops": int(counter.get_total_flops())}


def report_complexity(train_args, num_classes, image_size):
    """Parameters and FLOPs of the backbone alone (its own classifier) and of the
    trained model (e.g. with MKSMT's heads), with the relative overhead."""
    plain_args = SimpleNamespace(**{**vars(train_args), "loss": "ce", "deep_sup": [], "heads": None})
    backbone = build_model_from_args(plain_args, num_classes, load_weights=False)
    model = build_model_from_args(train_args, num_classes, load_weights=False)
    result = {"backbone": complexity(backbone, image_size), "model": complexity(model, image_size)}
    for key in ("params", "flops"):
        result[f"{key}_overhead_percent"] = 100.0 * (result["model"][key] / result["backbone"][key] - 1)
    return result


def write_gradcams(model, test_set, count, folder, normalize, device, stages=None):
    """Grad-CAM overlays of the first ``count`` test images at every stage of ``stages``
    (default: all): folder/stage{S}_{i:03d}.png. Works for any checkpoint: a stage
    with an MKSMT head uses that head's logits, any other the final classifier's."""
    images = torch.stack([test_set[i][0] for i in range(min(count, len(test_set)))]).to(device)
    mean, std = (torch.tensor(v, device=device)[:, None, None] for v in data.NORMALIZATIONS[normalize])
    pixels = ((images * std + mean) * 255).round().clamp(0, 255).to(torch.uint8)   # (N, 3, H, W)
    with torch.no_grad():
        num_stages = len(model.eval()(images[:1])["stages"])
    stages = stages if stages is not None else range(num_stages)
    for stage in stages:  # all checked before the first PNG is written
        if not 0 <= stage < num_stages:
            raise data.DataError(f"--gradcam-stages {stage}: this model has stages 0..{num_stages - 1}")
    paths = []
    for stage in stages:
        cams, _ = gradcam(model, images, stage)
        paths += save_overlays(pixels, cams, os.path.join(folder, f"stage{stage}"))
    return paths


def main(args):
    if args.probe:
        if not os.path.isfile(args.probe):
            raise data.DataError(f"{args.probe} not found: pass the gradient_probe.csv of a --probe-gradients run")
        plot_probe(args.probe)
        if not args.checkpoint:
            return 0
    if not args.checkpoint:
        raise data.DataError("pass --checkpoint runs/<name>/checkpoint.pth (or --probe CSV)")
    if args.gradcam_stages is not None and not (args.gradcam and args.gradcam_stages):
        raise data.DataError("--gradcam-stages needs --gradcam N (how many test images) and at least one stage")
    ckpt = load_checkpoint(args.checkpoint)
    if args.plot:
        metrics = os.path.join(os.path.dirname(os.path.abspath(args.checkpoint)), "metrics.jsonl")
        plot_metrics(metrics, os.path.splitext(metrics)[0] + ".png")
        return 0
    defaults = vars(train_args_parser().parse_args([]))  # for flags newer than the checkpoint
    train_args = SimpleNamespace(**{**defaults, **ckpt["args"]})
    train_args.download = args.download
    for name in ("many_threshold", "few_threshold"):  # regroup without retraining
        if getattr(args, name) is not None:
            setattr(train_args, name, getattr(args, name))
    if train_args.few_threshold > train_args.many_threshold:
        raise data.DataError(f"few threshold {train_args.few_threshold} is above many threshold "
                             f"{train_args.many_threshold}")
    trained_on = train_args.dataset
    if args.dataset and args.dataset != trained_on:  # another copy (official CIFAR-10 for a model trained on an npz)
        if (args.dataset in SMALL_DATASETS) != (trained_on in SMALL_DATASETS):
            raise data.DataError(f"--dataset {args.dataset} is not a copy of what the model trained on ({trained_on}): "
                                 f"32-px sets {', '.join(SMALL_DATASETS)} stand in for each other, the others likewise")
        train_args.dataset, train_args.data_path = args.dataset, args.data_path  # None: the dataset's default place
    elif args.data_path:
        train_args.data_path = args.data_path
    device = resolve_device(args.device)
    train_set, test_set, num_classes = build_datasets_from_args(train_args)
    classes = [str(c) for c in test_set.classes]
    if classes != ckpt.get("classes", classes) or num_classes != ckpt.get("num_classes", num_classes):
        learned = ckpt.get("classes", ["?"])
        raise data.DataError(f"the test data ({train_args.dataset}) has {num_classes} classes "
                             f"({', '.join(classes[:3])}, ...); the model learned {ckpt.get('num_classes')} "
                             f"({', '.join(learned[:3])}, ...)")
    train_counts = ckpt.get("train_counts")  # many / medium / few: what the model trained on
    if train_counts is None:  # a checkpoint older than that entry: count the training split now
        train_set, _ = split_off_validation(train_args, train_set, test_set)
        train_counts = torch.bincount(torch.as_tensor(train_set.targets), minlength=num_classes).tolist()
    test_loader = data.make_test_loader(test_set, args.batch_size, args.workers, device,  # on the device when it fits
                                        normalize=train_args.normalize or data.DEFAULT_NORMALIZE[train_args.dataset])
    model = build_model_from_args(train_args, num_classes, load_weights=False)
    load_state_checked(model, ckpt["model"], args.checkpoint, train_args.model)
    model.to(device)
    if args.gradcam:
        paths = write_gradcams(model, test_set, args.gradcam, args.gradcam_dir, train_args.normalize
                               or data.DEFAULT_NORMALIZE[train_args.dataset], device, args.gradcam_stages)
        print(f"wrote {len(paths)} Grad-CAM overlays to {args.gradcam_dir}")
    result = evaluate(model, test_loader, device, num_classes, train_counts,
                      train_args.many_threshold, train_args.few_threshold, flip=args.flip)
    result["flip"] = args.flip
    if args.complexity:
        small = train_args.dataset in SMALL_DATASETS
        result["complexity"] = report_complexity(train_args, num_classes,
                                                 train_args.image_size or (32 if small else 224))
    result["per_class"] = dict(zip(classes, result["per_class"]))
    result.update(checkpoint=args.checkpoint, dataset=train_args.dataset, data_path=train_args.data_path,
                  epoch=ckpt["epoch"], iteration=ckpt["iteration"], train_counts=dict(zip(classes, train_counts)),
                  many_threshold=train_args.many_threshold, few_threshold=train_args.few_threshold)
    if args.json:
        print(json.dumps(strict_json(result), allow_nan=False))
    else:
        print(f"{args.checkpoint} (epoch {ckpt['epoch']}, iteration {ckpt['iteration']}): "
              f"top1 {result['top1']:.2f} top5 {result['top5']:.2f} "
              f"balanced top1 {result['balanced_top1']:.2f} on {result['n']} test images of {result['dataset']}")
        if sum(result.get(g + "_top1") is not None for g in ("many", "medium", "few")) > 1:
            print("  many / medium / few-shot top1 (> {} / {}-{} / < {} training images): ".format(
                  train_args.many_threshold, train_args.few_threshold, train_args.many_threshold,
                  train_args.few_threshold)
                  + " / ".join("-" if result[g + "_top1"] is None else f"{result[g + '_top1']:.2f}"
                               for g in ("many", "medium", "few")))
        for name, acc in result["per_class"].items():
            print(f"  {name:30s} " + ("     -  (no test images)" if acc is None else f"{acc:6.2f}"))
        for key in sorted(k for k in result if k.startswith(("head_top1", "aux_top1"))):
            print(f"  {key}: {result[key]:.2f}")
        if args.flip:
            print(f"  (test images flipped: {'horizontally' if args.flip == 'h' else 'vertically'})")
        if args.complexity:
            c = result["complexity"]
            print(f"  params {c['backbone']['params']:,} -> {c['model']['params']:,} "
                  f"({c['params_overhead_percent']:+.1f}%), FLOPs {c['backbone']['flops']:,} -> "
                  f"{c['model']['flops']:,} ({c['flops_overhead_percent']:+.1f}%)")
    return 0


def get_args_parser(add_help=True):
    p = OneLineErrorParser(description=__doc__.split("\n\n")[0], add_help=add_help)
    p.add_argument("--checkpoint", help="checkpoint.pth written by train.py")
    p.add_argument("--probe", help="gradient_probe.csv of train.py --probe-gradients: plot it")
    p.add_argument("--data-path", help="where the test data lives now (default: as in training)")
    p.add_argument("--dataset", choices=data.DATASETS, help="test on another copy of the training's data, e.g. "
                   "cifar10 for a model trained on an npz copy of it (default: as in training); same classes required")
    p.add_argument("--download", action="store_true", help="fetch a CIFAR --dataset into --data-path if missing")
    p.add_argument("--device", default="auto")
    p.add_argument("--batch-size", type=AT_LEAST_1, default=256)
    p.add_argument("--workers", type=COUNT, default=2)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--plot", action="store_true", help="draw metrics.jsonl curves to PNG (matplotlib)")
    p.add_argument("--many-threshold", type=float,
                   help="many-shot: more training images than this (default: the training run's)")
    p.add_argument("--few-threshold", type=float,
                   help="few-shot: fewer training images than this (default: the training run's)")
    p.add_argument("--flip", choices=["h", "v"], help="evaluate on horizontally / vertically flipped test images")
    p.add_argument("--complexity", action="store_true",
                   help="parameters and FLOPs of the backbone alone vs the trained model (with its heads)")
    p.add_argument("--gradcam", type=COUNT, default=0, metavar="N",
                   help="write Grad-CAM overlays of N test images for every stage, or --gradcam-stages (any checkpoint)")
    p.add_argument("--gradcam-stages", type=stage_list, metavar="S[,S...]",
                   help="stages for --gradcam (default: all; e.g. 1,2,3 for Swin's S2, S3, S4)")
    p.add_argument("--gradcam-dir", default="gradcam", help="folder for the --gradcam PNGs")
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    return p


if __name__ == "__main__":
    sys.exit(run_with_one_line_errors(main, get_args_parser().parse_args()))
