"""Train a classifier on any backbone of models.py and dataset of data.py with softmax
CE, center loss, the joint CE + contrastive-center objective (Qi & Su 2017, Eq. 8),
the hybrid SC / PSC / MPSC + class-balanced CE objective (Wang et al. 2021), or MKSMT's
multi-step self-distillation (Yu et al. 2023); deep supervision with --deep-sup.

    python train.py --loss joint --model resnet34 --dataset lfw --data-path /path/to/lfw_top20
    python train.py --recipe seed001-cifar10 --download --amp bf16 --channels-last
    python train.py --recipe hybrid-sc-cifar10lt --download
    torchrun --nproc_per_node 2 train.py --recipe seed001-cifar10 --batch-size 64

Shaped after torchvision's references/classification/train.py: get_args_parser(),
main(args), train_one_epoch(), evaluate(). Writes to --output-dir:
    config.json      the resolved arguments (recipe + your flags)
    metrics.jsonl    one JSON object per evaluation
    checkpoint.pth   a plain dict (model, criterion, optimizer, scheduler, epoch,
                     iteration, progress, rng, args), loadable with
                     torch.load(weights_only=True); --resume auto continues it exactly
The reported result is the last evaluation, never the best one on the test set.
"""
import argparse
import builtins
import contextlib
import datetime
import json
import math
import os
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

import data
import losses
import models

# Paper hyper-parameters per recipe (README.md, Equations); explicit flags override.
RECIPES = {
    # Seed 001, Sec. 3.2: batch 128, momentum 0.9, L2 1e-4, lr 0.01 for 500 iterations
    # then 0.1, /10 at 32k, 48k and 64k iterations, stop at 80k; pixels x*2/255-1.
    "seed001-cifar10": dict(
        model="resnet32", block="preact", shortcut="B", dataset="cifar10", normalize="seed001",
        loss="ce", batch_size=128, lr=0.1, momentum=0.9, wd=1e-4, warmup_iters=500,
        warmup_lr=0.01, iters=80000, milestones=[32000, 48000, 64000], milestone_unit="iter"),
    # Seed 000, LFW top-20: RandomResizedCrop 224 + flip, 300 epochs, lr 0.01, batch 64,
    # lambda 1, delta 1, center lr 0.5.
    # not in the paper: momentum 0.9, weight decay 5e-4, constant lr (no milestones given).
    "lfw-joint": dict(
        model="resnet34", dataset="lfw", image_size=224, loss="joint", epochs=300, lr=0.01,
        batch_size=64, momentum=0.9, wd=5e-4, milestones=[], lam=1.0, delta=1.0, center_lr=0.5),
    # Seed 000, CUB first 100 classes, 8:2 split: lr 0.1, x0.1 at epochs 50, 150, 250.
    # not in the paper: 300 epochs (as for LFW), batch 64, momentum 0.9, weight decay 5e-4.
    "cub-joint": dict(
        model="resnet34", dataset="cub", cub_classes=100, image_size=224, loss="joint",
        epochs=300, lr=0.1, batch_size=64, momentum=0.9, wd=5e-4, milestones=[50, 150, 250],
        lam=1.0, delta=1.0, center_lr=0.5),
}
# Seed 003, long-tailed CIFAR: ResNet-32, batch 512, SGD momentum 0.9, wd 1e-4, lr 0.5,
# 200 epochs, x0.1 at 120 and 160, alpha = 1 - (t/T)^2; tau 0.1 for SC, 1 (CIFAR-10) or
# 0.1 (CIFAR-100) for PSC. iNaturalist 2018: ResNet-50 at 224, batch 100, lr 0.05,
# 100 epochs, x0.1 at 60 and 80, alpha = 1 - t/T, tau 0.1.
# not in the paper: beta = 100 in the recipes (the paper reports 100 / 50 / 10; pass
# --imbalance-ratio), the 128-d projection width as in SupContrast, iNat with SC.
_HYBRID_CIFAR = dict(model="resnet32", imbalance_ratio=100.0, batch_size=512, lr=0.5, momentum=0.9,
                     wd=1e-4, epochs=200, milestones=[120, 160], alpha_schedule="parabolic")
RECIPES.update({
    "hybrid-sc-cifar10lt": dict(_HYBRID_CIFAR, dataset="cifar10", loss="hybrid-sc", tau=0.1),
    "hybrid-psc-cifar10lt": dict(_HYBRID_CIFAR, dataset="cifar10", loss="hybrid-psc", tau=1.0),
    "hybrid-sc-cifar100lt": dict(_HYBRID_CIFAR, dataset="cifar100", loss="hybrid-sc", tau=0.1),
    "hybrid-psc-cifar100lt": dict(_HYBRID_CIFAR, dataset="cifar100", loss="hybrid-psc", tau=0.1),
    "hybrid-inat": dict(model="resnet50", dataset="inat", image_size=224, loss="hybrid-sc", tau=0.1,
                        batch_size=100, lr=0.05, momentum=0.9, wd=1e-4, epochs=100, milestones=[60, 80],
                        alpha_schedule="linear"),
})
HYBRID_LOSSES = ("hybrid-sc", "hybrid-psc", "hybrid-mpsc")
# Seed 002 (MKSMT): Swin-L with ImageNet-22K weights (--weights, the official release, e.g.
# swin_large_patch4_window7_224_22k.pth), OPM heads on S3 and S4, two-step training,
# decision distillation with T = 1, lambda1 = lambda2 = 1.
# not in the paper: the seed's Tables 2 and 3 (pre-processing and the other
# hyper-parameters) are images that are not in the text, so image size 224 (the window-7
# 22K release), batch 16, SGD lr 0.005 momentum 0.9, wd 5e-4, 50 epochs, x0.1 at 30 and 40
# are our choices.
_MKSMT = dict(model="swin_l", loss="mksmt", image_size=224, multistep=2, kd="decision", temperature=1.0,
              lambda1=1.0, lambda2=1.0, batch_size=16, lr=0.005, momentum=0.9, wd=5e-4, epochs=50,
              milestones=[30, 40])
RECIPES.update({
    "mksmt-cub": dict(_MKSMT, dataset="cub"),
    "mksmt-nabirds": dict(_MKSMT, dataset="nabirds"),
    "mksmt-dogs": dict(_MKSMT, dataset="dogs"),
})


# ----------------------------------------------------------------------------------
# Building blocks shared with evaluate.py
# ----------------------------------------------------------------------------------
def build_datasets_from_args(args):
    return data.build_datasets(
        args.dataset, args.data_path, download=args.download, image_size=args.image_size,
        normalize=args.normalize, lfw_top_k=args.lfw_top_k, cub_classes=args.cub_classes,
        split_seed=args.split_seed, skip_corrupt=getattr(args, "skip_corrupt", False),
        imbalance_ratio=getattr(args, "imbalance_ratio", None))


def split_off_validation(args, train_set, test_set):
    """(training part, validation part or None): ``--val-split`` held out of the
    training set with the test set's transform; the only set to select on."""
    if not getattr(args, "val_split", 0):
        return train_set, None
    return data.validation_split(train_set, args.val_split, args.split_seed, test_set.transform)


def build_model_from_args(args, num_classes, load_weights=True):
    return models.build_model(
        args.model, num_classes, image_size=args.image_size or 32, block=args.block,
        shortcut=args.shortcut, pretrained=args.pretrained and load_weights,
        weights=args.weights if load_weights else None, plain_init=args.plain_init,
        deep_sup=args.deep_sup, aux_dropout=args.aux_dropout,
        projection_dim=args.projection_dim if args.loss in HYBRID_LOSSES else 0,
        heads=args.heads if args.loss == "mksmt" else (), head_width=args.head_width)


def build_criterion(args, num_classes, feat_dim):
    """CE (None), the joint objective of Eq. 8 with a (contrastive-)center loss, or
    the hybrid network's objective with an SC / PSC / MPSC contrastive term."""
    if args.loss in ("ce", "mksmt"):
        return None
    if args.loss == "hybrid-sc":
        return losses.HybridLoss(losses.SupConLoss(args.tau))
    if args.loss in ("hybrid-psc", "hybrid-mpsc"):
        return losses.HybridLoss(losses.PSCLoss(
            num_classes, args.projection_dim, args.tau, args.num_prototypes,
            args.psc_include_positive, args.prototype_weights))
    if args.loss == "joint":
        center = losses.ContrastiveCenterLoss(num_classes, feat_dim, args.delta, args.ctc_reduction)
    else:
        center = losses.CenterLoss(num_classes, feat_dim, args.ctc_reduction, args.center_update)
    return losses.JointSupervisionLoss(center, args.lam)


def compute_loss(criterion, out, labels, aux_weight=0.0, alpha=None):
    """-> (loss, {name: detached part}) for one batch of model output: CE or the
    joint objective, plus alpha_t times the auxiliary CE terms with --deep-sup.
    For the hybrid losses ``out`` is the output on [contrastive views; CE batch]
    and ``labels`` is (contrastive labels (B,), CE labels (B',))."""
    if isinstance(criterion, losses.HybridLoss):
        con_labels, labels = labels
        n_views = 2 * len(con_labels)
        projections = out["projection"][:n_views].view(len(con_labels), 2, -1)   # (B, 2, 128)
        loss, parts = criterion(projections, con_labels, out["logits"][n_views:], labels, alpha)
        out = {**out, "aux_logits": [a[n_views:] for a in out.get("aux_logits", [])]}
    elif criterion is None:
        loss = F.cross_entropy(out["logits"], labels)
        parts = {"ce": loss.detach()}
    else:
        loss, parts = criterion(out["logits"], out["embedding"], labels)
    if out.get("aux_logits"):
        loss, aux_parts = losses.deep_supervision_loss(loss, out["aux_logits"], labels, aux_weight)
        parts = {**parts, **aux_parts}
    return loss, parts


def to_float32(out):
    """``out`` (a model's dict of tensors and lists of tensors) with every
    floating tensor in fp32: what autocast left in bf16 / fp16 is cast up, so
    the loss that follows is computed in fp32."""
    if isinstance(out, dict):
        return {k: to_float32(v) for k, v in out.items()}
    if isinstance(out, (list, tuple)):
        return type(out)(to_float32(v) for v in out)
    return out.float() if torch.is_tensor(out) and out.is_floating_point() else out


def batch_top1(out, labels):
    """Top-1 (%) of the final head on this batch's CE images, a 0-dim tensor left on
    the device (no sync): logged as train_top1, the epoch's running mean over the
    augmented training batches, as torchvision's reference logs acc1. For the hybrid
    losses ``out`` holds [contrastive views; CE batch] and ``labels`` is
    (contrastive labels (B,), CE labels (B',)); only the CE batch counts."""
    logits = out["logits"]                                  # (B, K) or (2B + B', K)
    if isinstance(labels, (tuple, list)):
        con_labels, labels = labels
        logits = logits[2 * len(con_labels):]               # (B', K)
    return (logits.argmax(dim=1) == labels).float().mean().detach() * 100.0


def build_optimizer(args, model, criterion):
    """SGD over the network; the class centers get their own group: lr --center-lr
    (0.5), no weight decay, momentum --center-momentum (0: the papers' plain SGD).
    PSC prototypes get the network's lr, momentum and schedule, without weight
    decay (not in the paper: the seed does not say how prototypes are learned)."""
    groups = [{"params": list(model.parameters()), "weight_decay": args.wd, "lr": args.lr}]
    if isinstance(criterion, losses.HybridLoss):
        if list(criterion.parameters()):
            groups.append({"params": list(criterion.parameters()), "weight_decay": 0.0, "lr": args.lr})
    elif criterion is not None:
        groups.append({"params": list(criterion.parameters()), "weight_decay": 0.0,
                       "lr": args.center_lr, "momentum": args.center_momentum})
    device = groups[0]["params"][0].device
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, fused=fused_sgd_works(device))
    init_momentum_buffers(optimizer)
    return optimizer


def fused_sgd_works(device):
    """True where torch has a fused SGD kernel for ``device`` (CPU and CUDA in recent
    torch). Its step reads a device flag (``found_inf``) and leaves everything
    untouched when it is set, so a non-finite loss is skipped without the host
    ever reading the loss (see ``update``)."""
    p = torch.zeros(1, device=device, requires_grad=True)
    p.grad = torch.zeros(1, device=device)
    try:
        torch.optim.SGD([p], lr=0.1, momentum=0.9, fused=True).step()
        return True
    except (RuntimeError, ValueError):
        return False


def init_momentum_buffers(optimizer):
    """Give every parameter with momentum a zero momentum buffer before its first step.
    SGD with dampening 0 then computes buf = 0.9 * 0 + g = g on the first step, the
    same as when it creates the buffer itself; but a first step that the fused kernel
    skips (``found_inf``) would otherwise leave an uninitialised buffer behind."""
    for group in optimizer.param_groups:
        if group["momentum"] != 0:
            for p in group["params"]:
                optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p, memory_format=torch.preserve_format))


def build_scheduler(args, optimizer, iters_per_epoch):
    """Per-iteration schedule: ``--warmup-iters`` at ``--warmup-lr``, then ``--lr``
    multiplied by ``--gamma`` at each milestone (seed 001: 0.01 for 500 iterations,
    0.1, /10 at 32k/48k/64k). The centers' lr stays constant unless
    ``--center-lr-schedule`` (our choice: the paper gives them a fixed 0.5)."""
    scale = 1 if args.milestone_unit == "iter" else iters_per_epoch
    milestone_iters = [m * scale for m in args.milestones]

    def network_factor(iteration):
        if iteration < args.warmup_iters:
            return args.warmup_lr / args.lr
        return args.gamma ** sum(iteration >= m for m in milestone_iters)

    factors = [network_factor]
    if len(optimizer.param_groups) > 1:
        scheduled = args.center_lr_schedule or args.loss in HYBRID_LOSSES
        factors.append(network_factor if scheduled else (lambda iteration: 1.0))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


class StopTraining(Exception):
    """Raised between two steps: a signal asked us to stop, or the loss went
    non-finite. Carries the exit code."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


def seed_everything(seed, deterministic=False):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace for deterministic matmuls (CUDA >= 10.2).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def rng_states():
    """Every global RNG the training step may draw from (dropout, stochastic depth),
    as tensors / plain Python values so the checkpoint loads with weights_only."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                      "has_gauss": has_gauss, "cached_gaussian": cached_gaussian},
            "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}


def set_rng_states(states):
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(state, path):
    """Atomic: write a temporary file in the same folder, fsync, then rename, so a
    kill at any moment leaves either the old or the new checkpoint, never a torn one."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def load_checkpoint(path):
    """torch.load(weights_only=True) with one-line errors for a missing, truncated
    or foreign file."""
    if not os.path.isfile(path):
        raise data.DataError(f"checkpoint {path} not found: pass --checkpoint/--resume runs/<name>/checkpoint.pth")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
        raise data.DataError(f"cannot load checkpoint {path}: truncated or not a torch file ({reason})") from None
    lacking = [k for k in ("model", "iteration", "args") if not isinstance(ckpt, dict) or k not in ckpt]
    if lacking:
        raise data.DataError(f"{path} is not a train.py checkpoint: it has no {', '.join(lacking)}")
    return ckpt


def load_state_checked(module, state, path, what):
    """load_state_dict, but a mismatch is one line naming the keys that do not fit."""
    own = module.state_dict()
    problems = {"missing": [k for k in own if k not in state],
                "unexpected": [k for k in state if k not in own],
                "wrong shape": [k for k in own if k in state and state[k].shape != own[k].shape]}
    if any(problems.values()):
        raise data.DataError(f"checkpoint {path} does not fit this {what}: " + "; ".join(
            f"{len(keys)} {kind} (e.g. {', '.join(keys[:3])})" for kind, keys in problems.items() if keys))
    module.load_state_dict(state)


# ----------------------------------------------------------------------------------
# Train / evaluate
# ----------------------------------------------------------------------------------
def prepare_batch(batch, device, channels_last=False):
    """-> (images, labels) on ``device``. A hybrid batch ((views (B, 2, 3, H, W),
    labels (B,)), (images (B', 3, H, W), labels (B',))) becomes one input of
    2B + B' images, so both branches share one forward pass (not in the paper:
    one pass, hence shared BN batch statistics), and a pair of label tensors."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    if isinstance(batch[0], (list, tuple)):
        (views, con_labels), (ce_images, ce_labels) = batch
        images = torch.cat([views.flatten(0, 1), ce_images])                 # (2B + B', 3, H, W)
        return (images.to(device, non_blocking=True, memory_format=memory_format),
                (con_labels.to(device, non_blocking=True), ce_labels.to(device, non_blocking=True)))
    images, labels = batch
    return (images.to(device, non_blocking=True, memory_format=memory_format),
            labels.to(device, non_blocking=True))


def update(optimizer, loss, scaler=None):
    """One optimizer step on ``loss``, applied only when ``loss`` is finite. Returns
    a 0-dim bool tensor on the loss's device: True if the step was applied.

    The host never reads ``loss`` here: with the fused SGD of ``build_optimizer``
    a non-finite loss sets the kernel's ``found_inf`` flag on the device, and the
    step leaves parameters, momentum buffers and centers untouched. With
    ``--amp fp16`` the GradScaler does the same (a non-finite loss gives non-finite
    gradients, which it skips, halving its scale). Only an optimizer without a
    fused kernel (e.g. on MPS) falls back to one host check per step.
    Gradients are set to None first, so parameters that ``loss`` does not reach
    have no gradient and SGD leaves them, their weight decay and their momentum
    buffers untouched."""
    optimizer.zero_grad(set_to_none=True)
    finite = torch.isfinite(loss.detach())                                  # (), bool, on the device
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return finite
    if not optimizer.defaults.get("fused"):
        if finite:  # a device sync: only without a fused kernel
            loss.backward()
            optimizer.step()
        return finite
    loss.backward()
    optimizer.found_inf = (~finite).float()   # read by the fused kernel on the device
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf
    return finite


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(args, device_type):
    """torch.autocast for ``--amp bf16|fp16``; a no-op context for ``--amp none``."""
    if getattr(args, "amp", "none") == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=AMP_DTYPES[args.amp])


def distillation(out, args):
    """Sum of the KD terms from the deepest head (teacher, S4) to every shallower
    computed head (students): decision KD (``losses.kd_loss``, Eq. 2/6) or
    feature KD (``losses.feature_kd_loss``)."""
    teacher_logits, teacher_feature = out["head_logits"][-1], out["head_features"][-1]
    if args.kd == "feature":
        return sum(losses.feature_kd_loss(f, teacher_feature, not args.kd_no_detach)
                   for f in out["head_features"][:-1])
    return sum(losses.kd_loss(z, teacher_logits, args.temperature, not args.kd_no_detach, not args.kd_no_t2)
               for z in out["head_logits"][:-1])


def mksmt_step(model, optimizer, images, labels, args, scaler=None):
    """MKSMT's per-batch multi-step training (Yu et al. 2023, Algorithm 2).

    With heads on stages h_1 < ... < h_n (default S3, S4):
      --multistep 2 or 3 (n steps): for each shallower head h_i in turn, run the
        network only up to h_i, take CE(h_i) and one optimizer step, which moves
        S1..h_i and that head only (Eq. 3). Then run the whole network and step on
            L_total = lambda1 * CE(h_n) + lambda2 * sum_i KD(h_n -> h_i)      (Eq. 5-7)
      --multistep 1: one step on sum_i CE(h_i) + lambda1 * CE(h_n) + lambda2 * KD.
      --kd none drops the KD term (the "multi-step without KD" ablation).
      --kd-exec async (our reading of "asynchronous"): the last step is split in two
        updates, lambda1 * CE(h_n), then a new forward pass and lambda2 * KD.
    Every step runs, and each is a no-op on the device when its own loss is
    non-finite (``update``). Returns (last step's loss, {name: detached term},
    a 0-dim bool tensor: all steps finite).
    """
    heads, parts, amp = args.heads, {}, lambda: autocast(args, images.device.type)
    finite = torch.ones((), dtype=torch.bool, device=images.device)
    if args.multistep > 1:
        for stage in heads[:-1]:
            with amp():
                out = model(images, upto=stage)
                ce = F.cross_entropy(out["logits"], labels)                   # Eq. (3)
            parts[f"ce_s{stage}"] = ce.detach()
            finite = finite & update(optimizer, ce, scaler)
    with amp():
        out = model(images)
        ce_last = F.cross_entropy(out["logits"], labels)
        kd = distillation(out, args) if args.kd != "none" else ce_last.new_zeros(())
    parts[f"ce_s{heads[-1]}"] = ce_last.detach()
    parts["kd"] = kd.detach()
    if args.multistep == 1:
        with amp():
            shallow = sum(F.cross_entropy(z, labels) for z in out["head_logits"][:-1])
        for stage, z in zip(heads[:-1], out["head_logits"][:-1]):
            parts[f"ce_s{stage}"] = F.cross_entropy(z.detach().float(), labels)
        loss = shallow + args.lambda1 * ce_last + args.lambda2 * kd
    elif args.kd_exec == "async" and args.kd != "none":
        finite = finite & update(optimizer, args.lambda1 * ce_last, scaler)
        with amp():
            kd = distillation(model(images), args)
        parts["kd"] = kd.detach()
        loss = args.lambda2 * kd
    else:
        loss = args.lambda1 * ce_last + args.lambda2 * kd                     # Eq. (7)
    return loss, parts, finite & update(optimizer, loss, scaler)


class StepMeter:
    """The epoch's loss sums and the non-finite guard, kept on the device: a step adds
    to them without the host reading anything (a ``.item()`` per term per step
    would make the host wait for the GPU several times per iteration). ``read()``
    copies everything to the host in one transfer; the trainer calls it once per
    ``--print-freq`` window, at the end of the epoch and before a checkpoint.

    sums: {name: float} and count: the epoch so far (a resumed epoch's progress);
    nonfinite: non-finite steps since the run started; iteration: the global
    iteration of the next step."""

    def __init__(self, device, iteration, sums=None, count=0, nonfinite=0):
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        self.names = list(sums or {})
        self.sums = torch.tensor([sums[k] for k in self.names], dtype=self.dtype, device=device)   # (T,)
        self.count = torch.tensor(float(count), dtype=self.dtype, device=device)
        self.nonfinite = torch.tensor(float(nonfinite), dtype=self.dtype, device=device)
        self.iteration = torch.tensor(float(iteration), dtype=self.dtype, device=device)
        self.first_bad = torch.tensor(-1.0, dtype=self.dtype, device=device)   # not yet reported
        self.bad_terms = torch.zeros(len(self.names), dtype=torch.bool, device=device)

    def add(self, loss, parts, finite):
        """loss, parts' values: 0-dim tensors; finite: 0-dim bool (the step applied)."""
        names = ["loss", *parts]
        if names != self.names:
            if self.names:
                raise RuntimeError(f"loss terms changed within an epoch: {self.names} -> {names}")
            self.names = names
            self.sums = self.sums.new_zeros(len(names))
            self.bad_terms = self.bad_terms.new_zeros(len(names))
        values = torch.stack([loss.detach().to(self.dtype)] + [v.to(self.dtype) for v in parts.values()])  # (T,)
        bad = ~finite
        self.sums += torch.where(finite, values, 0.0)       # a skipped step adds nothing
        self.count += finite
        self.nonfinite += bad
        self.bad_terms |= bad & ~torch.isfinite(values)
        self.first_bad = torch.where(bad & (self.first_bad < 0), self.iteration, self.first_bad)
        self.iteration += 1

    def read(self):
        """One device-to-host copy -> {"sums": {name: float}, "count": int,
        "nonfinite": int, "first_bad": int or None, "bad_terms": [names]}."""
        flat = torch.cat([self.sums, torch.stack([self.count, self.nonfinite, self.first_bad]),
                          self.bad_terms.to(self.dtype)]).tolist()
        T = len(self.names)
        count, nonfinite, first_bad = flat[T:T + 3]
        return {"sums": dict(zip(self.names, flat[:T])), "count": int(count), "nonfinite": int(nonfinite),
                "first_bad": int(first_bad) if first_bad >= 0 else None,
                "bad_terms": [n for n, b in zip(self.names, flat[T + 3:]) if b and n != "loss"]}

    def reported(self):
        """Forget the non-finite steps just reported (device ops only)."""
        self.first_bad.fill_(-1.0)
        self.bad_terms.zero_()


def check_steps(meter, state, args):
    """Read ``meter`` (one device sync) into ``state``. Non-finite steps since the last
    check: stop with exit code 3 when there are more than ``--skip-nonfinite`` in
    the run, else warn. Those steps changed nothing (``update``); the steps after
    them did apply. Called before every checkpoint, so no checkpoint is written
    after a non-finite step that stops the run: the last good one stays."""
    r = meter.read()
    state["epoch_sums"], state["epoch_count"] = r["sums"], r["count"]
    new = r["nonfinite"] - state["skipped_nonfinite"]
    if new > 0:
        where = (f"non-finite loss ({', '.join(r['bad_terms']) or 'total'}) at iteration {r['first_bad']}"
                 + (f" and {new - 1} more step(s) since" if new > 1 else ""))
        if r["nonfinite"] > args.skip_nonfinite:
            raise StopTraining(f"{where}; stopped, the last good checkpoint stays on disk "
                               f"(lower --lr / --center-lr, or pass --skip-nonfinite K)", 3)
        state["skipped_nonfinite"] = r["nonfinite"]
        meter.reported()
        print(f"warning: {where}; skipped, nothing applied ({r['nonfinite']}/{args.skip_nonfinite})", flush=True)
    return {k: v / max(r["count"], 1) for k, v in r["sums"].items()}


def train_one_epoch(model, criterion, optimizer, scheduler, loader, device, epoch, state, args, save,
                    scaler=None):
    """Run ``loader`` (the rest of the epoch when resumed) until the epoch or
    ``state["total_iters"]`` ends. ``state`` carries the global iteration, the
    epoch's loss sums so far and the stop flag; ``save()`` writes a mid-epoch
    checkpoint. No step waits for the host: the loss sums and the non-finite
    guard stay on the device (``StepMeter``) and are read once per
    ``--print-freq`` window. A non-finite step is skipped on the device and
    reported up to --print-freq - 1 iterations later. Returns the epoch's mean
    loss parts."""
    model.train()
    if criterion is not None:
        criterion.train()
    meter = StepMeter(device, state["iteration"], state["epoch_sums"], state["epoch_count"],
                      state["skipped_nonfinite"])
    window_start, window_images = time.time(), 0
    means, read_at = None, None  # the last read of the meter, and the iteration it was taken at
    for batch in loader:
        if args.compile in ("reduce-overhead", "max-autotune"):
            torch.compiler.cudagraph_mark_step_begin()  # CUDA graphs: the previous step's outputs may be reused
        images, labels = prepare_batch(batch, device, args.channels_last)
        if args.loss == "mksmt":
            loss, parts, finite = mksmt_step(model, optimizer, images, labels, args, scaler)
        else:
            with autocast(args, device.type):
                out = model(images)
            # the losses run in fp32 outside autocast: under it the SupCon / PSC similarity matmul
            # would run in bf16 (8-bit mantissa: ~0.04 of logit error at tau 0.1)
            loss, parts = compute_loss(criterion, to_float32(out), labels, state["aux_weight"], state["alpha"])
            finite = update(optimizer, loss, scaler)
            parts = {**parts, "top1": batch_top1(out, labels)}
        meter.add(loss, parts, finite)
        scheduler.step()
        state["iteration"] += 1
        window_images += images.shape[0]
        if state["iteration"] % args.print_freq == 0 or state["iteration"] == state["total_iters"]:
            means, read_at = check_steps(meter, state, args), state["iteration"]
            now = time.time()
            done = state["iteration"] - state["start_iteration"]
            eta = (now - state["process_start"]) / done * (state["total_iters"] - state["iteration"])
            print(f"epoch {epoch} iter {state['iteration']}/{state['total_iters']} "
                  + " ".join(f"{k} {v:.4f}" for k, v in means.items())
                  + f" lr {optimizer.param_groups[0]['lr']:.4g}"
                  f" {window_images / max(now - window_start, 1e-9):.1f} img/s"
                  f" eta {datetime.timedelta(seconds=int(eta))}", flush=True)
            window_start, window_images = now, 0
        if state["iteration"] == state["epoch_end"]:
            break  # the caller evaluates, saves, and honours a pending signal
        if state["stop_signal"] is not None:
            check_steps(meter, state, args)
            save()
            raise StopTraining(f"stopped by signal {state['stop_signal']} at iteration {state['iteration']}; "
                               f"continue with the same command plus --resume auto", 128 + state["stop_signal"])
        if args.save_every and state["iteration"] % args.save_every == 0:
            check_steps(meter, state, args)
            save()
    if read_at == state["iteration"]:  # the last window ended with the epoch: nothing new to read
        return means
    return check_steps(meter, state, args)


def probe_gradients(model, criterion, optimizer, scheduler, loader, sampler, device, state, args):
    """Seed 004's rule for placing the auxiliary classifier: train briefly, record
    the mean |gradient| of every conv / linear weight of the backbone, and attach
    the head after the stage holding the deepest layer whose mean falls below
    ``--probe-threshold`` (1e-7 in the paper). Writes
    output_dir/gradient_probe.csv (iteration, layer, stage, mean_abs_grad)."""
    backbone = getattr(model, "backbone", model)
    prefix = "backbone." if backbone is not model else ""
    stage_of = models.parameter_stages(backbone)
    layers = [(name, m) for name, m in backbone.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    path = os.path.join(args.output_dir, "gradient_probe.csv")
    sums = {name: 0.0 for name, _ in layers}
    model.train()
    with open(path + ".tmp", "w") as f:
        f.write("iteration,layer,stage,mean_abs_grad\n")
        iteration, epoch = 0, 0
        while iteration < args.probe_gradients:
            sampler.set_epoch(epoch)
            for images, labels in loader:
                out = model(images.to(device))
                loss, _ = compute_loss(criterion, out, labels.to(device), state["aux_weight"])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                for name, module in layers:
                    mean_abs = module.weight.grad.abs().mean().item() if module.weight.grad is not None else 0.0
                    sums[name] += mean_abs
                    f.write(f"{iteration},{prefix}{name},{stage_of[name + '.weight']},{mean_abs:.6e}\n")
                optimizer.step()
                scheduler.step()
                iteration += 1
                if iteration >= args.probe_gradients:
                    break
            epoch += 1
    os.replace(path + ".tmp", path)
    means = {name: total / args.probe_gradients for name, total in sums.items()}
    vanishing = [name for name, _ in layers if means[name] < args.probe_threshold]
    print(f"wrote {path}: {len(layers)} layers x {args.probe_gradients} iterations", flush=True)
    print(f"layers with mean |grad| < {args.probe_threshold:g}: "
          + (", ".join(f"{n} ({means[n]:.2e})" for n in vanishing) or "none"), flush=True)
    if vanishing:
        last_intermediate = len(backbone.stage_channels) - 2
        stage = min(stage_of[vanishing[-1] + ".weight"], last_intermediate)
        print(f"deepest vanishing layer {vanishing[-1]} is in stage {stage_of[vanishing[-1] + '.weight']}: "
              f"attach the auxiliary head after stage {stage} (--deep-sup {stage})", flush=True)
    return means


def shot_groups(train_counts, many_threshold=100, few_threshold=20):
    """{"many": [classes], "medium": [...], "few": [...]}: classes with more than
    ``many_threshold`` training images, ``few_threshold`` to ``many_threshold``,
    and fewer than ``few_threshold`` (the usual long-tail split: > 100, 20-100, < 20)."""
    groups = {"many": [], "medium": [], "few": []}
    for c, n in enumerate(train_counts):
        groups["many" if n > many_threshold else "few" if n < few_threshold else "medium"].append(c)
    return groups


@torch.no_grad()
def evaluate(model, loader, device, num_classes, train_counts=None, many_threshold=100, few_threshold=20,
             flip=None, args=None):
    """Top-1 / top-5 (%) and per-class top-1 on ``loader``; top-5 becomes top-k
    with k = K when K < 5. With ``train_counts`` (training images per class) also
    many / medium / few-shot top-1: the mean per-class accuracy of each group
    (None for an empty group). MKSMT models also give ``head_top1_stageS`` for
    every head (the deepest one is ``top1``). ``flip`` "h" / "v" mirrors the test
    images (MKSMT's robustness test). ``args`` brings --amp / --channels-last. In a
    distributed run each process evaluates its shard of the test set and the
    counts are summed over processes. Every count stays on the device until one
    transfer at the end. Returns a dict of floats and a per_class list."""
    model.eval()
    k = min(5, num_classes)
    aux_stages = getattr(model, "aux_stages", [])
    head_stages = getattr(model, "head_stages", [])
    # counts: correct top-1, correct top-k, loss sum, then one per aux head and per MKSMT head
    counts = torch.zeros(3 + len(aux_stages) + len(head_stages), dtype=torch.float64, device=device)
    class_correct = torch.zeros(num_classes, dtype=torch.float64, device=device)   # (K,)
    class_total = torch.zeros(num_classes, dtype=torch.float64, device=device)     # (K,)
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if flip is not None:
            images = torch.flip(images, dims=[3 if flip == "h" else 2])   # (B, 3, H, W)
        if getattr(args, "channels_last", False):
            images = images.contiguous(memory_format=torch.channels_last)
        with autocast(args, device.type):
            out = model(images)
        logits = out["logits"].float()                                   # (B, K)
        topk = logits.topk(k, dim=1).indices                             # (B, k)
        # argmax, not topk[:, 0]: topk breaks ties (common in bf16) in no fixed order, and
        # top1 must equal the deepest head's argmax count below
        hit1 = (logits.argmax(1) == labels).double()                     # (B,)
        heads = [*out.get("aux_logits", []), *out.get("head_logits", [])]
        counts += torch.stack([hit1.sum(), (topk == labels[:, None]).any(1).double().sum(),
                               F.cross_entropy(logits, labels, reduction="sum").double(),
                               *[(z.float().argmax(1) == labels).double().sum() for z in heads]])
        class_total.index_add_(0, labels, torch.ones_like(hit1))
        class_correct.index_add_(0, labels, hit1)
    if dist.is_available() and dist.is_initialized():  # sum every count over the processes' shards
        for tensor in (counts, class_correct, class_total):
            dist.all_reduce(tensor)  # NCCL needs them on the GPU
    flat = torch.cat([counts, class_correct, class_total]).tolist()     # the one device-to-host copy
    n_counts = len(counts)
    correct1, correct5, loss_sum = flat[:3]
    aux_correct = flat[3:3 + len(aux_stages)]
    head_correct = flat[3 + len(aux_stages):n_counts]
    class_correct, class_total = flat[n_counts:n_counts + num_classes], flat[n_counts + num_classes:]
    total = sum(class_total)
    per_class = [100.0 * c / max(t, 1) for c, t in zip(class_correct, class_total)]
    present = [t > 0 for t in class_total]
    shots = {}
    if train_counts is not None:
        for group, classes in shot_groups(train_counts, many_threshold, few_threshold).items():
            classes = [c for c in classes if present[c]]
            shots[f"{group}_top1"] = sum(per_class[c] for c in classes) / len(classes) if classes else None
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total,
            "loss": loss_sum / total, "n": int(total),
            "balanced_top1": sum(p for p, ok in zip(per_class, present) if ok) / sum(present), **shots,
            **{f"aux_top1_stage{s}": 100.0 * c / total for s, c in zip(aux_stages, aux_correct)},
            **{f"head_top1_stage{s}": 100.0 * c / total for s, c in zip(head_stages, head_correct)},
            "per_class": per_class}


def use_tensor_loader(args, train_set):
    """--loader auto picks the tensor-resident loader when the training set is a
    uint8 array at its training size (cifar10/100, npz, their long-tailed subsets)."""
    fits = data.can_use_tensor_loader(train_set)
    if args.loader == "tensor" and not fits:
        raise data.DataError(f"--loader tensor needs an in-memory uint8 dataset at its stored size (cifar10, "
                             f"cifar100, npz without --image-size); --dataset {args.dataset} needs --loader torch")
    return args.loader == "tensor" or (args.loader == "auto" and fits)


def make_train_loader(args, train_set, device, rank=0, world_size=1):
    """Shuffled with ``data.ResumableSampler`` and augmented per sample from its own
    seed (``data.PerSampleSeed``), so a resumed run sees the same batches. With
    the tensor loader (``data.TensorLoader``) the whole uint8 set sits on
    ``device`` and each batch is augmented there in a few batched ops, from a
    seed of the batch. In a distributed run each process draws every
    ``world_size``-th sample.

    ``--sampler class-balanced`` replaces the shuffled order with
    ``data.ClassBalancedSampler`` (the CE baseline with balanced sampling alone).

    Hybrid losses (seed 003) read two streams per iteration: the contrastive
    branch takes instance-sampled images, two views each; the CE branch takes a
    class-balanced batch (``data.ClassBalancedSampler``) of single views. Both
    streams have len(train_set) // batch_size batches per epoch."""
    sampler = data.ResumableSampler(len(train_set), args.seed, world_size, rank)
    if args.loss not in HYBRID_LOSSES and args.sampler == "class-balanced":
        sampler = data.ClassBalancedSampler(train_set.targets, args.seed, num_replicas=world_size, rank=rank)
    normalize = args.normalize or data.DEFAULT_NORMALIZE[args.dataset]
    tensor = use_tensor_loader(args, train_set)
    if tensor:
        def tensor_loader(sampler, **augment):
            return data.TensorLoader(train_set, args.batch_size, device, *data.NORMALIZATIONS[normalize],
                                     sampler, args.seed, **augment)
    if args.loss not in HYBRID_LOSSES:
        if tensor:
            return tensor_loader(sampler), sampler
        return _loader(args, data.PerSampleSeed(train_set), sampler, device), sampler
    balanced = data.ClassBalancedSampler(train_set.targets, args.seed, num_replicas=world_size, rank=rank)
    if tensor:
        streams = [tensor_loader(sampler, views=2, contrastive=True), tensor_loader(balanced, grayscale=0.2)]
        return ZippedLoaders(streams), ZippedSamplers([sampler, balanced])
    small = args.dataset in ("cifar10", "cifar100", "npz")
    size = args.image_size or (32 if small else 224)
    ce_transform, two_views = data.hybrid_transforms(normalize, size, small)
    streams = [_loader(args, data.PerSampleSeed(data.with_transform(train_set, two_views)), sampler, device),
               _loader(args, data.PerSampleSeed(data.with_transform(train_set, ce_transform)), balanced, device)]
    return ZippedLoaders(streams), ZippedSamplers([sampler, balanced])


def _loader(args, dataset, sampler, device):
    return torch.utils.data.DataLoader(
        dataset, batch_size=args.batch_size, sampler=sampler,
        num_workers=args.workers, pin_memory=device.type == "cuda", drop_last=True,
        persistent_workers=args.workers > 0,
        generator=torch.Generator().manual_seed(args.seed))  # worker seeds never touch the global RNG


class ZippedLoaders:
    """Iterate several loaders in step: yields a tuple with one batch of each."""

    def __init__(self, loaders):
        self.loaders = loaders

    def __len__(self):
        return min(len(loader) for loader in self.loaders)

    def __iter__(self):
        return zip(*self.loaders)


class ZippedSamplers:
    """``set_epoch`` for every sampler of a ``ZippedLoaders``."""

    def __init__(self, samplers):
        self.samplers = samplers

    def set_epoch(self, epoch, start=0):
        for sampler in self.samplers:
            sampler.set_epoch(epoch, start)


def make_test_loader(test_set, batch_size, workers, device, rank=0, world_size=1, normalize=None):
    """Batches of ``test_set`` in order. With ``normalize`` (the run's normalisation
    name) and a set that ``data.can_use_tensor_loader`` accepts, a
    ``data.TensorEvalLoader`` (the set on the device, no PIL); else a DataLoader.
    In a distributed run each process takes every world_size-th image; evaluate()
    sums the counts."""
    if normalize is not None and data.can_use_tensor_loader(test_set):
        return data.TensorEvalLoader(test_set, batch_size, device, *data.NORMALIZATIONS[normalize], rank, world_size)
    if world_size > 1:
        test_set = torch.utils.data.Subset(test_set, range(rank, len(test_set), world_size))
    return torch.utils.data.DataLoader(test_set, batch_size=batch_size, shuffle=False,
                                       num_workers=workers, pin_memory=device.type == "cuda",
                                       generator=torch.Generator().manual_seed(0))


def default_output_dir(args):
    name = args.recipe if args.recipe not in (None, "none") else f"{args.dataset}-{args.model}-{args.loss}"
    return os.path.join("runs", f"{name}-seed{args.seed}")


def prepare_output_dir(args):
    """Create --output-dir and write config.json, or fail with one line."""
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        path = os.path.join(args.output_dir, "config.json")
        with open(path + ".tmp", "w") as f:
            json.dump(vars(args), f, indent=2, sort_keys=True)
        os.replace(path + ".tmp", path)
    except OSError as e:
        raise data.DataError(f"cannot write to --output-dir {args.output_dir} ({e.strerror}); "
                             f"pass a writable folder") from None


def keep_metrics_up_to(path, iteration):
    """On resume, drop metrics rows written after the checkpoint (a kill between
    the row and the checkpoint would otherwise leave a duplicate)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        rows = [line for line in f if line.strip() and json.loads(line)["iteration"] <= iteration]
    with open(path + ".tmp", "w") as f:
        f.writelines(rows)
    os.replace(path + ".tmp", path)


def restore(path, args, model, criterion, optimizer, scheduler):
    """Load model, loss parameters, optimizer and scheduler from a checkpoint, or fail
    with one line saying what does not fit. Returns the checkpoint dict."""
    ckpt = load_checkpoint(path)
    load_state_checked(model, ckpt["model"], path, args.model)
    if criterion is not None:
        load_state_checked(criterion, ckpt.get("criterion", {}), path, f"--loss {args.loss}")
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        init_momentum_buffers(optimizer)  # a checkpoint from before a parameter's first step
        scheduler.load_state_dict(ckpt["scheduler"])
    except (ValueError, KeyError) as e:
        raise data.DataError(f"checkpoint {path} was trained with other optimizer groups "
                             f"(a different --loss?): {e}") from None
    return ckpt


def log_evaluation(metrics_path, epoch, train_stats, results, optimizer, state):
    """Append one row to metrics.jsonl and print the evaluation line. ``results``
    maps "val" (with --val-split) and "test" to evaluate()'s output; their keys
    become val_* and test_* columns."""
    record = {"epoch": epoch, "iteration": state["iteration"], **{f"train_{k}": v for k, v in train_stats.items()}}
    for split, result in results.items():
        record.update({f"{split}_top1": result["top1"], f"{split}_top5": result["top5"],
                       f"{split}_balanced_top1": result["balanced_top1"], f"{split}_loss": result["loss"],
                       **{f"{split}_{k}": v for k, v in result.items()
                          if k.startswith(("aux_top1", "head_top1")) or k in ("many_top1", "medium_top1", "few_top1")}})
    record.update({"aux_weight": state["aux_weight"], "alpha": state["alpha"],
                   "lr": optimizer.param_groups[0]["lr"], "skipped_nonfinite": state["skipped_nonfinite"],
                   "seconds": round(time.time() - state["start_time"], 1)})
    with open(metrics_path, "a") as f:
        f.write(json.dumps(strict_json(record), allow_nan=False) + "\n")
    line = f"eval epoch {epoch}: train loss {train_stats.get('loss', float('nan')):.4f}"
    for split, result in results.items():
        shots = [(g, result[g + "_top1"]) for g in ("many", "medium", "few")
                 if result.get(g + "_top1") is not None and math.isfinite(result[g + "_top1"])]
        line += (f" {split} top1 {result['top1']:.2f} top5 {result['top5']:.2f} balanced {result['balanced_top1']:.2f}"
                 + "".join(f" {g} {v:.2f}" for g, v in shots if len(shots) > 1)
                 + "".join(f" {k.replace('_top1_', ' ')} {v:.2f}" for k, v in result.items()
                           if k.startswith("head_top1")))
    print(line, flush=True)


def strict_json(value):
    """``value`` with every non-finite float replaced by None, so json.dumps writes
    strict JSON (null, never NaN / Infinity, which jq and JavaScript reject)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def setup_distributed(args):
    """torchrun sets WORLD_SIZE / RANK / LOCAL_RANK: start the process group (NCCL on
    GPUs, gloo on CPU) and silence print() on every process but rank 0 (as
    torchvision's references do). Returns (rank, world_size, device)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return 0, 1, resolve_device(args.device)
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    device = resolve_device(args.device)
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    if rank != 0:
        builtins.print = lambda *a, **k: None
    return rank, world_size, device


def reduce_mean(stats, world_size, device):
    """Average a {name: float} dict over the processes."""
    if world_size == 1 or not stats:
        return stats
    keys = sorted(stats)
    values = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(keys, (values / world_size).tolist()))


def prepare_model(args, model, device, world_size):
    """channels-last, SyncBN and DDP for training; torch.compile for both the
    training and the evaluation forward. Returns (train_model, eval_model); both
    share ``model``'s parameters, which is what the checkpoint holds."""
    if args.channels_last:
        model.to(memory_format=torch.channels_last)
    if args.sync_bn and world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    train_model = model
    if world_size > 1:
        # MKSMT's step 1 leaves the deeper stages unused
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=args.loss == "mksmt")
    if args.compile != "none":
        return torch.compile(train_model, mode=args.compile), torch.compile(model, mode=args.compile)
    return train_model, model


def main(args):
    rank, world_size, device = setup_distributed(args)
    try:
        return train(args, rank, world_size, device)
    finally:
        if world_size > 1:
            dist.destroy_process_group()


def train(args, rank=0, world_size=1, device=None):
    """Everything main() does in one process; rank 0 writes the files."""
    seed_everything(args.seed, args.deterministic)
    device = device or resolve_device(args.device)
    args.output_dir = args.output_dir or default_output_dir(args)
    if args.amp == "fp16" and device.type != "cuda":
        raise data.DataError("--amp fp16 needs a CUDA device; use --amp bf16 on CPU")

    # Everything that can reject the input runs before anything is written.
    train_set, test_set, num_classes = build_datasets_from_args(args)
    train_set, val_set = split_off_validation(args, train_set, test_set)
    dropped = getattr(train_set, "dropped", []) + getattr(test_set, "dropped", [])
    if args.skip_corrupt:
        print(f"--skip-corrupt: dropped {len(dropped)} unreadable images"
              + (f" (e.g. {dropped[0]})" if dropped else ""), flush=True)
    if args.batch_size * world_size > len(train_set):
        per = f" x {world_size} processes" if world_size > 1 else ""
        raise data.DataError(f"--batch-size {args.batch_size}{per} is larger than the training set "
                             f"({len(train_set)} images); pass a smaller --batch-size")
    try:
        model = build_model_from_args(args, num_classes).to(device)
    except (ValueError, OSError, RuntimeError) as e:  # bad option, missing --weights file, no network
        raise data.DataError(f"cannot build {args.model}: {str(e).splitlines()[0]}") from None
    with torch.no_grad(), torch.random.fork_rng(devices=[]):  # the embedding width, from one forward pass
        model.eval()
        feat_dim = model(test_set[0][0][None].to(device))["embedding"].shape[1]
        model.train()
    criterion = build_criterion(args, num_classes, feat_dim)
    if criterion is not None:
        criterion.to(device)
    optimizer = build_optimizer(args, model, criterion)
    train_model, eval_model = prepare_model(args, model, device, world_size)
    scaler = torch.amp.GradScaler(device.type) if args.amp == "fp16" else None
    train_loader, sampler = make_train_loader(args, train_set, device, rank, world_size)
    eval_normalize = None if args.loader == "torch" else args.normalize or data.DEFAULT_NORMALIZE[args.dataset]
    eval_loaders = {name: make_test_loader(dataset, args.eval_batch_size or args.batch_size, args.workers,
                                           device, rank, world_size, eval_normalize)
                    for name, dataset in (("val", val_set), ("test", test_set)) if dataset is not None}
    iters_per_epoch = len(train_set) // (args.batch_size * world_size)
    train_counts = torch.bincount(torch.as_tensor(train_set.targets), minlength=num_classes).tolist()
    total_iters = args.iters or args.epochs * iters_per_epoch
    epochs = math.ceil(total_iters / iters_per_epoch)
    scheduler = build_scheduler(args, optimizer, iters_per_epoch)
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pth")
    metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
    resume = ckpt_path if args.resume == "auto" else args.resume
    if args.resume == "auto" and not os.path.exists(ckpt_path):
        print(f"--resume auto: no {ckpt_path} yet, starting fresh", flush=True)
        resume = None
    ckpt = restore(resume, args, model, criterion, optimizer, scheduler) if resume else None
    if ckpt is not None and scaler is not None and "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
    if rank == 0:
        prepare_output_dir(args)
    print(config_line(args), flush=True)
    print(f"{args.model}: {models.count_parameters(model) / 1e6:.3f}M parameters; "
          f"{len(train_set)} train / " + (f"{len(val_set)} validation / " if val_set is not None else "")
          + f"{len(test_set)} test images, {num_classes} classes; "
          f"{iters_per_epoch} iterations per epoch, {total_iters} in all ({epochs} epochs) on {device}"
          + (f" x {world_size} processes" if world_size > 1 else "")
          + f"; loader {'tensor' if use_tensor_loader(args, train_set) else 'torch'}", flush=True)

    state = {"iteration": 0, "epoch_sums": {}, "epoch_count": 0, "skipped_nonfinite": 0,
             "seconds": 0.0, "stop_signal": None, "aux_weight": 0.0, "alpha": None}
    if ckpt is not None:
        if "rng" in ckpt:
            set_rng_states(ckpt["rng"])
        else:
            print(f"{resume} holds no RNG states (older format): the resumed run is not bit-exact", flush=True)
        state.update(ckpt.get("progress", {"iteration": ckpt["iteration"]}))
        if rank == 0:
            keep_metrics_up_to(metrics_path, state["iteration"])
        print(f"resumed from {resume} at iteration {state['iteration']}", flush=True)
    elif rank == 0 and os.path.exists(metrics_path):
        os.remove(metrics_path)  # a fresh run never mixes with an old run's metrics
    # start_time is shifted by the seconds already trained, so "seconds" keeps counting across resumes
    state.update(start_iteration=state["iteration"], total_iters=total_iters, process_start=time.time(),
                 start_time=time.time() - state["seconds"])
    if state["iteration"] >= total_iters:
        print(f"{resume} already holds all {total_iters} iterations; nothing to do", flush=True)
        return 0
    if args.probe_gradients:
        state["aux_weight"] = losses.deep_supervision_weight(args.aux_weight, 0, epochs, args.aux_decay,
                                                             args.aux_stop)
        probe_gradients(train_model, criterion, optimizer, scheduler, train_loader, sampler, device, state, args)
        return 0

    def save():
        if rank != 0:
            return
        state["seconds"] = time.time() - state["start_time"]
        progress = {k: state[k] for k in ("iteration", "epoch_sums", "epoch_count", "skipped_nonfinite", "seconds")}
        save_checkpoint({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                         "criterion": criterion.state_dict() if criterion is not None else {},
                         "scheduler": scheduler.state_dict(), "epoch": state["iteration"] // iters_per_epoch,
                         "iteration": state["iteration"], "progress": progress, "rng": rng_states(),
                         "num_classes": num_classes, "args": vars(args),
                         **({"scaler": scaler.state_dict()} if scaler is not None else {})}, ckpt_path)

    def on_signal(signum, frame):
        if state["stop_signal"] is not None:  # a second Ctrl-C: stop now
            raise KeyboardInterrupt
        state["stop_signal"] = signum
        print(f"signal {signum}: finishing this step, then saving a checkpoint", flush=True)

    previous_handlers = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
    result = None
    try:
        for epoch in range(state["iteration"] // iters_per_epoch, epochs):
            position = state["iteration"] - epoch * iters_per_epoch  # > 0 only when resumed mid-epoch
            sampler.set_epoch(epoch, position * args.batch_size)
            if position == 0:
                state["epoch_sums"], state["epoch_count"] = {}, 0
            state["aux_weight"] = losses.deep_supervision_weight(
                args.aux_weight, epoch, epochs, args.aux_decay, args.aux_stop)
            if args.loss in HYBRID_LOSSES:
                state["alpha"] = losses.hybrid_alpha(epoch, epochs, args.alpha_schedule, args.alpha)
            state["epoch_end"] = min((epoch + 1) * iters_per_epoch, total_iters)
            train_stats = train_one_epoch(train_model, criterion, optimizer, scheduler, train_loader,
                                          device, epoch, state, args, save, scaler)
            train_stats = reduce_mean(train_stats, world_size, device)
            last = state["iteration"] >= total_iters
            if (epoch + 1) % args.eval_every == 0 or last:
                results = {name: evaluate(eval_model, loader, device, num_classes, train_counts,
                                          args.many_threshold, args.few_threshold, args=args)
                           for name, loader in eval_loaders.items()}
                result = results["test"]
                if rank == 0:
                    log_evaluation(metrics_path, epoch, train_stats, results, optimizer, state)
            save()
            if state["stop_signal"] is not None:  # arrived in the epoch's last step or its evaluation
                raise StopTraining(f"stopped by signal {state['stop_signal']} after epoch {epoch}; "
                                   f"continue with the same command plus --resume auto",
                                   128 + state["stop_signal"])
    except StopTraining as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    finally:
        for sig, handler in previous_handlers.items():
            signal.signal(sig, handler)
    if result is not None:
        print(f"final (last evaluation, epoch {epoch}): top1 {result['top1']:.2f} "
              f"top5 {result['top5']:.2f} balanced top1 {result['balanced_top1']:.2f}", flush=True)
    return 0


def stage_list(text):
    """'1,2' -> [1, 2] for --deep-sup."""
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected stage indices like 1 or 1,2, got {text!r}") from None


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (exit code 2), not the usage block."""

    def error(self, message):
        self.exit(2, f"error: {message} (see --help)\n")


def get_args_parser(add_help=True):
    p = OneLineErrorParser(description=__doc__.split("\n\n")[0], add_help=add_help,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--recipe", choices=sorted(RECIPES) + ["none"],
                   help="fill in a paper's hyper-parameters (default: the recipe whose setup matches "
                        "--dataset, --loss and --model, if any; none: no recipe)")
    # model
    p.add_argument("--model", default="resnet32", choices=models.MODEL_NAMES)
    p.add_argument("--block", default="post", choices=["post", "preact"],
                   help="CIFAR ResNet unit: original post-activation, or seed 001's pre-activation")
    p.add_argument("--shortcut", default="A", choices=["A", "B"], help="CIFAR ResNet shortcut option")
    p.add_argument("--pretrained", action="store_true", help="torchvision ImageNet weights")
    p.add_argument("--weights", help="local state dict to initialise the backbone from")
    p.add_argument("--plain-init", default="xavier", choices=["xavier", "kaiming"],
                   help="init of the plain (no BN, no shortcut) networks")
    # deep supervision (seed 004)
    p.add_argument("--deep-sup", type=stage_list, default=[], metavar="S[,S...]",
                   help="attach an auxiliary classifier to these stages (indices into `stages`)")
    p.add_argument("--aux-weight", type=float, default=0.3,
                   help="alpha0 of L = L_main + alpha_t * sum L_aux (not in the paper: 0.3)")
    p.add_argument("--aux-decay", default="linear", choices=["linear", "none", "step"],
                   help="alpha_t = alpha0 * (1 - t/N) (linear), alpha0 (none), or alpha0 then 0 (step)")
    p.add_argument("--aux-stop", type=int, help="step decay: epoch at which alpha_t drops to 0 (default N/2)")
    p.add_argument("--aux-dropout", type=float, default=0.5, help="dropout of the auxiliary FC layers")
    p.add_argument("--probe-gradients", type=int, default=0, metavar="N",
                   help="train N iterations, write gradient_probe.csv (mean |grad| per layer), "
                        "print where to attach --deep-sup, and stop")
    p.add_argument("--probe-threshold", type=float, default=1e-7,
                   help="mean |grad| below which a layer counts as vanishing (paper: 1e-7)")
    # loss
    p.add_argument("--loss", default="ce", choices=["ce", "center", "joint", *HYBRID_LOSSES, "mksmt"],
                   help="joint = CE + lambda * contrastive-center (Eq. 8); center = CE + lambda * center "
                        "loss; hybrid-* = alpha * SC/PSC/MPSC + (1 - alpha) * class-balanced CE; "
                        "mksmt = per-stage OPM heads, self-distillation, multi-step training")
    p.add_argument("--lambda", dest="lam", type=float,
                   help="weight of the center term: default 1 for joint (Qi & Su, Eq. 8), "
                        "0.003 for center (Wen et al.'s face setting)")
    p.add_argument("--delta", type=float, default=1.0, help="delta of Eq. 7")
    p.add_argument("--ctc-reduction", default="sum", choices=["sum", "mean"],
                   help="center-loss sum over the batch (paper) or mean")
    p.add_argument("--center-lr", type=float, default=0.5, help="SGD lr of the class centers")
    p.add_argument("--center-momentum", type=float, default=0.0,
                   help="momentum of the centers' SGD (default 0: plain SGD as in the papers)")
    p.add_argument("--center-update", default="wen", choices=["wen", "autograd"],
                   help="--loss center: Wen et al.'s Eq. 4 center step, or the raw gradient")
    p.add_argument("--center-lr-schedule", action="store_true",
                   help="also apply warm-up/milestones to the centers' lr (default: constant)")
    p.add_argument("--sampler", default="instance", choices=["instance", "class-balanced"],
                   help="training images drawn once each per epoch in a shuffled order (instance), or "
                        "class-balanced: a uniform class, then a uniform image of it, with replacement "
                        "(the hybrid network's CE-branch sampler, here alone; as many draws per epoch)")
    # hybrid network (seed 003)
    p.add_argument("--tau", type=float, default=0.1,
                   help="temperature of SC / PSC (paper: 0.1; PSC on CIFAR-10: 1)")
    p.add_argument("--alpha-schedule", default="parabolic", choices=["parabolic", "linear", "const"],
                   help="alpha = 1-(t/T)^2 (CIFAR), 1-t/T (iNaturalist) or --alpha")
    p.add_argument("--alpha", type=float, default=0.5, help="alpha for --alpha-schedule const")
    p.add_argument("--projection-dim", type=int, default=128, help="width of the contrastive projection z")
    p.add_argument("--num-prototypes", type=int,
                   help="prototypes per class: 1 for hybrid-psc, default 4 for hybrid-mpsc (not in the paper)")
    p.add_argument("--prototype-weights", default="uniform", choices=["uniform", "softmax"],
                   help="MPSC weights w_{i,m}: 1/M, or a softmax over the own class's prototypes")
    p.add_argument("--psc-include-positive", action="store_true",
                   help="include the positive class in the PSC denominator (the paper excludes it)")
    # MKSMT (seed 002)
    p.add_argument("--heads", type=stage_list, metavar="S[,S...]",
                   help="--loss mksmt: stages with an OPM output head (default: the last two, S3,S4 on Swin)")
    p.add_argument("--head-width", type=int, help="OPM width m = f (default 512; 64 for CIFAR ResNets)")
    p.add_argument("--multistep", type=int, default=2, choices=[1, 2, 3],
                   help="optimizer steps per batch (Algorithm 2); 3 needs three --heads")
    p.add_argument("--kd", default="decision", choices=["none", "decision", "feature"],
                   help="self-distillation from the deepest head: softmax outputs, OPM features, or none")
    p.add_argument("--kd-exec", default="sync", choices=["sync", "async"],
                   help="sync: CE and KD in one backward; async: a CE update, then a separate KD update")
    p.add_argument("--temperature", type=float, default=1.0, help="KD temperature T (paper: 1)")
    p.add_argument("--lambda1", type=float, default=1.0, help="weight of CE(S4) in step 2")
    p.add_argument("--lambda2", type=float, default=1.0, help="weight of KD in step 2")
    p.add_argument("--kd-no-detach", action="store_true", help="let the KD gradient reach the teacher head")
    p.add_argument("--kd-no-t2", action="store_true", help="do not multiply the KD term by T^2")
    # data
    p.add_argument("--dataset", default="cifar10", choices=data.DATASETS)
    p.add_argument("--data-path", help="dataset root or .npz file (cifar default: ./data)")
    p.add_argument("--download", action="store_true", help="download CIFAR with torchvision")
    p.add_argument("--image-size", type=int, help="input side (default: 32 for CIFAR/npz, else 224)")
    p.add_argument("--normalize", choices=sorted(data.NORMALIZATIONS),
                   help="pixel normalisation (default per dataset; seed001 = x*2/255-1)")
    p.add_argument("--lfw-top-k", type=int, default=20, help="LFW: keep the k identities with most images")
    p.add_argument("--cub-classes", type=int, help="CUB: keep the first N classes, 8:2 split")
    p.add_argument("--split-seed", type=int, default=0,
                   help="seed of the LFW / CUB-subset 8:2 split and of the long-tailed subset "
                        "(fixed across --seed on purpose)")
    p.add_argument("--val-split", type=float, default=0.0, metavar="F",
                   help="hold out a stratified fraction F of the training set (seeded by --split-seed; after "
                        "the long-tailed cut) and evaluate it as val_* in metrics.jsonl: select on it, never on test")
    p.add_argument("--imbalance-ratio", type=float, metavar="BETA",
                   help="make a cifar10/cifar100/npz training set long-tailed: n_max/n_min = BETA")
    p.add_argument("--many-threshold", type=int, default=100,
                   help="many-shot classes have more than this many training images")
    p.add_argument("--few-threshold", type=int, default=20,
                   help="few-shot classes have fewer than this many training images")
    p.add_argument("--workers", type=int, default=2, help="DataLoader worker processes")
    p.add_argument("--loader", default="auto", choices=["auto", "tensor", "torch"],
                   help="tensor: the uint8 training set lives on the device and batches are augmented "
                        "there in batched ops; torch: DataLoader + PIL transforms; auto: tensor when it fits")
    # schedule
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--iters", type=int, default=0, help="total iterations; overrides --epochs")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--eval-batch-size", type=int, default=0, help="default: --batch-size")
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--wd", type=float, default=1e-4, help="weight decay of the network")
    p.add_argument("--milestones", type=int, nargs="*", default=[100, 150],
                   help="multiply the lr by --gamma at these epochs (or iterations)")
    p.add_argument("--milestone-unit", default="epoch", choices=["epoch", "iter"])
    p.add_argument("--gamma", type=float, default=0.1)
    p.add_argument("--warmup-iters", type=int, default=0)
    p.add_argument("--warmup-lr", type=float, default=0.01)
    # run
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    p.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"],
                   help="autocast mixed precision for training and evaluation (fp16 with GradScaler, CUDA only)")
    p.add_argument("--channels-last", action="store_true", help="NHWC memory format for model and inputs")
    p.add_argument("--compile", default="none", choices=["none", "default", "reduce-overhead", "max-autotune"],
                   help="torch.compile mode for the training and evaluation forward")
    p.add_argument("--sync-bn", action="store_true", help="torchrun: SyncBatchNorm across processes")
    p.add_argument("--output-dir", help="default: runs/<recipe or dataset-model-loss>-seed<seed>")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every N epochs (and at the end)")
    p.add_argument("--print-freq", type=int, default=50, help="progress line every N iterations")
    p.add_argument("--resume", help="checkpoint.pth to continue from, exactly where it stopped; "
                   "'auto' = output-dir/checkpoint.pth if it exists")
    p.add_argument("--save-every", type=int, default=0,
                   help="also checkpoint every N iterations (always at the end of each epoch)")
    p.add_argument("--skip-nonfinite", type=int, default=0,
                   help="skip up to K batches whose loss is NaN/inf instead of stopping")
    p.add_argument("--skip-corrupt", action="store_true",
                   help="open every image once at start and drop unreadable ones")
    p.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms + cuDNN deterministic (slower on GPU)")
    p.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    return p


# ----------------------------------------------------------------------------------
# Paper recipes by default, and which flag applies when
# ----------------------------------------------------------------------------------
# The setup each recipe was published for. Without --recipe, a run whose --dataset,
# --loss and --model fall in one of these gets that recipe's hyper-parameters
# (flags you pass still win; --recipe none turns this off). The setup's own keys
# are never taken from the recipe: your --loss ce on LFW stays CE.
RECIPE_SETUPS = {
    "seed001-cifar10": dict(dataset=("cifar10",), loss=("ce",), model=("resnet32",)),
    "lfw-joint": dict(dataset=("lfw",), loss=("joint", "center", "ce"), model=("resnet34", "mobilenet_v2")),
    "cub-joint": dict(dataset=("cub",), loss=("joint", "center", "ce"), model=("resnet34", "mobilenet_v2")),
    "hybrid-sc-cifar10lt": dict(dataset=("cifar10",), loss=("hybrid-sc",), model=("resnet32",)),
    "hybrid-psc-cifar10lt": dict(dataset=("cifar10",), loss=("hybrid-psc", "hybrid-mpsc"), model=("resnet32",)),
    "hybrid-sc-cifar100lt": dict(dataset=("cifar100",), loss=("hybrid-sc",), model=("resnet32",)),
    "hybrid-psc-cifar100lt": dict(dataset=("cifar100",), loss=("hybrid-psc", "hybrid-mpsc"), model=("resnet32",)),
    "hybrid-inat": dict(dataset=("inat",), loss=("hybrid-sc",), model=("resnet50",)),
    "mksmt-cub": dict(dataset=("cub",), loss=("mksmt",), model=models.SWINS),
    "mksmt-nabirds": dict(dataset=("nabirds",), loss=("mksmt",), model=models.SWINS),
    "mksmt-dogs": dict(dataset=("dogs",), loss=("mksmt",), model=models.SWINS),
}


def matching_recipe(args):
    """The recipe whose setup holds args' dataset, loss and model, or None."""
    for name, setup in RECIPE_SETUPS.items():
        if all(getattr(args, key) in values for key, values in setup.items()):
            return name
    return None


# When a flag applies: (what it needs, in words; test on the resolved arguments).
_FILE_DATASETS = ("imagefolder", "lfw", "cub", "inat", "nabirds", "dogs")
WHEN = {
    "center": ("--loss joint or center", lambda a: a.loss in ("joint", "center")),
    "joint": ("--loss joint", lambda a: a.loss == "joint"),
    "wen": ("--loss center", lambda a: a.loss == "center"),
    "hybrid": ("--loss hybrid-sc, hybrid-psc or hybrid-mpsc", lambda a: a.loss in HYBRID_LOSSES),
    "one_stream": ("a --loss other than hybrid-* (their CE branch is always class-balanced)",
                   lambda a: a.loss not in HYBRID_LOSSES),
    "psc": ("--loss hybrid-psc or hybrid-mpsc", lambda a: a.loss in ("hybrid-psc", "hybrid-mpsc")),
    "mpsc": ("--loss hybrid-mpsc", lambda a: a.loss == "hybrid-mpsc"),
    "alpha": ("a hybrid --loss with --alpha-schedule const",
              lambda a: a.loss in HYBRID_LOSSES and a.alpha_schedule == "const"),
    "mksmt": ("--loss mksmt", lambda a: a.loss == "mksmt"),
    "kd": ("--loss mksmt with --kd decision or feature", lambda a: a.loss == "mksmt" and a.kd != "none"),
    "decision_kd": ("--loss mksmt with --kd decision", lambda a: a.loss == "mksmt" and a.kd == "decision"),
    "kd_exec": ("--loss mksmt with --multistep 2 or 3 and --kd decision or feature",
                lambda a: a.loss == "mksmt" and a.multistep > 1 and a.kd != "none"),
    "deep_sup": ("--deep-sup S", lambda a: bool(a.deep_sup)),
    "aux_stop": ("--deep-sup S with --aux-decay step", lambda a: bool(a.deep_sup) and a.aux_decay == "step"),
    "probe": ("--probe-gradients N", lambda a: a.probe_gradients > 0),
    "cifar_resnet": ("a CIFAR ResNet --model (" + ", ".join(models.CIFAR_RESNETS) + ")",
                     lambda a: a.model in models.CIFAR_RESNETS),
    "plain": ("a plain --model (" + ", ".join(models.PLAIN_NETS) + ")", lambda a: a.model in models.PLAIN_NETS),
    "lfw": ("--dataset lfw", lambda a: a.dataset == "lfw"),
    "cub": ("--dataset cub", lambda a: a.dataset == "cub"),
    "small": ("--dataset cifar10, cifar100 or npz", lambda a: a.dataset in ("cifar10", "cifar100", "npz")),
    "download": ("--dataset cifar10 or cifar100", lambda a: a.dataset in ("cifar10", "cifar100")),
    "files": ("a file-based --dataset (" + ", ".join(_FILE_DATASETS) + ")", lambda a: a.dataset in _FILE_DATASETS),
    "split": ("--dataset lfw or cub, --imbalance-ratio or --val-split",
              lambda a: a.dataset in ("lfw", "cub") or a.imbalance_ratio is not None or a.val_split > 0),
    "warmup": ("--warmup-iters N > 0", lambda a: a.warmup_iters > 0),
    "milestones": ("--milestones", lambda a: bool(a.milestones)),
    "epochs": ("--iters 0 (--iters overrides --epochs)", lambda a: a.iters == 0),
    "distributed": ("torchrun (WORLD_SIZE > 1)", lambda a: int(os.environ.get("WORLD_SIZE", 1)) > 1),
}
# Valid ranges: (in words, test on the value).
POSITIVE = ("> 0", lambda v: v > 0)
NON_NEGATIVE = (">= 0", lambda v: v >= 0)
AT_LEAST_1 = (">= 1", lambda v: v >= 1)
AT_LEAST_2 = (">= 2", lambda v: v >= 2)
UNIT = ("in [0, 1]", lambda v: 0 <= v <= 1)
BELOW_ONE = ("in [0, 1)", lambda v: 0 <= v < 1)
GAMMA = ("in (0, 1]", lambda v: 0 < v <= 1)
SEED = ("in [0, 2**32)", lambda v: 0 <= v < 2 ** 32)
IMAGE_SIDE = (">= 16", lambda v: v >= 16)
STAGES = ("stage indices >= 0 in increasing order", lambda v: all(x >= 0 for x in v) and v == sorted(set(v)))
STEPS = ("numbers >= 0 in increasing order", lambda v: all(x >= 0 for x in v) and v == sorted(v))

# Every flag of get_args_parser(): dest -> (WHEN key or None for "always", range or None).
FLAG_RULES = {
    "recipe": (None, None), "model": (None, None), "block": ("cifar_resnet", None),
    "shortcut": ("cifar_resnet", None), "pretrained": (None, None), "weights": (None, None),
    "plain_init": ("plain", None),
    "deep_sup": (None, STAGES), "aux_weight": ("deep_sup", NON_NEGATIVE), "aux_decay": ("deep_sup", None),
    "aux_stop": ("aux_stop", NON_NEGATIVE), "aux_dropout": ("deep_sup", BELOW_ONE),
    "probe_gradients": (None, NON_NEGATIVE), "probe_threshold": ("probe", POSITIVE),
    "loss": (None, None), "lam": ("center", NON_NEGATIVE), "delta": ("joint", POSITIVE),
    "ctc_reduction": ("center", None), "center_lr": ("center", POSITIVE), "center_momentum": ("center", BELOW_ONE),
    "center_update": ("wen", None), "center_lr_schedule": ("center", None),
    "sampler": ("one_stream", None), "tau": ("hybrid", POSITIVE), "alpha_schedule": ("hybrid", None), "alpha": ("alpha", UNIT),
    "projection_dim": ("hybrid", AT_LEAST_1), "num_prototypes": ("psc", AT_LEAST_1),
    "prototype_weights": ("mpsc", None), "psc_include_positive": ("psc", None),
    "heads": ("mksmt", STAGES), "head_width": ("mksmt", AT_LEAST_1), "multistep": ("mksmt", None),
    "kd": ("mksmt", None), "kd_exec": ("kd_exec", None), "temperature": ("decision_kd", POSITIVE),
    "lambda1": ("mksmt", NON_NEGATIVE), "lambda2": ("kd", NON_NEGATIVE), "kd_no_detach": ("kd", None),
    "kd_no_t2": ("decision_kd", None),
    "dataset": (None, None), "data_path": (None, None), "download": ("download", None),
    "image_size": (None, IMAGE_SIDE), "normalize": (None, None), "lfw_top_k": ("lfw", AT_LEAST_2),
    "cub_classes": ("cub", AT_LEAST_2), "split_seed": ("split", SEED), "val_split": (None, BELOW_ONE),
    "imbalance_ratio": ("small", AT_LEAST_1), "many_threshold": (None, NON_NEGATIVE),
    "few_threshold": (None, NON_NEGATIVE), "workers": (None, NON_NEGATIVE), "loader": (None, None),
    "epochs": ("epochs", AT_LEAST_1), "iters": (None, NON_NEGATIVE), "batch_size": (None, AT_LEAST_1),
    "eval_batch_size": (None, NON_NEGATIVE), "lr": (None, POSITIVE), "momentum": (None, BELOW_ONE),
    "wd": (None, NON_NEGATIVE), "milestones": (None, STEPS), "milestone_unit": ("milestones", None),
    "gamma": ("milestones", GAMMA), "warmup_iters": (None, NON_NEGATIVE), "warmup_lr": ("warmup", POSITIVE),
    "seed": (None, SEED), "device": (None, None), "amp": (None, None), "channels_last": (None, None),
    "compile": (None, None), "sync_bn": ("distributed", None), "output_dir": (None, None),
    "eval_every": (None, AT_LEAST_1), "print_freq": (None, AT_LEAST_1), "resume": (None, None),
    "save_every": (None, NON_NEGATIVE), "skip_nonfinite": (None, NON_NEGATIVE), "skip_corrupt": ("files", None),
    "deterministic": (None, None), "debug": (None, None),
}


def option_names(parser):
    """dest -> the flag as typed (lam -> --lambda)."""
    return {a.dest: a.option_strings[-1] for a in parser._actions if a.option_strings and a.dest != "help"}


def explicit_dests(argv):
    """The dests of the flags actually typed in ``argv`` (not defaults, not a recipe's)."""
    parser = get_args_parser()
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    return set(vars(parser.parse_args(argv)))


def flag_problem(args, explicit, names):
    """The first problem of FLAG_RULES, as one line, or None: a flag typed although
    this run does not use it, or any value out of its range."""
    for dest, (when, valid) in FLAG_RULES.items():
        if dest in explicit and when is not None and not WHEN[when][1](args):
            return f"{names[dest]} applies only with {WHEN[when][0]}; drop it or change the run"
        value = getattr(args, dest)
        if valid is not None and value is not None and not valid[1](value):
            return f"{names[dest]} must be {valid[0]}, got {value}"
    return None


def parse_args(argv=None):
    """Parse, apply the recipe (--recipe NAME, or the one whose setup matches), parse
    again so explicit flags override it, then check every flag against FLAG_RULES.
    A problem is one line on stderr and exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = get_args_parser()
    args = parser.parse_args(argv)
    recipe, matched = args.recipe, False
    if recipe is None:
        recipe, matched = matching_recipe(args), True
    if recipe not in (None, "none"):
        values = RECIPES[recipe]
        if matched:  # the setup stays yours
            values = {k: v for k, v in values.items() if k not in RECIPE_SETUPS[recipe]}
        parser.set_defaults(**values)
        args = parser.parse_args(argv)
    args.recipe, args.recipe_matched = recipe or "none", matched and recipe is not None
    explicit = explicit_dests(argv)
    if args.lam is None:
        args.lam = 0.003 if args.loss == "center" else 1.0
    if args.num_prototypes is None:
        args.num_prototypes = 4 if args.loss == "hybrid-mpsc" else 1
    problem = flag_problem(args, explicit, option_names(parser))
    if problem:
        parser.error(problem + (f" (recipe {args.recipe} applies to this setup; --recipe none turns it off)"
                                if args.recipe_matched else ""))
    # rules between flags
    if args.loss == "hybrid-psc" and args.num_prototypes != 1:
        parser.error("--loss hybrid-psc has one prototype per class; use --loss hybrid-mpsc for more")
    if args.few_threshold > args.many_threshold:
        parser.error(f"--few-threshold {args.few_threshold} is above --many-threshold {args.many_threshold}")
    if args.amp == "fp16" and args.loss == "center" and args.center_update == "wen":
        parser.error("--amp fp16 scales the loss, which would shrink Wen's center step (Eq. 4) by the scale; "
                     "use --amp bf16 or --center-update autograd")
    if args.loss == "mksmt":
        if args.heads is None:  # the last two stages (three for --multistep 3)
            num_stages = 3 if args.model in models.CIFAR_RESNETS or args.model in models.PLAIN_NETS else 4
            args.heads = list(range(num_stages - max(2, args.multistep), num_stages))
        if args.multistep > 1 and len(args.heads) != args.multistep:
            parser.error(f"--multistep {args.multistep} needs {args.multistep} --heads (one step per head), "
                         f"got {args.heads}")
        elif len(args.heads) < 2 and args.kd != "none":
            parser.error("self-distillation needs at least two --heads (a teacher and a student)")
        if args.deep_sup or args.probe_gradients:
            parser.error("--loss mksmt does not combine with --deep-sup / --probe-gradients")
    if args.loss in HYBRID_LOSSES and args.probe_gradients:
        parser.error("--probe-gradients works with --loss ce / center / joint, not with a hybrid loss")
    return args


def config_line(args):
    """The recipe and the flags that differ from the parser's defaults, in one line."""
    defaults = vars(get_args_parser().parse_args([]))
    defaults.update(lam=0.003 if args.loss == "center" else 1.0,  # as parse_args resolves them
                    num_prototypes=4 if args.loss == "hybrid-mpsc" else 1)
    names = option_names(get_args_parser())
    changed = []
    for dest, value in vars(args).items():
        when = FLAG_RULES.get(dest, (None, None))[0]
        if dest in ("recipe", "output_dir") or dest not in names or value == defaults.get(dest) \
                or (when is not None and not WHEN[when][1](args)):  # unused by this run
            continue
        if isinstance(value, bool):
            changed.append(names[dest])
        else:
            shown = (" ".join(map(str, value)) or "(none)") if isinstance(value, list) else value
            changed.append(f"{names[dest]} {shown}")
    recipe = args.recipe + (" (matched the setup; --recipe none turns it off)" if args.recipe_matched else "")
    return f"config: recipe {recipe}; " + (" ".join(changed) or "all defaults") + \
        f"; the full configuration is in {os.path.join(args.output_dir, 'config.json')}"


def one_line(error):
    """The user's line of a DataError, also when a DataLoader worker re-raised it
    wrapped in its own traceback text."""
    last = (str(error).strip().splitlines() or [""])[-1]
    return last.split("DataError: ", 1)[-1]


def cli(argv=None):
    """The command line: parse, train, and turn a DataError into one line on stderr
    and exit code 2 (a bad flag already exits with 2 in parse_args). Returns the
    exit code."""
    arguments = parse_args(argv)
    try:
        return main(arguments)
    except data.DataError as e:
        if arguments.debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(cli())
