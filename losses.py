"""Losses, one class per loss, each written next to its equation.

Stands alone: imports only torch / stdlib, so it can be copied by itself.
Every equation number names the document it belongs to, one of the Chinese
texts the project was specified from: Tong C., "Application of joint supervision
loss in deep image classification" ("Tong's write-up"); a Chinese digest of Wang
et al., CVPR 2021 ("the Wang et al. 2021 digest"); Yu et al. 2023 (MKSMT, the
paper itself). A paper that is not among those texts (Qi & Su 2017, Wen et al.
2016, Wang et al. 2015, Khosla et al. 2020) is cited by name or section, never
by an equation number that could not be checked here. A ``# Eq. (n)`` comment
uses the numbering of the docstring above it. README.md (section Code map)
writes every equation out. ``test_all.py`` checks each loss against a per-sample Python
loop (``naive_*`` at the end of this file; feature_kd_loss, deep_supervision_loss: inline).
"""
import functools
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


def full_precision(forward):
    """Run a loss's forward outside autocast, on inputs in at least float32: under
    --amp its matmuls and exponentials would otherwise run in fp16 / bf16, which is
    too coarse for distance ratios and logits divided by a small temperature."""
    @functools.wraps(forward)
    def wrapped(self, *inputs, **options):  # options: plain values (e.g. shards)
        device_type = next((x.device.type for x in inputs if torch.is_tensor(x)), "cpu")
        inputs = [x.to(torch.promote_types(x.dtype, torch.float32))
                  if torch.is_tensor(x) and x.is_floating_point() else x for x in inputs]
        with torch.autocast(device_type, enabled=False):
            return forward(self, *inputs, **options)
    return wrapped


def squared_distances(features, centers):
    """||x_i - c_j||^2 for every sample i and center j.

    Shapes: features (B, d), centers (K, d) -> (B, K).
    Uses the expansion ||x||^2 - 2 x.c + ||c||^2 (no (B, K, d) temporary, so it
    scales to K = 1000, d = 2048), clamped at 0 against round-off.
    """
    return (features.pow(2).sum(1, keepdim=True)              # (B, 1)
            - 2 * features @ centers.t()                       # (B, K)
            + centers.pow(2).sum(1)[None, :]).clamp_min(0)     # (1, K)


def _common_dtype(features, centers):
    """Compute in at least float32 (an fp16/bf16 embedding under autocast would
    lose the small distance ratios), and in float64 when either input is."""
    dtype = torch.promote_types(torch.promote_types(features.dtype, centers.dtype), torch.float32)
    return features.to(dtype), centers.to(dtype)


def _reduce(per_sample, reduction, shards=1):
    """Sum or mean over the batch. ``shards`` processes each holding 1/shards of the batch
    (torch.distributed) multiply a sum by shards: the mean of their losses, and of their
    gradients (what DistributedDataParallel applies), is then the whole batch's sum (not
    in the papers: one device). A mean needs nothing: equal shards average to it."""
    if reduction == "sum":
        return per_sample.sum() * shards
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


class ContrastiveCenterLoss(nn.Module):
    """Contrastive-center loss (Qi & Su 2017, "Contrastive-center loss for deep
    neural networks"), as written in Tong's write-up ("Application of joint
    supervision loss in deep image classification", Sec. 2.2, Eq. 7). The
    number 7 is Tong's; Qi & Su's own numbering is not checked here.

        L_ctc = 1/2 * sum_{i=1..B} ||x_i - c_{y_i}||^2
                       / ( sum_{j != y_i} ||x_i - c_j||^2 + delta )          (Tong, Eq. 7)

    Pulls each deep feature to its class center while pushing it from all other
    centers; ``delta`` keeps the ratio finite. A class absent from the batch still
    appears in every denominator, so its center is pushed away too.

    Args:
        num_classes: K.
        feat_dim: d, the width of the deep feature (the input of the final FC).
        delta: the constant in the denominator, 1 in Tong's write-up.
        reduction: ``"sum"`` over the batch as Tong's Eq. 7 writes it (default), or
            ``"mean"`` (divides by B; not in the paper).
    Attributes:
        centers: ``nn.Parameter`` (K, d), learned by SGD in their own parameter
            group (lr 0.5 in Tong's write-up).
    Shapes:
        features (B, d) float, labels (B,) int64 -> scalar.
    """

    def __init__(self, num_classes, feat_dim, delta=1.0, reduction="sum"):
        super().__init__()
        self.delta, self.reduction = delta, reduction
        # not in the paper: centers start from N(0, 1) (the paper does not say).
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))

    @full_precision
    def forward(self, features, labels, shards=1):
        """``shards``: see ``_reduce`` (1 on one device)."""
        features, centers = _common_dtype(features, self.centers)
        dist = squared_distances(features, centers)                          # (B, K)
        intra = dist.gather(1, labels[:, None]).squeeze(1)                  # (B,)  ||x_i - c_{y_i}||^2
        inter = dist.sum(1) - intra                                          # (B,)  sum_{j != y_i}
        per_sample = 0.5 * intra / (inter + self.delta)                      # Eq. (7)
        return _reduce(per_sample, self.reduction, shards)                   # Eq. (7): sum over i


class _WenCenterUpdate(torch.autograd.Function):
    """Identity on the centers going forward; going backward, hands the centers
    Wen et al.'s center-update step (see ``CenterLoss``) instead of the raw gradient:

        delta c_j = sum_i [y_i = j] (c_j - x_i) / (1 + sum_i [y_i = j])       (Wen's center update)

    so plain SGD at lr alpha performs c_j <- c_j - alpha * delta c_j (Wen's
    update), whatever lambda and the reduction are. A class absent from the batch
    gets delta c_j = 0. With ``over_processes`` (a batch split over the processes of
    torch.distributed) the sums over i run over every process's samples, so each
    process takes the step of the whole batch (not in the paper: one device).
    alpha: Wen's center learning rate (--center-lr), not the hybrid's alpha.
    Shapes: centers (K, d), features (B, d), labels (B,) int64 -> (K, d)."""

    @staticmethod
    def forward(ctx, centers, features, labels, over_processes=False):
        ctx.save_for_backward(centers, features, labels)
        ctx.over_processes = over_processes
        return centers.clone()

    @staticmethod
    def backward(ctx, grad_centers):
        centers, features, labels = ctx.saved_tensors
        step = torch.zeros_like(centers).index_add_(0, labels, centers[labels] - features)  # (K, d)
        # index_add_, not bincount: bincount's output size depends on the data (a device sync)
        counts = torch.zeros_like(centers[:, 0]).index_add_(0, labels, torch.ones_like(features[:, 0]))  # (K,)
        if ctx.over_processes:  # the batch is split over the processes: sum over all of them
            torch.distributed.all_reduce(step)
            torch.distributed.all_reduce(counts)
        return step / (1 + counts)[:, None], None, None, None                               # Wen's center update


class CenterLoss(nn.Module):
    """Center loss (Wen, Zhang, Li, Qiao 2016, "A discriminative feature learning
    approach for deep face recognition": the section that defines the center
    loss L_C and its per-batch center update, and its Algorithm 1). The paper is
    not among this project's sources, so its equation numbers (commonly cited as
    Eq. 2 for L_C and Eq. 4 for the update) are not checked here and not used.

        L_C = 1/2 * sum_{i=1..B} ||x_i - c_{y_i}||^2                          (Wen's L_C)
        delta c_j = sum_i [y_i = j] (c_j - x_i) / (1 + sum_i [y_i = j])      (Wen's center update)

    The features get the ordinary gradient of L_C. The centers get the update
    as their step (``update="wen"``, default), so SGD at lr alpha (0.5 in the paper; no
    momentum, no weight decay) reproduces Wen's update; ``update="autograd"``
    hands them the raw gradient of lambda * L_C instead (which, summed over a
    batch, overshoots at lr 0.5).

    Args:
        num_classes: K.
        feat_dim: d.
        reduction: ``"sum"`` (L_C as written) or ``"mean"``. Wen's paper sums both
            L_S and L_C; beside a batch-mean CE, ``"mean"`` keeps lambda on that scale
            (train.py's ``--loss center`` default; with ``"sum"`` lambda weighs B times more).
        update: ``"wen"`` or ``"autograd"``.
    Attributes:
        centers: ``nn.Parameter`` (K, d).
    Shapes:
        features (B, d) float, labels (B,) int64 -> scalar.
    """

    def __init__(self, num_classes, feat_dim, reduction="sum", update="wen"):
        super().__init__()
        if update not in ("wen", "autograd"):
            raise ValueError(f"update must be 'wen' or 'autograd', got {update!r}")
        self.reduction, self.update = reduction, update
        # not in the paper: centers start from N(0, 1).
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))

    @full_precision
    def forward(self, features, labels, shards=1):
        """``shards``: see ``_reduce``; Wen's step then sums over the processes too."""
        features, centers = _common_dtype(features, self.centers)
        if self.update == "wen":
            centers = _WenCenterUpdate.apply(centers, features.detach(), labels, shards > 1)
        own_center = centers[labels]                                         # (B, d)
        per_sample = 0.5 * (features - own_center).pow(2).sum(1)             # Wen's L_C
        return _reduce(per_sample, self.reduction, shards)


class JointSupervisionLoss(nn.Module):
    """Joint supervision of softmax and a center-type loss (Qi & Su 2017), as
    written in Tong's write-up (Sec. 3, Eq. 8; the softmax loss L_s is its
    Sec. 2.1, Eq. 6).

        L = L_s + lambda * L_ctc                                              (Tong, Eq. 8)

    The softmax (cross-entropy) term L_s is averaged over the batch, as Tong's
    Eq. 6 writes it; the center term keeps its own reduction (Tong's Eq. 7 sums
    over the batch). Passing a ``CenterLoss`` gives Wen et al.'s joint objective ``L_S + lambda * L_C``
    (its lambda as Wen's when both terms are reduced alike: ``reduction="mean"``).

    Args:
        center_loss: a ``ContrastiveCenterLoss`` or ``CenterLoss``.
        lam: lambda, 1 in Tong's write-up.
    Shapes:
        logits (B, K), embedding (B, d), labels (B,) -> (scalar, {"ce", "center"}).
    """

    def __init__(self, center_loss, lam=1.0):
        super().__init__()
        self.center_loss, self.lam = center_loss, lam

    def forward(self, logits, embedding, labels, shards=1):
        """``shards``: the number of processes that each hold 1/shards of the batch
        (torch.distributed; 1 on one device), passed to the center loss (``_reduce``)."""
        ce = F.cross_entropy(logits, labels)                                 # Eq. (6): L_s
        center = self.center_loss(embedding, labels, shards)
        return ce + self.lam * center, {"ce": ce.detach(), "center": center.detach()}  # Eq. (8)


def deep_supervision_weight(alpha0, epoch, epochs, decay="linear", stop_epoch=None):
    """alpha_t, the weight of the auxiliary losses at epoch t (Wang, Lee, Tu,
    Lazebnik 2015, "Training deeper convolutional networks with deep
    supervision"; here from the Wang et al. 2015 digest, section 损失函数 "loss
    function", whose formulas are images without numbers).

        linear: alpha_t = alpha0 * (1 - t / N)
        none:   alpha_t = alpha0
        step:   alpha_t = alpha0 for t < stop_epoch (default N / 2), then 0

    The digest says only that alpha_t decays with the training epoch t and
    prints the formula as an image; ``linear`` is its common reading. not in the
    paper: ``step`` (DSN-style: drop the companion loss after some epochs). t counts from 0, N = ``epochs``.
    """
    if decay == "none":
        return alpha0
    if decay == "linear":
        return alpha0 * (1 - epoch / epochs)  # not in the paper: t = 0..N-1, once per epoch: never 0
    if decay == "step":
        return alpha0 if epoch < (epochs // 2 if stop_epoch is None else stop_epoch) else 0.0
    raise ValueError(f"decay must be 'linear', 'none' or 'step', got {decay!r}")


def deep_supervision_loss(main_loss, aux_logits, labels, alpha_t):
    """Deep supervision (Wang, Lee, Tu, Lazebnik 2015; the Wang et al. 2015 digest,
    section 损失函数 "loss function": the joint loss of the main network and the
    supervision branch, formulas printed as images without numbers):

        L = L_main + alpha_t * sum_s L_aux,s,    L_aux,s = CE(aux head s)

    Shapes: main_loss scalar, aux_logits list of (B, K), labels (B,)
    -> (scalar, {"aux": detached sum of the auxiliary CE terms}).
    """
    aux = sum(F.cross_entropy(logits, labels) for logits in aux_logits)
    return main_loss + alpha_t * aux, {"aux": torch.as_tensor(aux).detach()}


# ----------------------------------------------------------------------------------
# Hybrid network for long-tailed recognition (Wang et al., CVPR 2021), from a
# Chinese digest of the paper ("the digest" below). The digest prints its four
# formulas as images (hybrid total, SC, PSC, MPSC) and numbers only one: its
# implementation details fix "the tau of formula 3" for the SC loss, so SC is
# Eq. 3. It describes the unsupervised contrastive (UC) loss just before SC
# without printing it, so one numbered formula is missing before Eq. 3. We read:
# (1) the hybrid total, [(2) the UC loss, not printed], (3) SC, (4) PSC, (5) MPSC.
# Only Eq. 3 is stated; 1, 4 and 5 are inferred from the order (see each docstring).
# These are the digest's numbers; the paper's own were not checked here.
# ----------------------------------------------------------------------------------
class SupConLoss(nn.Module):
    """Supervised contrastive loss, SC (Khosla et al. 2020; Wang et al. 2021 digest, section
    "Supervised contrastive loss and its memory issue", Eq. 3: its number, "the tau of formula 3").

        L_i = -1/|P(i)| sum_{p in P(i)} log( exp(z_i.z_p / tau) / sum_{a != i} exp(z_i.z_a / tau) )   (Eq. 3)

    over all N = B*V views of the batch: every view is an anchor i, P(i) are the
    other views with the same label, the denominator runs over every view except
    i itself. The loss is the mean of L_i over the anchors that have at least one
    positive; an anchor without one (a class seen once, with V = 1) contributes
    nothing, and a batch without any positive pair gives 0 (with a gradient path).

    not in the paper: the mean over anchors (the equation writes a sum; the
    mean keeps the scale independent of the batch size, as SupContrast does).
    ``base_temperature`` rescales by tau / base_temperature like SupContrast's
    code (its 0.07); None (default) means no rescaling.

    Args:
        temperature: tau, 0.1 for CIFAR and iNaturalist (the digest's implementation details).
        base_temperature: None, or SupContrast's rescaling (see above; not in the paper).
    Shapes:
        features (B, V, d), already L2-normalised; labels (B,) int64 -> scalar.
    """

    def __init__(self, temperature=0.1, base_temperature=None):
        super().__init__()
        self.temperature, self.base_temperature = temperature, base_temperature

    @full_precision
    def forward(self, features, labels):
        B, V, d = features.shape
        z = features.reshape(B * V, d)                                   # (N, d), row b*V + v: view v of image b
        anchor_labels = labels.repeat_interleave(V)                      # (N,)
        logits = z @ z.t() / self.temperature                            # (N, N)
        self_mask = torch.eye(B * V, dtype=torch.bool, device=z.device)
        logits = logits.masked_fill(self_mask, float("-inf"))            # a != i
        log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)  # Eq. (3), stable
        positive = (anchor_labels[:, None] == anchor_labels[None, :]) & ~self_mask  # (N, N)
        num_positive = positive.sum(1)                                   # (N,) |P(i)|
        has_positive = num_positive > 0
        # masked_fill, not multiplication: 0 * -inf on the diagonal would be NaN
        sum_log_prob = log_prob.masked_fill(~positive, 0.0).sum(1)        # (N,)
        per_anchor = -sum_log_prob / num_positive.clamp_min(1)            # (N,) Eq. (3); 0 without a positive
        if self.base_temperature is not None:  # not in the paper: SupContrast's tau / base_temperature
            per_anchor = per_anchor * (self.temperature / self.base_temperature)
        # not in the paper: the mean over anchors with a positive (masks: no data-dependent shape, no sync)
        return per_anchor.sum() / has_positive.sum().clamp_min(1)


class PSCLoss(nn.Module):
    """Prototypical supervised contrastive loss, PSC, and its multi-prototype form
    MPSC (Wang et al., CVPR 2021; Wang et al. 2021 digest, section "Prototypical supervised
    contrastive loss", Eq. 4 and 5). The digest numbers neither: they are the two formulas
    printed after SC's Eq. 3, numbered in sequence (ambiguous if the digest left out a formula between).

    One learnable prototype p_k per class (M per class for MPSC), L2-normalised
    in forward:

        L_i = -log( exp(z_i.p_{y_i} / tau) / sum_{j != y_i} exp(z_i.p_j / tau) )                   (Eq. 4)

        L_i = -sum_m w_{i,m} log( exp(z_i.p^m_{y_i} / tau)
                                  / sum_{j != y_i} sum_{m'} exp(z_i.p^{m'}_j / tau) )          (Eq. 5)

    The digest prints Eq. 4 as an image; we follow its text (C - 1 negatives per
    sample): the denominator excludes the own class. ``include_positive=True`` adds
    it (then Eq. 4 is a softmax cross-entropy over cosine logits). The loss is the
    mean of L_i over all B*V views (not in the paper: a mean, as in ``SupConLoss``).

    MPSC (``num_prototypes`` M > 1): the digest only states w_{i,m} >= 0 and
    sum_m w_{i,m} = 1 (the rule is "left to future work"). not in the paper: our
    weights are ``"uniform"`` (w = 1/M, default) or ``"softmax"`` (w_{i,m} =
    softmax_m(z_i.p^m_{y_i} / tau), detached: the nearest own prototype counts
    most). not in the paper: the denominator sums over all M prototypes of every
    other class.
    not in the paper: prototypes start as random unit vectors (the digest notes the
    initialisation is not described).

    Args:
        num_classes: K (>= 2 unless include_positive: with one class the
            denominator of Eq. 4 is empty).
        feat_dim: D_S (the digest does not give it; 128 is SupContrast's default).
        temperature: tau, 1 for CIFAR-10 and 0.1 for CIFAR-100 (the digest's implementation details).
        num_prototypes: M, 1 for PSC.
    Shapes:
        features (B, V, d) or (B, d), already L2-normalised; labels (B,) -> scalar.
    """

    def __init__(self, num_classes, feat_dim=128, temperature=0.1, num_prototypes=1,
                 include_positive=False, prototype_weights="uniform"):
        super().__init__()
        if num_classes < 2 and not include_positive:
            raise ValueError("PSC needs at least 2 classes: its denominator excludes the positive class")
        if prototype_weights not in ("uniform", "softmax"):
            raise ValueError(f"prototype_weights must be 'uniform' or 'softmax', got {prototype_weights!r}")
        self.num_classes, self.num_prototypes = num_classes, num_prototypes
        self.temperature, self.include_positive = temperature, include_positive
        self.prototype_weights = prototype_weights
        self.prototypes = nn.Parameter(F.normalize(torch.randn(num_classes * num_prototypes, feat_dim), dim=1))

    @full_precision
    def forward(self, features, labels):
        if features.dim() == 3:
            B, V, d = features.shape
            features, labels = features.reshape(B * V, d), labels.repeat_interleave(V)
        K, M = self.num_classes, self.num_prototypes
        prototypes = F.normalize(self.prototypes, dim=1).to(features.dtype)        # (K*M, d)
        logits = (features @ prototypes.t() / self.temperature).view(-1, K, M)   # (N, K, M)
        own = logits[torch.arange(len(labels), device=labels.device), labels]    # (N, M)
        denominator_logits = logits                                              # every class, own included
        if not self.include_positive:
            # a comparison, not F.one_hot, which checks the label range on the host (a device sync)
            is_own = (labels[:, None] == torch.arange(K, device=labels.device))[:, :, None].expand_as(logits)  # (N, K, M)
            denominator_logits = logits.masked_fill(is_own, float("-inf"))      # own class excluded
        log_denominator = torch.logsumexp(denominator_logits.flatten(1), dim=1)  # (N,)
        log_ratio = own - log_denominator[:, None]                               # (N, M)
        if M == 1 or self.prototype_weights == "uniform":
            weights = torch.full_like(own, 1.0 / M)                              # (N, M)
        else:
            weights = own.detach().softmax(dim=1)
        return -(weights * log_ratio).sum(1).mean()  # Eq. (4) / (5); not in the paper: mean, not sum


def hybrid_alpha(epoch, epochs, schedule="parabolic", const=0.5):
    """alpha of the hybrid objective at epoch t (Wang et al. 2021 digest, Eq. 1; see
    ``HybridLoss`` for why that number is inferred):

        L = alpha * L_con + (1 - alpha) * L_CE                               (Eq. 1)

        parabolic: alpha = 1 - (t / T)^2   (CIFAR; the digest's implementation details)
        linear:    alpha = 1 - t / T       (iNaturalist; idem)
        const:     alpha = ``const``       (not in the paper: an ablation)

    t counts epochs from 0, T = ``epochs``.
    """
    if schedule == "parabolic":
        return 1.0 - (epoch / epochs) ** 2  # not in the paper: t = 0..T-1, once per epoch: never 0
    if schedule == "linear":
        return 1.0 - epoch / epochs  # not in the paper: idem
    if schedule == "const":
        return const
    raise ValueError(f"schedule must be 'parabolic', 'linear' or 'const', got {schedule!r}")


class HybridLoss(nn.Module):
    """The hybrid network's objective (Wang et al., CVPR 2021; Wang et al. 2021
    digest, Eq. 1): a contrastive term on the projected views of the
    instance-sampled batch and a CE term on the classifier logits of the
    class-balanced batch.

        L = alpha * L_con + (1 - alpha) * L_CE                               (Eq. 1)

    The digest prints this formula unnumbered, first of its four. Eq. 1 is our
    reading: SC is its Eq. 3 and the UC loss, described but not printed, most
    likely holds Eq. 2; if instead the missing formula came first, this is Eq. 2.

    Args:
        contrastive: a ``SupConLoss`` or ``PSCLoss``.
    Shapes:
        projections (B, V, d) L2-normalised, con_labels (B,), logits (B', K),
        ce_labels (B',), alpha float -> (scalar, {"con", "ce"}).
    """

    def __init__(self, contrastive):
        super().__init__()
        self.contrastive = contrastive

    def forward(self, projections, con_labels, logits, ce_labels, alpha):
        con = self.contrastive(projections, con_labels)
        ce = F.cross_entropy(logits, ce_labels)
        return alpha * con + (1 - alpha) * ce, {"con": con.detach(), "ce": ce.detach()}  # Eq. (1)


# MKSMT (Yu et al. 2023, "Multi-level knowledge self-distillation with multistep
# training for fine-grained image recognition"): self-distillation between stages
# ----------------------------------------------------------------------------------
def kd_loss(student_logits, teacher_logits, temperature=1.0, detach_teacher=True, t2_scale=True):
    """Decision distillation of MKSMT (Yu et al. 2023, Sec. 1.2 Eq. 1, 2 and Sec. 2.4
    Eq. 6; the paper's own numbers; README, Code map): the shallower head
    (student, S3) matches the softened output of the deeper one (teacher, S4).

        p_i = exp(z_i / T) / sum_j exp(z_j / T)                               (Yu et al., Eq. 1)
        L_KD = 1/B sum_b sum_i p_t,i (log p_t,i - log p_s,i)  = KL(p_t || p_s) (Yu et al., Eq. 2, 6)
        L_KD <- T^2 * L_KD  when t2_scale                  (Hinton et al. 2015)

    not in the paper: the 1/B batch mean is our reading (Eq. 2 is printed as an image).

    Args:
        temperature: T; 1 in the paper (its sweep: 1, 2, 3, 4, 7, 10).
        detach_teacher: no gradient flows into the teacher head (default).
        t2_scale: multiply by T^2 so the gradient scale does not shrink as 1/T^2.
            not in the paper: Yu et al. do not say; Hinton's convention. No effect at T = 1.
    Shapes:
        student_logits (B, K), teacher_logits (B, K) -> scalar. Computed in at
        least float32, with log_softmax (no exp overflow).
    """
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    teacher = teacher_logits.detach() if detach_teacher else teacher_logits  # not in the paper: detaching
    log_p_s = (student_logits.to(dtype) / temperature).log_softmax(dim=1)    # (B, K)  Eq. (1)
    log_p_t = (teacher.to(dtype) / temperature).log_softmax(dim=1)           # (B, K)  Eq. (1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()             # Eq. (2), (6); not in the paper: the mean
    return kl * temperature ** 2 if t2_scale else kl  # not in the paper: T^2 (Hinton's convention)


def feature_kd_loss(student_feature, teacher_feature, detach_teacher=True):
    """Feature distillation, an ablation of MKSMT (Yu et al. 2023, Sec. 3.4, Table 11):
    the student's OPM feature (``OPM`` returns it: the input of its last Linear)
    matches the teacher's.

        L = 1/(B d) sum_b sum_k (f_s,bk - f_t,bk)^2

    not in the paper: the feature-distillation ablation's exact distance is not given; MSE.
    Shapes: student_feature (B, d), teacher_feature (B, d) -> scalar.
    """
    teacher = teacher_feature.detach() if detach_teacher else teacher_feature
    # not in the paper: the feature-distillation ablation's exact distance is not given; MSE
    return F.mse_loss(student_feature, teacher)  # mean over B * d elements


# ----------------------------------------------------------------------------------
# Reference loops: each loss written again from its equation, one sample at a time, in
# plain Python floats. Slow and obviously right; test_all.py checks the vectorised losses
# above against them (edge cases included) and benchmark.py times both.
# ----------------------------------------------------------------------------------
def naive_contrastive_center(x, y, c, delta, reduction="sum"):
    """Tong's write-up, Eq. 7 (Qi & Su 2017's contrastive-center loss), one sample and one
    center at a time. x: B lists of d floats, y: B labels, c: K lists of d floats."""
    B, K, d = len(x), len(c), len(x[0])
    total = 0.0
    for i in range(B):
        own = sum((x[i][k] - c[y[i]][k]) ** 2 for k in range(d))
        others = sum(sum((x[i][k] - c[j][k]) ** 2 for k in range(d)) for j in range(K) if j != y[i])
        total += 0.5 * own / (others + delta)
    return total if reduction == "sum" else total / B


def naive_center(x, y, c, reduction="sum"):
    """Wen et al. 2016's L_C = 1/2 sum_i ||x_i - c_{y_i}||^2, one sample at a time."""
    total = sum(0.5 * sum((x[i][k] - c[y[i]][k]) ** 2 for k in range(len(x[0]))) for i in range(len(x)))
    return total if reduction == "sum" else total / len(x)


def naive_supcon(z, y, tau):
    """SC (Khosla et al. 2020; Wang et al. 2021 digest, Eq. 3) over the N views, one anchor at a
    time: the mean over anchors that have a positive of
    -1/|P(i)| sum_p log(e^{z_i.z_p/tau} / sum_{a != i} e^{z_i.z_a/tau}). z: N lists of d floats."""
    N = len(z)
    dot = lambda a, b: sum(p * q for p, q in zip(a, b))
    per_anchor = []
    for i in range(N):
        positives = [p for p in range(N) if p != i and y[p] == y[i]]
        if not positives:
            continue
        denominator = sum(math.exp(dot(z[i], z[a]) / tau) for a in range(N) if a != i)
        per_anchor.append(-sum(math.log(math.exp(dot(z[i], z[p]) / tau) / denominator)
                               for p in positives) / len(positives))
    return sum(per_anchor) / len(per_anchor) if per_anchor else 0.0


def naive_psc(z, y, prototypes, K, M, tau, include_positive=False, weights="uniform"):
    """PSC / MPSC (Wang et al. 2021 digest, Eq. 4 / 5), one view at a time: prototype k*M + m is
    the m-th prototype of class k (normalised here). z: N lists of d floats, y: N labels."""
    norm = lambda v: [a / math.sqrt(sum(b * b for b in v)) for a in v]
    protos = [norm(p) for p in prototypes]
    dot = lambda a, b: sum(p * q for p, q in zip(a, b))
    total = 0.0
    for i in range(len(z)):
        s = [[dot(z[i], protos[k * M + m]) / tau for m in range(M)] for k in range(K)]
        denominator = sum(math.exp(s[k][m]) for k in range(K) for m in range(M)
                          if include_positive or k != y[i])
        own = s[y[i]]
        if weights == "uniform":
            w = [1.0 / M] * M
        else:
            w = [math.exp(v) / sum(math.exp(u) for u in own) for v in own]
        total += -sum(w[m] * math.log(math.exp(own[m]) / denominator) for m in range(M))
    return total / len(z)


def naive_kd(zs, zt, T, t2):
    """Yu et al. 2023, Eq. 1, 2, 6: KL(p_t || p_s) with p_i = exp(z_i/T) / sum_j exp(z_j/T),
    averaged over samples; times T^2 when ``t2``. zs, zt: B lists of K floats."""
    B, K = len(zs), len(zs[0])
    total = 0.0
    for b in range(B):
        ps = [math.exp(zs[b][i] / T) / sum(math.exp(zs[b][j] / T) for j in range(K)) for i in range(K)]
        pt = [math.exp(zt[b][i] / T) / sum(math.exp(zt[b][j] / T) for j in range(K)) for i in range(K)]
        total += sum(pt[i] * (math.log(pt[i]) - math.log(ps[i])) for i in range(K)) / B
    return total * T * T if t2 else total
