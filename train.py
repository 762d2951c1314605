"""Train a classifier with one of five methods, on any backbone of models.py and dataset of data.py:
--loss ce; joint / center (CE + lambda * contrastive-center loss, Qi & Su 2017, or Wen's center loss);
hybrid-sc / psc / mpsc (long-tailed data, Wang et al. 2021); mksmt (per-stage heads, self-distillation,
multi-step training, Yu et al. 2023); --deep-sup S adds deep supervision (Wang et al. 2015).

    python train.py --loss joint --model resnet34 --dataset lfw --data-path /path/to/lfw_top20
    python train.py --recipe seed001-cifar10 --download --amp bf16 --channels-last
    torchrun --nproc_per_node 2 train.py --recipe seed001-cifar10 --batch-size 64

Reads top to bottom: recipes, one step per method, train_one_epoch(), evaluate(), main(), the parser
(machinery: utils.py). Writes config.json, metrics.jsonl, checkpoint.pth (--resume auto continues it).
"""
import functools
import gc
import math
import os
import sys
import types

import torch
import torch.nn.functional as F

import data
import losses
import models
import utils

# ==== The papers' recipes; flags you type override them =============================
RECIPES = {
    # Wu's write-up, Sec. 3.2: batch 128, momentum 0.9, L2 1e-4, lr 0.01 for 500 iterations
    # then 0.1, /10 at 32k, 48k and 64k iterations, stop at 80k; pixels x*2/255-1.
    "seed001-cifar10": dict(
        model="resnet32", block="preact", shortcut="B", dataset="cifar10", normalize="seed001",
        loss="ce", batch_size=128, lr=0.1, momentum=0.9, wd=1e-4, warmup_iters=500,
        warmup_lr=0.01, iters=80000, milestones=[32000, 48000, 64000], milestone_unit="iter"),
    # Tong's write-up, LFW top-20: RandomResizedCrop 224 + flip, 300 epochs, lr 0.01, batch 64, lambda 1,
    # delta 1, center lr 0.5. not in the paper: momentum 0.9, weight decay 5e-4, constant lr (no milestones
    # given); from scratch (LFW and CUB: no pre-training named).
    "lfw-joint": dict(
        model="resnet34", dataset="lfw", image_size=224, loss="joint", epochs=300, lr=0.01,
        batch_size=64, momentum=0.9, wd=5e-4, milestones=[], lam=1.0, delta=1.0, center_lr=0.5),
    # Tong's write-up, CUB first 100 classes, 8:2 split: lr 0.1, x0.1 at epochs 50, 150, 250.
    # not in the paper: 300 epochs (as for LFW), batch 64, momentum 0.9, weight decay 5e-4.
    "cub-joint": dict(
        model="resnet34", dataset="cub", cub_classes=100, image_size=224, loss="joint",
        epochs=300, lr=0.1, batch_size=64, momentum=0.9, wd=5e-4, milestones=[50, 150, 250],
        lam=1.0, delta=1.0, center_lr=0.5),
}
# Wang et al. 2021, long-tailed CIFAR: ResNet-32, batch 512, SGD momentum 0.9, wd 1e-4, lr 0.5, 200 epochs,
# x0.1 at 120 and 160, alpha = 1 - (t/T)^2; tau 0.1 for SC, 1 (CIFAR-10) or 0.1 (CIFAR-100) for PSC.
# iNaturalist 2018: ResNet-50 at 224, batch 100, lr 0.05, 100 epochs, x0.1 at 60, 80, alpha = 1 - t/T.
# not in the paper: beta = 100 in the recipes (the paper reports 100 / 50 / 10; pass
# --imbalance-ratio), the 128-d projection width as in SupContrast, iNat with SC.
_HYBRID_CIFAR = dict(model="resnet32", imbalance_ratio=100.0, batch_size=512, lr=0.5, momentum=0.9,
                     wd=1e-4, epochs=200, milestones=[120, 160], alpha_schedule="parabolic")
RECIPES.update({
    "hybrid-sc-cifar10lt": dict(_HYBRID_CIFAR, dataset="cifar10", loss="hybrid-sc", tau=0.1),
    "hybrid-psc-cifar10lt": dict(_HYBRID_CIFAR, dataset="cifar10", loss="hybrid-psc", tau=1.0),
    "hybrid-sc-cifar100lt": dict(_HYBRID_CIFAR, dataset="cifar100", loss="hybrid-sc", tau=0.1),
    "hybrid-psc-cifar100lt": dict(_HYBRID_CIFAR, dataset="cifar100", loss="hybrid-psc", tau=0.1),
    # "for the SC loss the number of positives is fixed at 2": our reading, groups of 2 images of a class
    "hybrid-inat": dict(model="resnet50", dataset="inat", image_size=224, loss="hybrid-sc", tau=0.1,
                        batch_size=100, lr=0.05, momentum=0.9, wd=1e-4, epochs=100, milestones=[60, 80],
                        alpha_schedule="linear", positives=2),
})
# Wang et al.'s CE row (70.36 at beta 100) is Cao et al. 2019's (LDAM-DRW) CE run, from its public
# cifar_train.py: lr x (e+1)/5 in epochs 0-4, x0.01 from 160, x0.0001 from 180. It reports the best epoch.
RECIPES["ldam-ce-cifar10lt"] = dict(model="resnet32", dataset="cifar10", loss="ce", imbalance_ratio=100.0,
                                    batch_size=128, lr=0.1, momentum=0.9, wd=2e-4, epochs=200, warmup_epochs=5,
                                    milestones=[160, 180], gamma=0.01, normalize="ldam")
# Yu et al. 2023 (MKSMT): Swin-L with ImageNet-22K weights (--weights, the official release, e.g.
# swin_large_patch4_window7_224_22k.pth), OPM heads on S3 and S4, two-step training, decision
# distillation with T = 1, lambda1 = lambda2 = 1. not in the paper (its Tables 2-3 are images):
# 224 px (the window-7 22K release), batch 16, SGD lr 0.005 momentum 0.9, wd 5e-4, 50 epochs, x0.1 at 30, 40.
_MKSMT = dict(model="swin_l", loss="mksmt", image_size=224, multistep=2, kd="decision", temperature=1.0,
              lambda1=1.0, lambda2=1.0, batch_size=16, lr=0.005, momentum=0.9, wd=5e-4, epochs=50, milestones=[30, 40])
# not in the paper: reusing CUB's lambda1 = lambda2 = 1 on NABirds, Dogs. The baseline: plain Swin-L, trained alike.
RECIPES.update({f"mksmt-{name}": dict(_MKSMT, dataset=name) for name in ("cub", "nabirds", "dogs")})
RECIPES["mksmt-cub-baseline"] = {k: v for k, v in dict(_MKSMT, dataset="cub", loss="ce").items()
                                 if k not in ("multistep", "kd", "temperature", "lambda1", "lambda2")}
HYBRID_LOSSES = ("hybrid-sc", "hybrid-psc", "hybrid-mpsc")
# The setup each recipe was published for: a run on its dataset with one of these losses (and SETUP_MORE's
# conditions, tried first) gets the recipe's hyper-parameters whatever its --model (the first match wins);
# --dataset and --loss stay yours, flags you type win, --recipe none turns it off. Others: their own --loss only.
SETUP_LOSSES = {**dict.fromkeys(("lfw-joint", "cub-joint"), ("joint", "center", "ce")),
                **dict.fromkeys(("hybrid-psc-cifar10lt", "hybrid-psc-cifar100lt"), ("hybrid-psc", "hybrid-mpsc"))}
SETUP_MORE = {"mksmt-cub-baseline": {"model": models.SWINS},  # CE on CUB: MKSMT's baseline with a Swin, else Tong's
              "seed001-cifar10": {"imbalance_ratio": (None, 1.0)}}  # CE on CIFAR-10-LT: LDAM-DRW's recipe, not Wu's
RECIPE_SETUPS = {name: dict(dataset=(r["dataset"],), loss=SETUP_LOSSES.get(name, (r["loss"],)), **SETUP_MORE.get(name, {}))
                 for name, r in sorted(RECIPES.items(), key=lambda item: item[0] not in SETUP_MORE)}  # specific first


# ==== Model, loss, optimizer, schedule ================================================
def build_model_from_args(args, num_classes, load_weights=True):
    # None: a checkpoint from before sizes were resolved (32 px model; Swin's heads were PMG's 512 wide)
    old_width = models.PMG_HEAD_WIDTH if args.model in models.SWINS else None
    return models.build_model(
        args.model, num_classes, image_size=args.image_size or 32, block=args.block, shortcut=args.shortcut,
        pretrained=args.pretrained and load_weights, weights=args.weights if load_weights else None,
        plain_init=args.plain_init, deep_sup=args.deep_sup, aux_dropout=args.aux_dropout,
        projection_dim=args.projection_dim if args.loss in HYBRID_LOSSES else 0,
        heads=args.heads if args.loss == "mksmt" else (), head_width=args.head_width or old_width)


def build_criterion(args, num_classes, feat_dim):
    """The loss module that holds learned parameters: the joint objective (Tong, Eq. 8) with
    its (contrastive-)center loss, or the hybrid objective with SC / PSC / MPSC.
    None for CE and MKSMT, whose terms are plain functions."""
    if args.loss in ("ce", "mksmt"):
        return None
    if args.loss == "hybrid-sc":
        return losses.HybridLoss(losses.SupConLoss(args.tau))
    if args.loss in ("hybrid-psc", "hybrid-mpsc"):
        return losses.HybridLoss(losses.PSCLoss(num_classes, args.projection_dim, args.tau, args.num_prototypes,
                                                args.psc_include_positive, args.prototype_weights))
    if args.loss == "joint":
        center = losses.ContrastiveCenterLoss(num_classes, feat_dim, args.delta, args.ctc_reduction)
    else:
        center = losses.CenterLoss(num_classes, feat_dim, args.ctc_reduction, args.center_update)
    return losses.JointSupervisionLoss(center, args.lam)


def build_optimizer(args, model, criterion):
    """SGD over the network; the class centers get their own group: lr --center-lr
    (0.5), no weight decay, momentum --center-momentum (0: the papers' plain SGD).
    PSC prototypes get the network's lr, momentum and schedule, without weight
    decay (not in the paper: the Wang et al. 2021 digest does not say how prototypes are learned)."""
    # not in the paper: the weight decay ("L2 coefficient 0.0001") also applies to BN's weights and biases
    groups = [{"params": list(model.parameters()), "weight_decay": args.wd, "lr": args.lr}]
    if isinstance(criterion, losses.HybridLoss):
        if list(criterion.parameters()):
            groups.append({"params": list(criterion.parameters()), "weight_decay": 0.0, "lr": args.lr})
    elif criterion is not None:
        groups.append({"params": list(criterion.parameters()), "weight_decay": 0.0,
                       "lr": args.center_lr, "momentum": args.center_momentum})
    device = groups[0]["params"][0].device
    optimizer = torch.optim.SGD(groups, lr=args.lr, momentum=args.momentum, fused=utils.fused_sgd_works(device))
    utils.init_momentum_buffers(optimizer)
    return optimizer


def build_scheduler(args, optimizer, iters_per_epoch):
    """Per-iteration schedule: ``--warmup-iters`` at ``--warmup-lr`` (or ``--warmup-epochs``
    N: lr x (e + 1) / N in epoch e < N), then ``--lr`` multiplied by ``--gamma`` at each
    milestone (Wu's recipe: 0.01 for 500 iterations, 0.1, /10 at 32k/48k/64k; LDAM-DRW's:
    0.02, 0.04, ... 0.1 over 5 epochs, x0.01 at 160 and 180). The centers' lr stays constant unless
    ``--center-lr-schedule`` (our choice: the paper gives them a fixed 0.5)."""
    scale = 1 if args.milestone_unit == "iter" else iters_per_epoch
    milestone_iters = [m * scale for m in args.milestones]

    def network_factor(iteration):
        if iteration < args.warmup_iters:
            return args.warmup_lr / args.lr
        if iteration < args.warmup_epochs * iters_per_epoch:  # a linear ramp, one step per epoch
            return (iteration // iters_per_epoch + 1) / args.warmup_epochs
        return args.gamma ** sum(iteration >= m for m in milestone_iters)

    factors = [network_factor]
    if len(optimizer.param_groups) > 1:
        scheduled = args.center_lr_schedule or args.loss in HYBRID_LOSSES
        factors.append(network_factor if scheduled else (lambda iteration: 1.0))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factors)


# ==== One training step per method: forward -> loss -> backward -> optimizer step ====
# Each returns (loss, {term: detached 0-dim tensor}, applied: 0-dim bool) and reads nothing to
# the host: utils.backward_and_step skips a non-finite loss on the device.
def top1(logits, labels):
    """Top-1 (%) on this batch, a 0-dim tensor left on the device (logged as train_top1)."""
    return (logits.argmax(dim=1) == labels).float().mean().detach() * 100.0


def add_deep_supervision(loss, parts, out, labels, aux_weight):
    """With --deep-sup: L = L_main + alpha_t * sum_s CE(aux head s) (Wang et al. 2015)."""
    if not out.get("aux_logits"):
        return loss, parts
    loss, aux_parts = losses.deep_supervision_loss(loss, out["aux_logits"], labels, aux_weight)  # (B, K) each
    return loss, {**parts, **aux_parts}


def ce_step(batch, model, optimizer, place, amp, scaler=None, aux_weight=0.0):
    """Softmax cross-entropy (+ deep supervision). batch: images (B, 3, H, W), labels (B,)."""
    images, labels = place(batch[0]), place(batch[1])
    with amp():
        out = model(images)                                               # logits (B, K)
    out32 = utils.to_float32(out)                                         # the losses run in fp32
    loss = F.cross_entropy(out32["logits"], labels)
    loss, parts = add_deep_supervision(loss, {"ce": loss.detach()}, out32, labels, aux_weight)
    applied = utils.backward_and_step(optimizer, loss, scaler)
    return loss, {**parts, "top1": top1(out["logits"], labels)}, applied


def center_step(batch, model, criterion, optimizer, place, amp, scaler=None, aux_weight=0.0):
    """CE + lambda * contrastive-center loss (--loss joint, Tong's write-up, Eq. 7-8) or Wen et al.'s
    center loss (--loss center) on the deep feature, the input of the final FC
    (+ deep supervision). batch: images (B, 3, H, W), labels (B,)."""
    images, labels = place(batch[0]), place(batch[1])
    with amp():
        out = model(images)                                               # logits (B, K), embedding (B, d)
    out32 = utils.to_float32(out)
    # Tong's Eq. 8 (or Wen's L_S + lambda L_C); distributed, a summed center term counts every process's share
    loss, parts = criterion(out32["logits"], out32["embedding"], labels, shards=utils.world_size())
    loss, parts = add_deep_supervision(loss, parts, out32, labels, aux_weight)
    applied = utils.backward_and_step(optimizer, loss, scaler)
    return loss, {**parts, "top1": top1(out["logits"], labels)}, applied


def hybrid_step(batch, model, criterion, optimizer, place, amp, alpha, scaler=None, aux_weight=0.0):
    """The hybrid network (Wang et al. 2021): alpha * SC / PSC / MPSC on the projected
    views of an instance-sampled batch + (1 - alpha) * CE on a class-balanced batch.
    batch: ((views (B, 2, 3, H, W), labels (B,)), (images (B', 3, H, W), labels (B',))); P: --projection-dim.
    not in the paper (it follows BBN's joint training, silent on passes): one forward pass per
    branch, as BBN's code, so each batch has its own BN statistics; both update the running ones."""
    (views, con_labels), (ce_images, ce_labels) = batch
    con_labels, ce_labels = place(con_labels), place(ce_labels)
    B = len(con_labels)
    with amp():
        con_out = model(place(views.flatten(0, 1)))      # projection (2B, P): the contrastive branch
        ce_out = model(place(ce_images))                 # logits (B', K): the classifier branch
    projections = utils.to_float32(con_out, ("projection",))["projection"].view(B, 2, -1)   # (B, 2, P): image b's views
    # distributed: positives and negatives span every process's batch, as on the paper's one device
    projections, con_labels = utils.gather(projections), utils.gather(con_labels)   # (N B, 2, P), (N B,)
    ce_out32 = utils.to_float32(ce_out)
    loss, parts = criterion(projections, con_labels, ce_out32["logits"], ce_labels, alpha)   # digest's Eq. (1)
    loss, parts = add_deep_supervision(loss, parts, ce_out32, ce_labels, aux_weight)  # heads on the CE batch
    applied = utils.backward_and_step(optimizer, loss, scaler)
    return loss, {**parts, "top1": top1(ce_out["logits"], ce_labels)}, applied


def distillation(out, kd, temperature, detach_teacher, t2_scale):
    """Sum of the KD terms from the deepest head (teacher, S4) to every shallower
    computed head (students): decision KD (Yu et al., Eq. 2/6) or feature KD (MSE). not in the
    paper: the teacher is detached (detach_teacher) and, with three heads, every shallower head
    distils from the deepest (the paper pairs only S4 -> S3)."""
    teacher_logits, teacher_feature = out["head_logits"][-1], out["head_features"][-1]
    if kd == "feature":
        return sum(losses.feature_kd_loss(f, teacher_feature, detach_teacher) for f in out["head_features"][:-1])
    return sum(losses.kd_loss(z, teacher_logits, temperature, detach_teacher, t2_scale)
               for z in out["head_logits"][:-1])


def mksmt_step(batch, model, optimizer, place, amp, heads, multistep=2, kd="decision", kd_exec="sync",
               lambda1=1.0, lambda2=1.0, scaler=None, **kd_settings):
    """MKSMT's per-batch multi-step training (Yu et al. 2023, Algorithm 2).

    With heads on stages h_1 < ... < h_n (default S3, S4; logged ce_s<i>, i from 0: S3 is ce_s2):
      multistep 2 or 3 (n steps): for each shallower head h_i in turn, run the
        network only up to h_i, take CE(h_i) and one optimizer step, which moves
        S1..h_i and that head only (Eq. 3). Then run the whole network, step on and log
            L_total = lambda1 * CE(h_n) + lambda2 * sum_i KD(h_n -> h_i)      (Eq. 5-7)
      multistep 1: one step on sum_i CE(h_i) + lambda1 * CE(h_n) + lambda2 * KD.
      kd "none" drops the KD term (the "multi-step without KD" ablation).
      kd_exec "async" (our reading of "asynchronous"): the last step is split in two
        updates, lambda1 * CE(h_n), then a new forward pass and lambda2 * KD (logged: the sum).
    kd_settings: temperature, detach_teacher, t2_scale. batch: images (B, 3, H, W), labels (B,)."""
    images, labels = place(batch[0]), place(batch[1])
    parts, applied = {}, torch.ones((), dtype=torch.bool, device=images.device)
    if multistep > 1:
        for stage in heads[:-1]:
            with amp():
                ce = F.cross_entropy(model(images, upto=stage)["logits"], labels)   # Eq. (3)
            parts[f"ce_s{stage}"] = ce.detach()
            applied = applied & utils.backward_and_step(optimizer, ce, scaler)
    split_kd = multistep > 1 and kd_exec == "async" and kd != "none"   # KD gets its own forward pass below
    with amp():
        out = model(images)                               # head_logits [(B, K) per head], logits = deepest
        ce_last = F.cross_entropy(out["logits"], labels)
        kd_term = distillation(out, kd, **kd_settings) if kd != "none" and not split_kd else ce_last.new_zeros(())
    parts[f"ce_s{heads[-1]}"], parts["kd"] = ce_last.detach(), kd_term.detach()
    if multistep == 1:
        with amp():
            shallow = [F.cross_entropy(z, labels) for z in out["head_logits"][:-1]]   # autocast: in fp32
        parts.update({f"ce_s{stage}": ce.detach() for stage, ce in zip(heads[:-1], shallow)})
        loss = sum(shallow) + lambda1 * ce_last + lambda2 * kd_term  # not in the paper: the one-step ablation
    elif split_kd:
        applied = applied & utils.backward_and_step(optimizer, lambda1 * ce_last, scaler)
        with amp():
            kd_term = distillation(model(images), kd, **kd_settings)
        parts["kd"] = kd_term.detach()
        loss = lambda2 * kd_term
    else:
        loss = lambda1 * ce_last + lambda2 * kd_term                              # Eq. (7)
    applied = applied & utils.backward_and_step(optimizer, loss, scaler)
    logged = loss + lambda1 * parts[f"ce_s{heads[-1]}"] if split_kd else loss   # L_total either way
    return logged, {**parts, "top1": top1(out["logits"], labels)}, applied   # top1: the deepest head, full pass


STEPS = {"ce": ce_step, "center": center_step, "joint": center_step, "hybrid-sc": hybrid_step,
         "hybrid-psc": hybrid_step, "hybrid-mpsc": hybrid_step, "mksmt": mksmt_step}


def bind_step(args, model, criterion, optimizer, scaler, device, aux_weight=0.0, alpha=None):
    """--loss's step function with this run's settings bound: step(batch) -> (loss, parts, applied)."""
    common = dict(model=model, optimizer=optimizer, scaler=scaler, amp=functools.partial(utils.autocast, args.amp,
                  device.type), place=functools.partial(utils.to_device, device=device, channels_last=args.channels_last))
    if args.loss == "mksmt":
        settings = dict(heads=args.heads, multistep=args.multistep, kd=args.kd, kd_exec=args.kd_exec,
                        lambda1=args.lambda1, lambda2=args.lambda2, temperature=args.temperature,
                        detach_teacher=not args.kd_no_detach, t2_scale=not args.kd_no_t2)
    else:
        settings = dict(aux_weight=aux_weight, **({"criterion": criterion} if criterion is not None else {}),
                        **({"alpha": alpha} if args.loss in HYBRID_LOSSES else {}))
    return functools.partial(STEPS[args.loss], **common, **settings)


# ==== The epoch and the evaluation ===================================================
def train_one_epoch(model, criterion, step, loader, optimizer, scheduler, run, epoch, cuda_graphs=False):
    """Run ``loader`` (the rest of the epoch when resumed) through ``step`` until the
    epoch or the run ends. The loss sums and the non-finite guard stay on the
    device (``utils.StepMeter``) and are read once per --print-freq window; ``run``
    prints, checkpoints and stops between steps. Returns the epoch's mean loss terms."""
    model.train()
    if criterion is not None:
        criterion.train()
    meter = run.start_epoch(epoch)
    for batch in loader:
        if cuda_graphs:
            torch.compiler.cudagraph_mark_step_begin()  # the previous step's outputs may be reused
        loss, parts, applied = step(batch)               # forward, loss, backward, optimizer step
        meter.add(loss, parts, applied)                  # on the device: the host does not wait
        scheduler.step()
        if run.end_step(meter, optimizer.param_groups[0]["lr"]):
            break
    return run.end_epoch(meter)


@torch.no_grad()
def evaluate(model, loader, device, num_classes, train_counts=None, many_threshold=100, few_threshold=20,
             flip=None, amp="none", channels_last=False):
    """Top-1 / top-5 (top-K when K < 5) and per-class top-1 (%) on ``loader``; with
    ``train_counts`` also many / medium / few-shot top-1 (the mean per-class accuracy of
    each group, None if empty); every MKSMT head's and auxiliary head's top-1. ``flip``
    "h" / "v" mirrors the images (MKSMT's robustness test). Distributed: each process
    counts its shard, the counts are summed. One device-to-host copy at the end."""
    model.eval()
    k = min(5, num_classes)
    aux_stages, head_stages = getattr(model, "aux_stages", []), getattr(model, "head_stages", [])
    # counts: correct top-1, correct top-k, loss sum, then one per aux head and per MKSMT head
    counts = torch.zeros(3 + len(aux_stages) + len(head_stages), dtype=torch.float64, device=device)
    class_correct = torch.zeros(num_classes, dtype=torch.float64, device=device)   # (K,)
    class_total = torch.zeros(num_classes, dtype=torch.float64, device=device)     # (K,)
    for images, labels in loader:
        images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        if flip is not None:
            images = torch.flip(images, dims=[3 if flip == "h" else 2])   # (B, 3, H, W)
        images = images.contiguous(memory_format=torch.channels_last) if channels_last else images
        with utils.autocast(amp, device.type):
            out = model(images)
        logits = out["logits"].float()                                   # (B, K)
        topk = logits.topk(k, dim=1).indices                             # (B, k)
        # argmax, not topk[:, 0]: topk breaks ties (common in bf16) in no fixed order, and
        # top1 must equal the deepest head's argmax count below
        hit1 = (logits.argmax(1) == labels).double()                     # (B,)
        extra_logits = [*out.get("aux_logits", []), *out.get("head_logits", [])]
        counts += torch.stack([hit1.sum(), (topk == labels[:, None]).any(1).double().sum(),
                               F.cross_entropy(logits, labels, reduction="sum").double(),
                               *[(z.float().argmax(1) == labels).double().sum() for z in extra_logits]])
        class_total.index_add_(0, labels, torch.ones_like(hit1))
        class_correct.index_add_(0, labels, hit1)
    if utils.world_size() > 1:  # sum over the shards
        for tensor in (counts, class_correct, class_total):
            torch.distributed.all_reduce(tensor)  # NCCL needs them on the GPU
    flat = torch.cat([counts, class_correct, class_total]).tolist()     # the one device-to-host copy
    n_counts, (correct1, correct5, loss_sum) = len(counts), flat[:3]
    aux_correct, head_correct = flat[3:3 + len(aux_stages)], flat[3 + len(aux_stages):n_counts]
    class_correct, class_total = flat[n_counts:n_counts + num_classes], flat[n_counts + num_classes:]
    total = sum(class_total)
    per_class = [100.0 * c / t if t else None for c, t in zip(class_correct, class_total)]  # None: no test image
    present = [t > 0 for t in class_total]
    shots = {}
    if train_counts is not None:
        for group, classes in data.shot_groups(train_counts, many_threshold, few_threshold).items():
            classes = [c for c in classes if present[c]]
            shots[f"{group}_top1"] = sum(per_class[c] for c in classes) / len(classes) if classes else None
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "loss": loss_sum / total,
            "n": int(total), "balanced_top1": sum(p for p, ok in zip(per_class, present) if ok) / sum(present), **shots,
            **{f"aux_top1_stage{s}": 100.0 * c / total for s, c in zip(aux_stages, aux_correct)},
            **{f"head_top1_stage{s}": 100.0 * c / total for s, c in zip(head_stages, head_correct)},
            "per_class": per_class}


# ==== main ============================================================================
def main(args):
    rank, world_size, device, started = utils.setup_distributed(args.device, args.sync_bn)
    try:
        return train(args, rank, world_size, device)
    finally:
        if started:  # first free the DDP wrappers left in reference cycles: they hold the process group, and
            gc.collect()  # gloo torn down at interpreter exit can abort ("terminate called without an active exception")
            torch.distributed.destroy_process_group()


def build(args, rank, world_size, device):
    """Everything a run needs, built in a fixed order (it fixes the RNG draws), and
    checked before anything is written (but a first CIFAR run's ./data). Returns the parts, as attributes."""
    utils.seed_everything((args.seed + rank) % 2 ** 32, args.deterministic)  # own dropout per rank; DDP copies its init
    if args.amp == "fp16" and device.type != "cuda":
        raise data.DataError("--amp fp16 needs a CUDA device; use --amp bf16 on CPU")
    train_set, test_set, num_classes = utils.build_datasets_from_args(args)
    train_set, val_set = utils.split_off_validation(args, train_set, test_set)
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
    train_model, eval_model = utils.prepare_model(model, device, world_size, args.channels_last, args.sync_bn,
                                                  args.compile, unused_parameters=args.loss == "mksmt")
    optimizer = build_optimizer(args, model, criterion)  # after channels-last: buffers take the weights' strides
    train_criterion = utils.prepare_criterion(criterion, world_size)
    train_loader, sampler = utils.train_loader_from_args(args, train_set, device, args.loss in HYBRID_LOSSES, rank,
                                                         world_size)
    eval_normalize = None if args.loader == "torch" else args.normalize  # None: the PIL test transform, as trained
    eval_loaders = {name: data.make_test_loader(dataset, args.eval_batch_size or args.batch_size, args.workers,
                                                device, rank, world_size, eval_normalize)
                    for name, dataset in (("val", val_set), ("test", test_set)) if dataset is not None}
    iters_per_epoch = len(train_set) // (args.batch_size * world_size)
    total_iters = args.iters or args.epochs * iters_per_epoch
    epochs = math.ceil(total_iters / iters_per_epoch)
    summary = utils.run_summary(args.model, models.count_parameters(model), (train_set, val_set, test_set), num_classes,
                                (iters_per_epoch, total_iters, epochs), device, world_size,
                                "tensor" if data.use_tensor_loader(train_set, args.loader) else "torch",
                                args.milestones, args.milestone_unit)
    train_counts = torch.bincount(torch.as_tensor(train_set.targets), minlength=num_classes).tolist()
    facts = dict(num_classes=num_classes, classes=[str(c) for c in test_set.classes], train_counts=train_counts)
    return types.SimpleNamespace(  # data_facts: in the checkpoint, for evaluate.py
        model=model, train_model=train_model, eval_model=eval_model, criterion=criterion, optimizer=optimizer,
        train_criterion=train_criterion, scheduler=build_scheduler(args, optimizer, iters_per_epoch),
        scaler=torch.amp.GradScaler(device.type) if args.amp == "fp16" else None, train_loader=train_loader,
        sampler=sampler, eval_loaders=eval_loaders, num_classes=num_classes, iters_per_epoch=iters_per_epoch,
        total_iters=total_iters, epochs=epochs, summary=summary, train_counts=train_counts, data_facts=facts)


def train(args, rank, world_size, device):
    """Build, resume, then for each epoch: train, evaluate, log, checkpoint."""
    args.output_dir = args.output_dir or utils.default_output_dir(args)
    b = build(args, rank, world_size, device)
    model, criterion, optimizer, scheduler, scaler = b.model, b.criterion, b.optimizer, b.scheduler, b.scaler
    resumed, ckpt = utils.resume(args, model, criterion, optimizer, scheduler, scaler)
    if rank == 0:
        utils.prepare_output_dir(args, resumed and ckpt["iteration"], resumed, utils.environment(device, world_size))
    print(config_line(args), b.summary, sep="\n", flush=True)
    iters_per_epoch, total_iters, epochs = b.iters_per_epoch, b.total_iters, b.epochs
    ckpt_path, metrics_path = (os.path.join(args.output_dir, f) for f in ("checkpoint.pth", "metrics.jsonl"))
    run = utils.Run(total_iters, iters_per_epoch, args.batch_size * (3 if args.loss in HYBRID_LOSSES else 1),  # 2B views + B
                    device, args.print_freq, args.save_every, args.skip_nonfinite,
                    save=lambda: utils.save_training_checkpoint(ckpt_path, rank, run, model, criterion, optimizer,
                                                                scheduler, scaler, args, b.data_facts),
                    world_size=world_size)
    run.begin(utils.restore_progress(resumed, ckpt, rank, device) if resumed else None)
    if run.iteration >= total_iters:
        print(f"{resumed} already holds all {total_iters} iterations; nothing to do", flush=True)
        return 0
    aux_weight_at = lambda epoch: losses.deep_supervision_weight(args.aux_weight, epoch, epochs, args.aux_decay, args.aux_stop)
    if args.probe_gradients:
        step = bind_step(args, b.train_model, b.train_criterion, optimizer, scaler, device, aux_weight_at(0))
        models.probe_gradients(b.model, step, b.train_loader, b.sampler, scheduler, args.probe_gradients,
                               args.probe_threshold, os.path.join(args.output_dir, "gradient_probe.csv"))
        return 0
    result = None
    try:
        with run.signals_stop_at_a_step_boundary():
            for epoch in range(run.iteration // iters_per_epoch, epochs):
                b.sampler.set_epoch(epoch, (run.iteration - epoch * iters_per_epoch) * args.batch_size)
                alpha = losses.hybrid_alpha(epoch, epochs, args.alpha_schedule, args.alpha) \
                    if args.loss in HYBRID_LOSSES else None
                weight = aux_weight_at(epoch) if args.deep_sup else None  # None: no head, null in metrics.jsonl
                step = bind_step(args, b.train_model, b.train_criterion, optimizer, scaler, device, weight, alpha)
                train_stats = train_one_epoch(b.train_model, criterion, step, b.train_loader, optimizer, scheduler,
                                              run, epoch, cuda_graphs=args.compile in ("reduce-overhead", "max-autotune"))
                train_stats = utils.reduce_mean(train_stats, world_size, device)
                if (epoch + 1) % args.eval_every == 0 or run.iteration >= total_iters:
                    utils.broadcast_buffers(model)  # evaluate the BN statistics the checkpoint holds (rank 0's)
                    results = {name: evaluate(b.eval_model, loader, device, b.num_classes, b.train_counts,
                                              args.many_threshold, args.few_threshold, amp=args.amp,
                                              channels_last=args.channels_last)
                               for name, loader in b.eval_loaders.items()}
                    result = results["test"]
                    if rank == 0:
                        utils.log_evaluation(metrics_path, epoch, run.iteration, train_stats, results, {
                            "aux_weight": weight, "alpha": alpha, "lr": optimizer.param_groups[0]["lr"],
                            "skipped_nonfinite": run.skipped_nonfinite, "seconds": round(run.progress()["seconds"], 1)})
                run.save()
                run.stop_if_signalled(f"after epoch {epoch}")  # one process: a signal in its last step or evaluation
    except utils.StopTraining as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return e.exit_code
    if result is not None:
        print(f"final (last evaluation, epoch {epoch}): top1 {result['top1']:.2f} "
              f"top5 {result['top5']:.2f} balanced top1 {result['balanced_top1']:.2f}", flush=True)
    return 0


# ==== The command line: one argument group per method ===============================
def get_args_parser(add_help=True):
    p = utils.OneLineErrorParser(description=__doc__.split("\n\n")[0], add_help=add_help)
    group = functools.partial(utils.conditional_group, p)
    p.add_argument("--recipe", choices=sorted(RECIPES) + ["none"],
                   help="a paper's hyper-parameters, over the defaults shown here (default: the recipe published for "
                        "the run's setup (dataset, loss, ...: README), if any: seed001-cifar10 for a bare run; none: none)")
    p.add_argument("--loss", default="ce", choices=["ce", "center", "joint", *HYBRID_LOSSES, "mksmt"],
                   help="joint = CE + lambda * contrastive-center (Tong, Eq. 8); center = CE + lambda * center "
                        "loss; hybrid-* = alpha * SC/PSC/MPSC + (1 - alpha) * CE (class-balanced batch); "
                        "mksmt = per-stage OPM heads, self-distillation, multi-step training")
    g = p.add_argument_group("model")
    g.add_argument("--model", default="resnet32", choices=models.MODEL_NAMES, help="backbone (models.py)")
    g.add_argument("--pretrained", action="store_true", help="torchvision ImageNet weights")
    g.add_argument("--weights", help="local state dict to initialise the backbone from")
    group("one-stream sampling", ("a --loss other than hybrid-* (theirs: --hybrid-ce-sampler)",
                                  lambda a: a.loss not in HYBRID_LOSSES)).add_argument(
        "--sampler", default="instance", choices=["instance", "class-balanced"],
        help="each image once per epoch, shuffled (instance), or a uniform class then a uniform image of it, "
             "with replacement (class-balanced: the hybrid network's CE-branch sampler, here alone)")
    g = group("CIFAR ResNet", ("a CIFAR ResNet --model (" + ", ".join(models.CIFAR_RESNETS) + ")",
                               lambda a: a.model in models.CIFAR_RESNETS))
    g.add_argument("--block", default="post", choices=["post", "preact"], help="post-activation or Wu's unit")
    g.add_argument("--shortcut", default="A", choices=["A", "B"], help="CIFAR ResNet shortcut option")
    g = group("plain network", ("a plain --model (" + ", ".join(models.PLAIN_NETS) + ")",
                                lambda a: a.model in models.PLAIN_NETS))
    g.add_argument("--plain-init", default="xavier", choices=["xavier", "kaiming"], help="init of the plain nets")
    add_method_arguments(p)
    g = p.add_argument_group("deep supervision")
    g.add_argument("--deep-sup", type=utils.stage_list, default=[], metavar="S,...", help="heads after these stages")
    g.add_argument("--probe-gradients", type=utils.COUNT, default=0, metavar="N",
                   help="train N iterations, write gradient_probe.csv (mean |grad| per layer), "
                        "print where to attach --deep-sup, and stop")
    g = group("deep supervision heads", ("--deep-sup S", lambda a: bool(a.deep_sup)))
    g.add_argument("--aux-weight", type=utils.NON_NEGATIVE, default=0.3, help="alpha_0 (0.3: not in the paper)")
    g.add_argument("--aux-decay", default="linear", choices=["linear", "none", "step"],
                   help="alpha_t = alpha0 * (1 - t/N) (linear), alpha0 (none), or alpha0 then 0 (step)")
    g.add_argument("--aux-dropout", type=utils.BELOW_ONE, default=0.5, help="dropout of the auxiliary FC layers")
    g = group("step decay", ("--deep-sup S with --aux-decay step", lambda a: a.deep_sup and a.aux_decay == "step"))
    g.add_argument("--aux-stop", type=utils.COUNT, help="epoch at which alpha_t drops to 0 (default N/2)")
    g = group("gradient probe", ("--probe-gradients N", lambda a: a.probe_gradients > 0))
    g.add_argument("--probe-threshold", type=utils.POSITIVE, default=1e-7, help="vanishing below (the paper's)")
    utils.add_data_arguments(p)
    g = p.add_argument_group("schedule")
    g.add_argument("--iters", type=utils.COUNT, default=0, help="total iterations; overrides --epochs")
    g.add_argument("--batch-size", type=utils.AT_LEAST_1, default=128, help="per process")
    g.add_argument("--eval-batch-size", type=utils.COUNT, default=0, help="default: --batch-size")
    g.add_argument("--lr", type=utils.POSITIVE, default=0.1, help="SGD learning rate of the network")
    g.add_argument("--momentum", type=utils.BELOW_ONE, default=0.9, help="SGD momentum of the network")
    g.add_argument("--wd", type=utils.NON_NEGATIVE, default=1e-4, help="weight decay of the network")
    g.add_argument("--milestones", type=utils.STEP, nargs="*", default=[100, 150],
                   help="lr x --gamma at these epochs (iterations with --milestone-unit iter)")
    g.add_argument("--warmup-iters", type=utils.COUNT, default=0, help="iterations at --warmup-lr, then --lr")
    group("epoch warm-up", ("--warmup-iters 0", lambda a: a.warmup_iters == 0)).add_argument(
        "--warmup-epochs", type=utils.COUNT, default=0, metavar="N", help="lr x (e + 1) / N in epoch e < N (LDAM-DRW's)")
    group("epochs", ("--iters 0 (--iters overrides --epochs)", lambda a: a.iters == 0)).add_argument(
        "--epochs", type=utils.AT_LEAST_1, default=200, help="training length")
    g = group("milestones", ("--milestones", lambda a: bool(a.milestones)))
    g.add_argument("--milestone-unit", default="epoch", choices=["epoch", "iter"], help="what --milestones count")
    g.add_argument("--gamma", type=utils.GAMMA, default=0.1, help="lr factor at each milestone")
    group("warm-up", ("--warmup-iters N > 0", lambda a: a.warmup_iters > 0)).add_argument(
        "--warmup-lr", type=utils.POSITIVE, default=0.01, help="lr of the first --warmup-iters iterations")
    utils.add_run_arguments(p)
    return p


def add_method_arguments(p):
    """The flags of each method, one argument group each: a flag typed in a run its
    group does not apply to is an error (utils.check_groups)."""
    group = functools.partial(utils.conditional_group, p)
    g = group("joint supervision", ("--loss joint or center", lambda a: a.loss in ("joint", "center")))
    g.add_argument("--lambda", dest="lam", type=utils.NON_NEGATIVE,
                   help="weight of the center term: default 1 for joint (Tong, Eq. 8), 0.003 for center "
                        "(Wen et al.'s; see --ctc-reduction)")
    g.add_argument("--ctc-reduction", choices=["sum", "mean"], help="the center term over the batch (either loss): "
                   "joint sum (Tong, Eq. 7); center mean, as CE, so lambda weighs like-reduced terms as Wen's does")
    g.add_argument("--center-lr", type=utils.POSITIVE, default=0.5, help="SGD lr of the class centers")
    g.add_argument("--center-momentum", type=utils.BELOW_ONE, default=0.0, help="the centers' SGD momentum (papers: none)")
    g.add_argument("--center-lr-schedule", action="store_true", help="warm-up and milestones for the centers too")
    g = group("contrastive-center loss", ("--loss joint", lambda a: a.loss == "joint"))
    g.add_argument("--delta", type=utils.POSITIVE, default=1.0, help="delta of Tong's Eq. 7")
    g = group("center loss", ("--loss center", lambda a: a.loss == "center"))
    g.add_argument("--center-update", default="wen", choices=["wen", "autograd"], help="Wen's step or the gradient")
    g = group("hybrid network", ("--loss hybrid-sc, hybrid-psc or hybrid-mpsc", lambda a: a.loss in HYBRID_LOSSES))
    g.add_argument("--tau", type=utils.POSITIVE, default=0.1, help="SC / PSC temperature (PSC on CIFAR-10: 1)")
    g.add_argument("--alpha-schedule", default="parabolic", choices=["parabolic", "linear", "const"],
                   help="alpha = 1-(t/T)^2 (CIFAR), 1-t/T (iNaturalist) or --alpha")
    g.add_argument("--projection-dim", type=utils.AT_LEAST_1, default=128, help="width of the projection z")
    g.add_argument("--positives", type=utils.COUNT, default=0, metavar="M",
                   help="draw the contrastive batch in groups of M images of one class (data.PositivesSampler); "
                        "0: instance sampling")
    g = group("constant alpha", ("a hybrid --loss with --alpha-schedule const",
                                 lambda a: a.loss in HYBRID_LOSSES and a.alpha_schedule == "const"))
    g.add_argument("--alpha", type=utils.UNIT, default=0.5, help="alpha for --alpha-schedule const")
    g = group("prototypes", ("--loss hybrid-psc or hybrid-mpsc", lambda a: a.loss in ("hybrid-psc", "hybrid-mpsc")))
    g.add_argument("--num-prototypes", type=utils.AT_LEAST_1, help="per class (1; hybrid-mpsc: 4, ours)")
    g.add_argument("--psc-include-positive", action="store_true", help="in the denominator (the paper: not)")
    g = group("MPSC", ("--loss hybrid-mpsc", lambda a: a.loss == "hybrid-mpsc"))
    g.add_argument("--prototype-weights", default="uniform", choices=["uniform", "softmax"],
                   help="MPSC weights w_{i,m}: 1/M, or a softmax over the own class's prototypes")
    g = group("MKSMT", ("--loss mksmt", lambda a: a.loss == "mksmt"))
    g.add_argument("--heads", type=utils.stage_list, metavar="S[,S...]", help="OPM head stages (last 2; 3 for 3 steps)")
    g.add_argument("--head-width", type=utils.AT_LEAST_1, help="OPM width m = f (default per backbone: models.py)")
    g.add_argument("--multistep", type=int, default=2, choices=[1, 2, 3], help="steps per batch (Algorithm 2)")
    g.add_argument("--kd", default="decision", choices=["none", "decision", "feature"],
                   help="self-distillation from the deepest head: softmax outputs, OPM features, or none")
    g.add_argument("--lambda1", type=utils.NON_NEGATIVE, default=1.0, help="weight of CE(deepest head) in the last step")
    g = group("MKSMT distillation", ("--loss mksmt with --kd decision or feature",
                                     lambda a: a.loss == "mksmt" and a.kd != "none"))
    g.add_argument("--lambda2", type=utils.NON_NEGATIVE, default=1.0, help="weight of KD in the last step")
    g.add_argument("--kd-no-detach", action="store_true", help="let the KD gradient reach the teacher head")
    g = group("MKSMT decision distillation", ("--loss mksmt with --kd decision",
                                              lambda a: a.loss == "mksmt" and a.kd == "decision"))
    g.add_argument("--temperature", type=utils.POSITIVE, default=1.0, help="KD temperature T (paper: 1)")
    g.add_argument("--kd-no-t2", action="store_true", help="do not multiply the KD term by T^2")
    g = group("MKSMT multi-step distillation", ("--loss mksmt with --multistep 2 or 3 and --kd decision or feature",
                                                lambda a: a.loss == "mksmt" and a.multistep > 1 and a.kd != "none"))
    g.add_argument("--kd-exec", default="sync", choices=["sync", "async"], help="KD in the last step or its own")


def resolve_defaults(args):
    """Defaults that depend on other flags, resolved once and recorded in config.json."""
    if args.lam is None:
        args.lam = 0.003 if args.loss == "center" else 1.0
    args.ctc_reduction = args.ctc_reduction or ("mean" if args.loss == "center" else "sum")  # see its help
    if args.num_prototypes is None:
        args.num_prototypes = 4 if args.loss == "hybrid-mpsc" else 1
    if args.image_size is None:  # the model's stem and the data's transforms both follow it
        args.image_size = 32 if args.dataset in utils.SMALL_DATASETS else 224
    if args.normalize is None:
        args.normalize = data.DEFAULT_NORMALIZE[args.dataset]
    if args.loss == "mksmt" and args.heads is None:  # the last two stages (three for --multistep 3)
        num_stages = 3 if args.model in models.CIFAR_RESNETS or args.model in models.PLAIN_NETS else 4
        args.heads = list(range(num_stages - max(2, args.multistep), num_stages))
    if args.loss == "mksmt" and args.head_width is None:
        args.head_width = models.default_head_width(args.model)


def parse_args(argv=None):
    """Parse, apply the recipe (--recipe NAME, or the one whose setup matches), parse
    again so typed flags override it, resolve the dependent defaults, then reject a
    flag whose group does not apply and impossible combinations: one line on
    stderr and exit code 2."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = get_args_parser()
    args = before = parser.parse_args(argv)  # before: without a recipe, so a switched-off flag's default
    recipe, matched, values = args.recipe, False, {}
    if recipe is None:  # the first recipe whose setup holds the run's values
        recipe, matched = next((name for name, setup in RECIPE_SETUPS.items()
                                if all(getattr(args, k) in allowed for k, allowed in setup.items())), None), True
    if recipe not in (None, "none"):
        values = RECIPES[recipe]
        own_loss = matched or "loss" in utils.explicit_dests(parser, argv)  # a recipe's loss weights: its loss only
        values = {k: v for k, v in values.items() if not (matched and k in RECIPE_SETUPS[recipe])
                  and not (k in ("lam", "delta") and own_loss and args.loss != values["loss"])}
        parser.set_defaults(**values)
        args = parser.parse_args(argv)
    args.recipe, args.recipe_matched = recipe or "none", matched and recipe is not None
    for dest in utils.switched_off(parser, args) & set(values):  # a recipe's flag in a group the run turned off
        setattr(args, dest, getattr(before, dest))  # (its warm-up after --warmup-iters): back to the default
    resolve_defaults(args)
    problem = utils.check_groups(parser, args, argv)
    if problem:
        parser.error(problem + (f" (recipe {args.recipe} applies to this setup; --recipe none turns it off)"
                                if args.recipe_matched else ""))
    if args.milestones != sorted(args.milestones):
        parser.error(f"--milestones must be numbers >= 0 in increasing order, got {args.milestones}")
    if args.loss == "hybrid-psc" and args.num_prototypes != 1:
        parser.error("--loss hybrid-psc has one prototype per class; use --loss hybrid-mpsc for more")
    if args.few_threshold > args.many_threshold:
        parser.error(f"--few-threshold {args.few_threshold} is above --many-threshold {args.many_threshold}")
    if args.amp == "fp16" and args.loss == "center" and args.center_update == "wen":
        parser.error("--amp fp16 scales the loss, which would shrink Wen's center step by the scale; "
                     "use --amp bf16 or --center-update autograd")
    if args.loss == "mksmt":
        if args.multistep > 1 and len(args.heads) != args.multistep:
            parser.error(f"--multistep {args.multistep} needs {args.multistep} --heads (one step per head), "
                         f"got {args.heads}")
        elif len(args.heads) < 2 and args.kd != "none":
            parser.error("self-distillation needs at least two --heads (a teacher and a student)")
        if args.deep_sup or args.probe_gradients:
            parser.error("--loss mksmt does not combine with --deep-sup / --probe-gradients")
    if args.probe_gradients and (args.loss in HYBRID_LOSSES or int(os.environ.get("WORLD_SIZE", 1)) > 1):
        parser.error("--probe-gradients works with --loss ce / center / joint, in one process (no torchrun)")
    return args


def config_line(args):
    """The recipe and the flags that differ from the defaults, in one line."""  # (resolved defaults too)
    defaults = utils.argparse.Namespace(**{**vars(get_args_parser().parse_args([])), **{
        k: getattr(args, k) for k in ("loss", "dataset", "model", "multistep")}})
    resolve_defaults(defaults)  # a dependent default counts as changed only if it differs from its own default
    return utils.config_line(get_args_parser(), args, vars(defaults))


def cli(argv=None):
    """The command line: a DataError is one line on stderr and exit code 2. Returns the exit code."""
    return utils.run_with_one_line_errors(main, parse_args(argv))


if __name__ == "__main__":
    sys.exit(cli())
