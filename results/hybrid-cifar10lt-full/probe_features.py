"""Features, classifier or BatchNorm statistics? Test top-1 of a CIFAR-10-LT checkpoint read up to eight ways.

    python results/hybrid-cifar10lt-full/probe_features.py CHECKPOINT [CHECKPOINT ...] [--data-path NPZ]

For each checkpoint (the model in eval mode, fp32, un-augmented images):
  classifier        its own linear classifier, as evaluate.py reports it
  classifier - log prior   the same logits minus log(n_c / n) (post-hoc logit adjustment,
                    Menon et al. 2021, tau = 1, their default; nothing tuned): what
                    removing the training prior from the classifier gives
  NCM on r          nearest class mean, by cosine, on the backbone's embedding r (64-d):
                    every class one mean of its un-augmented training images, so the
                    tail counts as much as the head and no classifier is learned
  NCM on z          the same on the hybrid network's projection z (128-d), when there is one
then all four again after BatchNorm's running statistics are recomputed (plain average,
momentum None) over one epoch of the run's instance-sampled training batches, augmented as in
training: a hybrid's contrastive views, a CE run's only stream. And the own classifier's top-1
on the un-augmented training images (how well it fits them); for a hybrid, the control: its
classifier with the statistics re-estimated the same way over both streams as its running
statistics saw them: in one forward pass per step (runs pinned before 8a73f6f) or in one for
the views and one for the class-balanced CE batch (the code since).
For a hybrid-sc run also the floor of the SC loss (Eq. 3, mean over anchors) on its training
batches: an anchor's L_i is at least log |P(i)|, reached when its positives coincide and its
negatives are far; compare the log's `con` (how well the contrastive branch fits).
Each row: overall top-1, then many / medium / few (> 100, 20-100, < 20 training images).
Not in any paper: a diagnostic of ours; nothing here is chosen on the test set.
"""
import argparse
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, REPO)
import data  # noqa: E402
from train import HYBRID_LOSSES, build_model_from_args, get_args_parser  # noqa: E402
from utils import build_datasets_from_args, load_checkpoint, load_state_checked, train_loader_from_args  # noqa: E402


@torch.no_grad()
def outputs(model, dataset, normalize):
    """{"logits": (N, K), "embedding": (N, 64)[, "projection": (N, 128)]} and labels (N,)."""
    loader = data.make_test_loader(dataset, 500, 0, torch.device("cpu"), normalize=normalize)
    parts, labels = {}, []
    for images, y in loader:
        out = model(images)
        for key in ("logits", "embedding", "projection"):
            if key in out:
                parts.setdefault(key, []).append(out[key].float())
        labels.append(y)
    return {k: torch.cat(v) for k, v in parts.items()}, torch.cat(labels)


@torch.no_grad()
def reestimate_bn(model, batches):
    """Every BatchNorm's running mean / var recomputed as the plain average of its batch
    statistics over ``batches`` (momentum None), then eval mode."""
    for m in model.modules():
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
            m.reset_running_stats()
            m.momentum = None
    model.train()
    for images in batches:
        model(images)
    return model.eval()


def shared_pass(path):
    """Whether the run of checkpoint ``path`` put both hybrid streams through one forward pass:
    hybrid_step before 8a73f6f, judged by its folder's pinned_commit (results/run_long.sh);
    without one, the code here (a pass per branch)."""
    pin = os.path.join(os.path.dirname(os.path.abspath(path)), "pinned_commit")
    if not os.path.exists(pin):
        return False
    test = subprocess.run(["git", "-C", REPO, "merge-base", "--is-ancestor", "8a73f6f", open(pin).read().strip()])
    if test.returncode not in (0, 1):
        raise SystemExit(f"git cannot place the commit in {pin}")
    return test.returncode == 1


def training_stream(args, train_set, both=False, shared=True):
    """One epoch (epoch 0 of the run's seed) of its instance-sampled training batches as
    augmented in training: a hybrid's contrastive views (2B, 3, H, W), else (B, 3, H, W);
    ``both``: the class-balanced CE batches too, as the running statistics saw them:
    ``shared``, in the same forward pass as the views (2B + B, 3, H, W), else as a batch of
    their own after the views' (B, 3, H, W)."""
    hybrid = args.loss in HYBRID_LOSSES
    args = SimpleNamespace(**{**vars(args), "sampler": "instance"})  # a CE run's own sampler may differ
    loader, sampler = train_loader_from_args(args, train_set, torch.device("cpu"), hybrid)
    sampler.set_epoch(0)
    for batch in loader:
        if not hybrid:
            yield batch[0]
        else:
            (views, _), (ce_images, _) = batch
            if both and shared:
                yield torch.cat([views.flatten(0, 1), ce_images])
                continue
            yield views.flatten(0, 1)
            if both:
                yield ce_images


def row(pred, labels, groups, num_classes):
    """Overall top-1 and the many / medium / few mean per-class top-1 (%)."""
    per_class = [100.0 * (pred[labels == c] == c).double().mean().item() for c in range(num_classes)]
    shots = [sum(per_class[c] for c in groups[g]) / len(groups[g]) if groups[g] else None
             for g in ("many", "medium", "few")]
    return [100.0 * (pred == labels).double().mean().item(), *shots]


def ncm(train_feat, train_labels, test_feat, num_classes):
    """Nearest class mean by cosine: (N_test,) predicted classes."""
    train_feat, test_feat = F.normalize(train_feat, dim=1), F.normalize(test_feat, dim=1)
    means = torch.stack([train_feat[train_labels == c].mean(0) for c in range(num_classes)])   # (K, d)
    return (test_feat @ F.normalize(means, dim=1).t()).argmax(1)


def sc_floor(labels, batch_size, views=2, draws=200, seed=0):
    """Mean over random batches (drawn without replacement) of the mean over their
    views of log |P(i)| = log(views * n_c - 1), n_c the batch's images of the view's class."""
    rng = np.random.default_rng(seed)
    labels, floors = np.asarray(labels), []
    for _ in range(draws):
        n = np.bincount(rng.choice(labels, batch_size, replace=False))       # (K,) images per class
        anchors = views * n                                                   # (K,) views per class
        floors.append((anchors * np.log(np.maximum(anchors - 1, 1))).sum() / anchors.sum())
    return float(np.mean(floors))


def probe(path, data_path=None):
    """(checkpoint, its arguments, {read as: [top-1, many, medium, few]}): the four reads as
    trained, then with BN re-estimated, then "(training images)": the own classifier on
    the un-augmented training images, as trained (and "SC loss floor", a float, for SC)."""
    ckpt = load_checkpoint(path)
    args = SimpleNamespace(**{**vars(get_args_parser().parse_args([])), **ckpt["args"]})
    args.data_path = data_path or args.data_path
    train_set, test_set, num_classes = build_datasets_from_args(args)
    model = build_model_from_args(args, num_classes, load_weights=False)
    load_state_checked(model, ckpt["model"], path, args.model)
    model.eval()
    normalize = args.normalize or data.DEFAULT_NORMALIZE[args.dataset]
    counts = torch.bincount(torch.as_tensor(train_set.targets), minlength=num_classes)  # (K,)
    groups = data.shot_groups(counts.tolist(), args.many_threshold, args.few_threshold)
    log_prior = torch.log(counts.double() / counts.sum()).float()                        # (K,)
    table = {}
    for prefix in ("", "BN re-estimated: "):
        if prefix:
            reestimate_bn(model, training_stream(args, train_set))
        train_out, train_labels = outputs(model, train_set, normalize)
        test_out, test_labels = outputs(model, test_set, normalize)
        rows = {"classifier": test_out["logits"].argmax(1),
                "classifier - log prior": (test_out["logits"] - log_prior).argmax(1),
                "NCM on r": ncm(train_out["embedding"], train_labels, test_out["embedding"], num_classes)}
        if "projection" in test_out:
            rows["NCM on z"] = ncm(train_out["projection"], train_labels, test_out["projection"], num_classes)
        table.update({prefix + name: row(pred, test_labels, groups, num_classes) for name, pred in rows.items()})
        if not prefix:  # how well the model as trained fits its training images
            fit = row(train_out["logits"].argmax(1), train_labels, groups, num_classes)
    table["(training images)"] = fit
    if args.loss in HYBRID_LOSSES:  # the control: re-estimated the same way over both streams, as the run trained
        reestimate_bn(model, training_stream(args, train_set, both=True, shared=shared_pass(path)))
        table["BN re-estimated over both streams: classifier"] = row(
            outputs(model, test_set, normalize)[0]["logits"].argmax(1), test_labels, groups, num_classes)
    if args.loss == "hybrid-sc":
        table["SC loss floor"] = sc_floor(train_labels.numpy(), args.batch_size)
    return ckpt, args, table


def show(path, ckpt, args, table):
    print(f"{os.path.relpath(path, REPO)} (epoch {ckpt['epoch']}, iteration {ckpt['iteration']}, loss {args.loss}; fp32)")
    print(f"  {'read as':46s} {'top-1':>6s} {'many':>6s} {'medium':>6s} {'few':>6s}")
    for name, values in table.items():
        if name == "SC loss floor":
            print(f"  SC loss floor on its training batches of {args.batch_size}: {values:.3f} (compare the log's con)")
            continue
        print(f"  {name:46s} " + " ".join("     -" if v is None else f"{v:6.2f}" for v in values))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("checkpoints", nargs="+")
    p.add_argument("--data-path", help="where the training's data now is (default: as saved in the checkpoint)")
    args = p.parse_args()
    torch.set_grad_enabled(False)
    for path in args.checkpoints:
        show(path, *probe(path, args.data_path))


if __name__ == "__main__":
    main()
