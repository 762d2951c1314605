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


class CenterLoss(nn.Module):
    """Center loss (Wen, Zhang, Li, Qiao 2016, "A discriminative feature learning
    approach for deep face recognition", Eq. 2).

        L_C = 1/2 * sum_{i=1..B} ||x_i - c_{y_i}||^2                          (Eq. 2)

    Args:
        num_classes: K.
        feat_dim: d.
        reduction: ``"sum"`` (paper) or ``"mean"``.
    Attributes:
        centers: ``nn.Parameter`` (K, d).
    Shapes:
        features (B, d) float, labels (B,) int64 -> scalar.

    not in the paper: the centers are updated by the autograd gradient with plain
    SGD (their own param group), not by Wen et al.'s Eq. 4 rule that divides each
    center's step by 1 + (its count in the batch).
    """

    def __init__(self, num_classes, feat_dim, reduction="sum"):
        super().__init__()
        self.reduction = reduction
        self.centers = nn.Parameter(torch.randn(num_classes, feat_dim))

    def forward(self, features, labels):
        features, centers = _common_dtype(features, self.centers)
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
