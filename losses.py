"""Losses, one class per loss, each written next to its equation.

Stands alone: imports only torch / stdlib, so it can be copied by itself.
Equation numbers refer to the papers named in each docstring; ``SPEC.md`` has
the English digest. Every loss is tested in ``test_all.py`` against a per-sample
Python loop written from the equation.
"""
import torch
import torch.nn as nn
import torch.nn.functional as F


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


def _reduce(per_sample, reduction):
    if reduction == "sum":
        return per_sample.sum()
    if reduction == "mean":
        return per_sample.mean()
    raise ValueError(f"reduction must be 'sum' or 'mean', got {reduction!r}")


class ContrastiveCenterLoss(nn.Module):
    """Contrastive-center loss (Qi & Su 2017, "Contrastive-center loss for deep
    neural networks", Eq. 7).

        L_ctc = 1/2 * sum_{i=1..B} ||x_i - c_{y_i}||^2
                       / ( sum_{j != y_i} ||x_i - c_j||^2 + delta )          (Eq. 7)

    Pulls each deep feature to its class center while pushing it from all other
    centers; ``delta`` keeps the ratio finite. A class absent from the batch still
    appears in every denominator, so its center is pushed away too.

    Args:
        num_classes: K.
        feat_dim: d, the width of the deep feature (the input of the final FC).
        delta: the constant in the denominator, 1 in the paper.
        reduction: ``"sum"`` over the batch as in Eq. 7 (paper default), or
            ``"mean"`` (divides by B; not in the paper).
    Attributes:
        centers: ``nn.Parameter`` (K, d), learned by SGD in their own parameter
            group (lr 0.5 in the paper).
    Shapes:
        features (B, d) float, labels (B,) int64 -> scalar.
    """

    def __init__(self, num_classes, feat_dim, delta=1.0, reduction="sum"):
        super().__init__()
        self.delta, self.reduction = delta, reduction
        # not in the paper: centers start from N(0, 1) (the paper does not say).
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))

    def forward(self, features, labels):
        features, centers = _common_dtype(features, self.centers)
        dist = squared_distances(features, centers)                          # (B, K)
        intra = dist.gather(1, labels[:, None]).squeeze(1)                  # (B,)  ||x_i - c_{y_i}||^2
        inter = dist.sum(1) - intra                                          # (B,)  sum_{j != y_i}
        per_sample = 0.5 * intra / (inter + self.delta)                      # Eq. (7)
        return _reduce(per_sample, self.reduction)                           # Eq. (7): sum over i


class _WenCenterUpdate(torch.autograd.Function):
    """Identity on the centers going forward; going backward, hands the centers
    Wen et al.'s Eq. 4 step instead of the raw gradient:

        delta c_j = sum_i [y_i = j] (c_j - x_i) / (1 + sum_i [y_i = j])       (Eq. 4)

    so plain SGD at lr alpha performs c_j <- c_j - alpha * delta c_j (Eq. 4's
    update), whatever lambda and the reduction are. A class absent from the batch
    gets delta c_j = 0."""

    @staticmethod
    def forward(ctx, centers, features, labels):
        ctx.save_for_backward(centers, features, labels)
        return centers.clone()

    @staticmethod
    def backward(ctx, grad_centers):
        centers, features, labels = ctx.saved_tensors
        step = torch.zeros_like(centers).index_add_(0, labels, centers[labels] - features)  # (K, d)
        counts = torch.bincount(labels, minlength=centers.shape[0]).to(centers.dtype)       # (K,)
        return step / (1 + counts)[:, None], None, None                                     # Eq. (4)


class CenterLoss(nn.Module):
    """Center loss (Wen, Zhang, Li, Qiao 2016, "A discriminative feature learning
    approach for deep face recognition", Eq. 2 and 4).

        L_C = 1/2 * sum_{i=1..B} ||x_i - c_{y_i}||^2                          (Eq. 2)
        delta c_j = sum_i [y_i = j] (c_j - x_i) / (1 + sum_i [y_i = j])      (Eq. 4)

    The features get the ordinary gradient of Eq. 2. The centers get Eq. 4's
    step (``update="wen"``, default), so SGD at lr alpha (0.5 in the paper; no
    momentum, no weight decay) reproduces Wen's update; ``update="autograd"``
    hands them the raw gradient of lambda * L_C instead (which, summed over a
    batch, overshoots at lr 0.5).

    Args:
        num_classes: K.
        feat_dim: d.
        reduction: ``"sum"`` (paper) or ``"mean"``.
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

    def forward(self, features, labels):
        features, centers = _common_dtype(features, self.centers)
        if self.update == "wen":
            centers = _WenCenterUpdate.apply(centers, features.detach(), labels)
        own_center = centers[labels]                                         # (B, d)
        per_sample = 0.5 * (features - own_center).pow(2).sum(1)             # Eq. (2)
        return _reduce(per_sample, self.reduction)


class JointSupervisionLoss(nn.Module):
    """Joint supervision of softmax and a center-type loss (Qi & Su 2017, Eq. 8).

        L = L_softmax + lambda * L_ctc                                        (Eq. 8)

    The softmax (cross-entropy) term is averaged over the batch as usual; the
    center term keeps its own reduction (Eq. 7 sums over the batch). Passing a
    ``CenterLoss`` gives Wen et al.'s joint objective ``L_S + lambda * L_C``.

    Args:
        center_loss: a ``ContrastiveCenterLoss`` or ``CenterLoss``.
        lam: lambda, 1 in the paper.
    Shapes:
        logits (B, K), embedding (B, d), labels (B,) -> (scalar, {"ce", "center"}).
    """

    def __init__(self, center_loss, lam=1.0):
        super().__init__()
        self.center_loss, self.lam = center_loss, lam

    def forward(self, logits, embedding, labels):
        ce = F.cross_entropy(logits, labels)
        center = self.center_loss(embedding, labels)
        return ce + self.lam * center, {"ce": ce.detach(), "center": center.detach()}  # Eq. (8)


def deep_supervision_weight(alpha0, epoch, epochs, decay="linear", stop_epoch=None):
    """alpha_t, the weight of the auxiliary losses at epoch t (Wang et al. 2015).

        linear: alpha_t = alpha0 * (1 - t / N)                               (Sec. 3)
        none:   alpha_t = alpha0
        step:   alpha_t = alpha0 for t < stop_epoch (default N / 2), then 0

    The seed prints the decay formula as an image; ``linear`` is its common
    reading. not in the paper: ``step`` (DSN-style: drop the companion loss after
    some epochs). t counts from 0, N = ``epochs``.
    """
    if decay == "none":
        return alpha0
    if decay == "linear":
        return alpha0 * (1 - epoch / epochs)
    if decay == "step":
        return alpha0 if epoch < (epochs // 2 if stop_epoch is None else stop_epoch) else 0.0
    raise ValueError(f"decay must be 'linear', 'none' or 'step', got {decay!r}")


def deep_supervision_loss(main_loss, aux_logits, labels, alpha_t):
    """Deep supervision (Wang, Lee, Tu, Lazebnik 2015; seed 004):

        L = L_main + alpha_t * sum_s L_aux,s,    L_aux,s = CE(aux head s)     (Sec. 3)

    Shapes: main_loss scalar, aux_logits list of (B, K), labels (B,)
    -> (scalar, {"aux": detached sum of the auxiliary CE terms}).
    """
    aux = sum(F.cross_entropy(logits, labels) for logits in aux_logits)
    return main_loss + alpha_t * aux, {"aux": torch.as_tensor(aux).detach()}


# ----------------------------------------------------------------------------------
# MKSMT (Yu et al. 2023; seed 002): knowledge self-distillation between stages
# ----------------------------------------------------------------------------------
def kd_loss(student_logits, teacher_logits, temperature=1.0, detach_teacher=True, t2_scale=True):
    """Decision distillation of MKSMT (Yu et al. 2023, Sec. 1.2 Eq. 1, 2 and Sec. 2.4
    Eq. 6; SPEC Sec. 3): the shallower head (student, S3) matches the softened
    output of the deeper one (teacher, S4).

        p_i = exp(z_i / T) / sum_j exp(z_j / T)                               (Eq. 1)
        L_KD = 1/B sum_b sum_i p_t,i (log p_t,i - log p_s,i)  = KL(p_t || p_s) (Eq. 2, 6)
        L_KD <- T^2 * L_KD  when t2_scale                  (Hinton et al. 2015)

    Args:
        temperature: T; 1 in the paper (its sweep: 1, 2, 3, 4, 7, 10).
        detach_teacher: no gradient flows into the teacher head (default).
        t2_scale: multiply by T^2 so the gradient scale does not shrink as 1/T^2.
            not in the paper: the seed does not say; Hinton's convention. No effect at T = 1.
    Shapes:
        student_logits (B, K), teacher_logits (B, K) -> scalar. Computed in at
        least float32, with log_softmax (no exp overflow).
    """
    dtype = torch.promote_types(torch.promote_types(student_logits.dtype, teacher_logits.dtype), torch.float32)
    teacher = teacher_logits.detach() if detach_teacher else teacher_logits
    log_p_s = (student_logits.to(dtype) / temperature).log_softmax(dim=1)    # (B, K)  Eq. (1)
    log_p_t = (teacher.to(dtype) / temperature).log_softmax(dim=1)           # (B, K)  Eq. (1)
    kl = (log_p_t.exp() * (log_p_t - log_p_s)).sum(dim=1).mean()             # Eq. (2), (6)
    return kl * temperature ** 2 if t2_scale else kl


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
