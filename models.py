"""Backbones for every method in this repository.

Stands alone: imports only torch / torchvision / stdlib, so it can be copied into
another project by itself.

Every model's ``forward(x)`` returns the same dict, so each training method reads one
interface:

    {"logits":    (B, K)        the K-way class scores,
     "embedding": (B, d)        the input of the final FC layer (the "deep feature"
                                 that the center / contrastive-center losses act on),
     "stages":    [(B, C, H, W), ...]  per-stage feature maps, shallow to deep}

Wrappers add keys: ``DeeplySupervised`` "aux_logits" (deep supervision, Wang et al.
2015), ``MultiLevelHeads`` "head_logits" / "head_features" / "head_stages" (MKSMT's OPM
heads, Yu et al. 2023; the deepest head gives "logits"), ``HybridNet`` "projection"
(the hybrid network's 128-d unit-norm z, Wang et al. CVPR 2021). Every backbone also
has ``run_stages(x, upto)``.

``build_model(name, num_classes, **options)`` is the only entry point a script needs.

CIFAR ResNets (He et al. 2016, Sec. 4.2; 3 groups of n units, 16/32/64 channels,
global average pool, FC). Parameter counts are for option-A shortcuts (parameter
free) and are checked by ``test_all.py``; errors are the paper's Table 6 (CIFAR-10
test error, %, full 50k training set):

    =========  =====  ========  ======================
    name       depth  params    published error (%)
    =========  =====  ========  ======================
    resnet20   20     0.27M     8.75
    resnet32   32     0.46M     7.51
    resnet44   44     0.66M     7.17
    resnet56   56     0.85M     6.97
    resnet110  110    1.7M      6.43
    =========  =====  ========  ======================

Wu's write-up ("Image classification with deep residual learning", Sec. 3.3) reports
91.1% accuracy (8.9% error) for its ResNet-32 variant
(``block="preact"``, see ``CifarResNet``).

torchvision backbones: resnet18 / resnet34 / resnet50 / mobilenet_v2 and
swin_t / swin_s / swin_b / swin_l (swin_l = embed 192, depths 2,2,18,2,
heads 6,12,24,48, built with torchvision's ``SwinTransformer`` class).
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from torchvision.models.resnet import BasicBlock
from torchvision.ops import Conv2dNormActivation

# (depth, parameters with option-A shortcuts, published CIFAR-10 error %): the table above.
CIFAR_RESNETS = {
    "resnet20": (20, 0.27e6, 8.75),
    "resnet32": (32, 0.46e6, 7.51),
    "resnet44": (44, 0.66e6, 7.17),
    "resnet56": (56, 0.85e6, 6.97),
    "resnet110": (110, 1.7e6, 6.43),
}
PLAIN_NETS = {f"plain{depth}": depth for depth in (20, 32, 44, 56, 110)}
TORCHVISION_CNNS = ("resnet18", "resnet34", "resnet50", "mobilenet_v2")
SWINS = ("swin_t", "swin_s", "swin_b", "swin_l")
MODEL_NAMES = tuple(CIFAR_RESNETS) + tuple(PLAIN_NETS) + TORCHVISION_CNNS + SWINS

# Inputs this small use a CIFAR stem on the torchvision CNNs (see TorchvisionCNN).
SMALL_INPUT_MAX = 64


# ----------------------------------------------------------------------------------
# CIFAR ResNets
# ----------------------------------------------------------------------------------
class ZeroPadShortcut(nn.Module):
    """Option-A shortcut (He et al. 2016, Sec. 4.2): subsample by the stride and
    zero-pad the new channels, so no parameters are added."""

    def __init__(self, out_channels, stride):
        super().__init__()
        self.out_channels, self.stride = out_channels, stride

    def forward(self, x):
        x = x[:, :, :: self.stride, :: self.stride]
        extra = self.out_channels - x.shape[1]
        return F.pad(x, (0, 0, 0, 0, extra // 2, extra - extra // 2))


def _shortcut(kind, in_channels, out_channels, stride):
    if stride == 1 and in_channels == out_channels:
        return None
    if kind == "A":
        return ZeroPadShortcut(out_channels, stride)
    if kind == "B":
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=False),
            nn.BatchNorm2d(out_channels),
        )
    raise ValueError(f"shortcut must be 'A' or 'B', got {kind!r}")


class PreActBlock(nn.Module):
    """Pre-activation residual unit (He et al., "Identity mappings", ECCV 2016):
    BN-ReLU-conv3x3-BN-ReLU-conv3x3 plus the shortcut.

    ``activate_before_split=True`` is the first unit of Wu's write-up: BN+ReLU is
    applied once to the input and that activated tensor feeds *both* the residual
    path and the shortcut ("a BN layer and a ReLU layer are also placed on the
    shortcut path of the network's first residual unit", Wu, Sec. 3.2 / Fig. 4).
    """

    def __init__(self, in_channels, out_channels, stride, shortcut, activate_before_split=False):
        super().__init__()
        self.activate_before_split = activate_before_split
        self.bn1 = nn.BatchNorm2d(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, 1, 1, bias=False)
        self.shortcut = _shortcut(shortcut, in_channels, out_channels, stride)

    def forward(self, x):
        activated = F.relu(self.bn1(x))
        split_input = activated if self.activate_before_split else x
        identity = split_input if self.shortcut is None else self.shortcut(split_input)
        out = self.conv1(activated)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + identity


class CifarResNet(nn.Module):
    """CIFAR ResNet of depth 6n+2 (He et al. 2016, Sec. 4.2).

    conv3x3(16) -> 3 groups of n units (16, 32, 64 channels; stride 2 in the first
    unit of groups 2 and 3) -> global average pool -> FC(K).

    Args:
        depth: 20, 32, 44, 56 or 110.
        block: ``"post"`` (default) is the original post-activation unit
            (conv-BN-ReLU-conv-BN, add, ReLU; torchvision's ``BasicBlock``): it is
            the unit behind the published 0.46M / 7.51% row and what most
            reproductions mean by "ResNet-32". ``"preact"`` is the network of Wu's
            write-up: pre-activation units, BN+ReLU before the split in the
            network's first unit, and a final BN+ReLU before pooling (the layout of
            the identity-mappings paper, which Wu cites as [4]).
        shortcut: ``"A"`` zero-padding identity (default, parameter free) or
            ``"B"`` 1x1 conv + BN projection where the shape changes (Wu's
            write-up, Sec. 2.3 / Eq. 23, describes the 1x1 convolution).
    Shapes:
        x (B, 3, H, W) -> logits (B, K), embedding (B, 64),
        stages [(B, 16, H, W), (B, 32, H/2, W/2), (B, 64, H/4, W/4)].
    """

    def __init__(self, depth=32, num_classes=10, block="post", shortcut="A"):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"CIFAR ResNet depth must be 6n+2, got {depth}")
        if block not in ("post", "preact"):
            raise ValueError(f"block must be 'post' or 'preact', got {block!r}")
        n = (depth - 2) // 6
        self.block = block
        if block == "post":
            self.stem = Conv2dNormActivation(3, 16, kernel_size=3)  # conv-BN-ReLU
        else:
            self.stem = nn.Conv2d(3, 16, 3, 1, 1, bias=False)  # pre-act: BN+ReLU is in unit 1
        groups, in_channels = [], 16
        for group_index, channels in enumerate((16, 32, 64)):
            units = []
            for unit_index in range(n):
                stride = 2 if (group_index > 0 and unit_index == 0) else 1
                if block == "post":
                    downsample = _shortcut(shortcut, in_channels, channels, stride)
                    units.append(BasicBlock(in_channels, channels, stride, downsample))
                else:
                    first = group_index == 0 and unit_index == 0
                    units.append(PreActBlock(in_channels, channels, stride, shortcut, first))
                in_channels = channels
            groups.append(nn.Sequential(*units))
        self.groups = nn.ModuleList(groups)
        # Pre-activation units leave the last group's output un-normalised.
        self.final_act = nn.Sequential(nn.BatchNorm2d(64), nn.ReLU()) if block == "preact" else nn.Identity()
        # not in the paper: Wu's write-up (Sec. 3.2) initialises the network with He et al.'s
        # method (its ref. [2]), but the init loop below (torchvision's ResNet loop) only
        # touches convs and BN, so this FC keeps PyTorch's default Linear init (weight and
        # bias uniform in +-1/sqrt(64)), as in torchvision's ResNet; akamaster's CIFAR
        # ResNet would He-init it. Left as is: existing runs depend on it.
        self.fc = nn.Linear(64, num_classes)
        self.stage_channels = [16, 32, 64]
        self.stage_prefixes = [[f"groups.{i}."] for i in range(3)]
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def run_stages(self, x, upto=None):
        """The stage maps [(B, C_s, H_s, W_s)] up to stage ``upto`` (default: all);
        deeper stages are not computed (MKSMT's step 1 stops at its stage)."""
        last = len(self.groups) - 1 if upto is None else upto
        x = self.stem(x)
        stages = []
        for group in self.groups[:last + 1]:
            x = group(x)
            stages.append(x)
        if last == len(self.groups) - 1:
            stages[-1] = self.final_act(stages[-1])
        return stages

    def forward(self, x):
        stages = self.run_stages(x)
        embedding = stages[-1].mean(dim=(2, 3))  # (B, 64)
        return {"logits": self.fc(embedding), "embedding": embedding, "stages": stages}


class PlainNet(nn.Module):
    """Plain CIFAR network of depth 6n+2: the ``CifarResNet`` layout (conv3x3(16),
    3 groups of 2n 3x3 convs with 16/32/64 channels, stride 2 entering groups 2
    and 3, global average pool, FC) with **no shortcuts and no BN**: stacked
    conv-ReLU, the setting in which deep supervision was proposed (Lee et al. 2014;
    Wang et al. 2015) because the early layers' gradients vanish.

    Args:
        init: ``"xavier"`` (default; Glorot & Bengio 2010, the usual init when those
            papers were written) or ``"kaiming"`` (He et al. 2015, fan_in), which
            keeps the signal alive without BN. not in the paper: the Wang et al. 2015
            digest gives no init.
    Shapes: as ``CifarResNet``.
    """

    def __init__(self, depth=56, num_classes=10, init="xavier"):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"plain network depth must be 6n+2, got {depth}")
        n = (depth - 2) // 6
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, 1, 1), nn.ReLU())
        groups, in_channels = [], 16
        for group_index, channels in enumerate((16, 32, 64)):
            layers = []
            for layer_index in range(2 * n):
                stride = 2 if (group_index > 0 and layer_index == 0) else 1
                layers += [nn.Conv2d(in_channels, channels, 3, stride, 1), nn.ReLU()]
                in_channels = channels
            groups.append(nn.Sequential(*layers))
        self.groups = nn.ModuleList(groups)
        self.final_act = nn.Identity()
        self.fc = nn.Linear(64, num_classes)
        self.stage_channels = [16, 32, 64]
        self.stage_prefixes = [[f"groups.{i}."] for i in range(3)]
        for m in self.modules():
            if isinstance(m, (nn.Conv2d, nn.Linear)):
                if init == "xavier":
                    nn.init.xavier_normal_(m.weight)
                elif init == "kaiming":
                    nn.init.kaiming_normal_(m.weight, mode="fan_in", nonlinearity="relu")
                else:
                    raise ValueError(f"init must be 'xavier' or 'kaiming', got {init!r}")
                nn.init.zeros_(m.bias)

    run_stages, forward = CifarResNet.run_stages, CifarResNet.forward  # same stem / groups / pool / fc flow


# ----------------------------------------------------------------------------------
# torchvision CNNs
# ----------------------------------------------------------------------------------
# MobileNetV2 `features` indices that end a resolution stage (/4, /8, /16, /32).
_MOBILENET_STAGE_ENDS = (3, 6, 13, 18)


class TorchvisionCNN(nn.Module):
    """torchvision ResNet-18/34/50 or MobileNetV2 with the project's output dict.

    For inputs of ``SMALL_INPUT_MAX`` (64) px or less the ImageNet stem would shrink
    a 32 px image to 1x1 before the last stage, so a CIFAR stem is used instead:
    ResNets get a 3x3 stride-1 ``conv1`` and no max-pool; MobileNetV2 gets a
    stride-1 first conv. Those stem weights are then freshly initialised, even with
    pretrained weights.

    Shapes:
        x (B, 3, H, W) -> logits (B, K), embedding (B, d) with d = 512 (resnet18/34),
        2048 (resnet50), 1280 (mobilenet_v2); stages = the 4 resolution stages.
    """

    def __init__(self, name, num_classes, image_size=224, pretrained=False):
        super().__init__()
        weights = "DEFAULT" if pretrained else None
        net = getattr(torchvision.models, name)(weights=weights)
        self.name, self.small_input = name, image_size <= SMALL_INPUT_MAX
        if name.startswith("resnet"):
            if self.small_input:
                net.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
                nn.init.kaiming_normal_(net.conv1.weight, mode="fan_out", nonlinearity="relu")
                net.maxpool = nn.Identity()
            net.fc = nn.Linear(net.fc.in_features, num_classes)
            self.stage_channels = [_out_channels(layer) for layer in
                                   (net.layer1, net.layer2, net.layer3, net.layer4)]
            self.stage_prefixes = [[f"net.layer{i}."] for i in range(1, 5)]
        else:
            if self.small_input:
                first = net.features[0][0]
                net.features[0][0] = nn.Conv2d(3, first.out_channels, 3, 1, 1, bias=False)
                nn.init.kaiming_normal_(net.features[0][0].weight, mode="fan_out")
            net.classifier[-1] = nn.Linear(net.classifier[-1].in_features, num_classes)
            self.stage_channels = [_out_channels(net.features[i]) for i in _MOBILENET_STAGE_ENDS]
            starts = (0,) + tuple(end + 1 for end in _MOBILENET_STAGE_ENDS[:-1])
            self.stage_prefixes = [[f"net.features.{i}." for i in range(start, end + 1)]
                                   for start, end in zip(starts, _MOBILENET_STAGE_ENDS)]
        self.net = net

    def run_stages(self, x, upto=None):
        """The 4 stage maps, or those up to stage ``upto`` (deeper ones are not computed)."""
        net, stages, last = self.net, [], 3 if upto is None else upto
        if self.name.startswith("resnet"):
            x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
            for layer in (net.layer1, net.layer2, net.layer3, net.layer4)[:last + 1]:
                x = layer(x)
                stages.append(x)
        else:
            for i, module in enumerate(net.features[:_MOBILENET_STAGE_ENDS[last] + 1]):
                x = module(x)
                if i in _MOBILENET_STAGE_ENDS:
                    stages.append(x)
        return stages

    def forward(self, x):
        stages = self.run_stages(x)
        if self.name.startswith("resnet"):
            embedding = torch.flatten(self.net.avgpool(stages[-1]), 1)  # (B, d)
            logits = self.net.fc(embedding)
        else:
            embedding = stages[-1].mean(dim=(2, 3))  # (B, 1280)
            logits = self.net.classifier(embedding)  # dropout + linear
        return {"logits": logits, "embedding": embedding, "stages": stages}


def _out_channels(module):
    """Channels of the last conv in a module (for heads built on `stages`)."""
    convs = [m for m in module.modules() if isinstance(m, nn.Conv2d)]
    return convs[-1].out_channels


# ----------------------------------------------------------------------------------
# Swin Transformers
# ----------------------------------------------------------------------------------
def swin_l(weights=None, **kwargs):
    """Swin-L (Liu et al. 2021): embed 192, depths 2,2,18,2, heads 6,12,24,48,
    window 7, built with torchvision's ``SwinTransformer`` (torchvision ships no
    Swin-L constructor or weights; load the official weights with ``--weights``)."""
    if weights is not None:
        raise ValueError("torchvision has no Swin-L weights; pass a local file with --weights")
    # not in the paper: drop-path 0.5, torchvision's value for swin_b (the largest it ships).
    kwargs.setdefault("stochastic_depth_prob", 0.5)
    return torchvision.models.SwinTransformer(
        patch_size=[4, 4], embed_dim=192, depths=[2, 2, 18, 2],
        num_heads=[6, 12, 24, 48], window_size=[7, 7], **kwargs)


class Swin(nn.Module):
    """torchvision Swin-T/S/B/L with the project's output dict.

    torchvision's ``features`` alternates stage / patch-merging:
    [patch_embed, stage1, merge, stage2, merge, stage3, merge, stage4]; we record
    the output of each stage (channels-last inside Swin) as an NCHW map.

    Shapes:
        x (B, 3, H, W) -> logits (B, K), embedding (B, 8C) with C = 96 (t, s),
        128 (b), 192 (l); stages [(B, C, H/4, W/4), (B, 2C, H/8, W/8),
        (B, 4C, H/16, W/16), (B, 8C, H/32, W/32)], the last after the final LayerNorm.
    """

    def __init__(self, name, num_classes, pretrained=False):
        super().__init__()
        if name == "swin_l":
            net = swin_l(weights="DEFAULT" if pretrained else None)
        else:
            net = getattr(torchvision.models, name)(weights="DEFAULT" if pretrained else None)
        net.head = nn.Linear(net.head.in_features, num_classes)
        self.net = net
        self.stage_channels = [net.features[i][-1].norm1.normalized_shape[0] for i in (1, 3, 5, 7)]
        self.stage_prefixes = [[f"net.features.{i}.", f"net.features.{i + 1}."] for i in (0, 2, 4, 6)]

    def run_stages(self, x, upto=None):
        """The 4 stage maps as NCHW, or those up to stage ``upto``. The last stage
        is taken after Swin's final LayerNorm (the map the classifier pools)."""
        last = 3 if upto is None else upto
        stages = []
        for i, module in enumerate(self.net.features[:2 * last + 2]):
            x = module(x)  # (B, H, W, C)
            if i % 2 == 1:
                if i == 7:
                    x = self.net.norm(x)
                stages.append(x.permute(0, 3, 1, 2))  # (B, C, H, W)
                x = stages[-1].permute(0, 2, 3, 1)    # the next stage reads this very map (Grad-CAM's gradient)
        return stages

    def forward(self, x):
        stages = self.run_stages(x)
        embedding = stages[-1].mean(dim=(2, 3))  # (B, 8C)
        return {"logits": self.net.head(embedding), "embedding": embedding, "stages": stages}


# ----------------------------------------------------------------------------------
# OPM width m = f (MKSMT's output heads, ``OPM``) when build_model gets head_width=None.
PMG_HEAD_WIDTH = 512   # PMG's head (Du et al. 2020); torchvision CNNs, and old Swin checkpoints
CIFAR_HEAD_WIDTH = 64  # not in the paper: CIFAR ResNets and plain nets have 16-64 channels
# not in the paper: Yu et al. 2023 (Sec. 3.3 / Table 7) give only "+1.1% parameters" over
# Swin-L; the OPM's layers are in a figure, its width nowhere. Rule: one width m = f for every
# head, the multiple of 8 (tensor-core friendly) that brings Swin-L with OPMs on S3 and S4 at
# K = 200 (CUB) nearest +1.1% over Swin-L with its own K-way classifier: 216 -> 197,451,796
# vs 195,302,876 parameters (+1.10%; 208: +1.02%; 224: +1.18%; 192, the largest multiple of
# 32 under +1.1%: +0.87%; PMG's 512: +5.93%). One width, not one per stage, because feature
# KD compares the heads' f-d features with each other. Swin-T/S/B get the same 216 (the
# paper only uses Swin-L).
SWIN_HEAD_WIDTH = 216


def default_head_width(model_name):
    """The OPM width m = f that ``build_model(model_name, ..., heads=...)`` uses when
    ``head_width`` is None: ``SWIN_HEAD_WIDTH`` (216) for swin_*, ``CIFAR_HEAD_WIDTH``
    (64) for the CIFAR ResNets and plain nets, ``PMG_HEAD_WIDTH`` (512) otherwise."""
    if model_name not in MODEL_NAMES:
        raise ValueError(f"unknown model {model_name!r}; choose from {', '.join(MODEL_NAMES)}")
    if model_name in SWINS:
        return SWIN_HEAD_WIDTH
    if model_name in CIFAR_RESNETS or model_name in PLAIN_NETS:
        return CIFAR_HEAD_WIDTH
    return PMG_HEAD_WIDTH


def build_model(name, num_classes, image_size=32, block="post", shortcut="A",
                pretrained=False, weights=None, plain_init="xavier", deep_sup=(), aux_dropout=0.5,
                projection_dim=0, heads=(), head_width=None):
    """Build a backbone by name (see ``MODEL_NAMES``).

    Args:
        name: one of ``MODEL_NAMES``.
        num_classes: K, the size of the final FC layer.
        image_size: input side in px; decides the CIFAR stem of torchvision CNNs.
        block, shortcut: CIFAR ResNet options (see ``CifarResNet``).
        plain_init: ``PlainNet`` init, ``"xavier"`` or ``"kaiming"``.
        deep_sup: stage indices that get an auxiliary classifier
            (``DeeplySupervised``); empty for none.
        pretrained: load torchvision's ImageNet weights (needs them in the torch hub
            cache or internet access); the K-way head is always new.
        weights: path to a local state dict (a plain dict, or a checkpoint with a
            ``"model"`` entry); tensors whose shape does not match (e.g. the head)
            are skipped and reported.
        projection_dim: > 0 adds the hybrid network's contrastive projection
            head of that width (``HybridNet``; 128, SupContrast's width: the digest
            of Wang et al. CVPR 2021 names none).
        heads: stage indices that get an MKSMT output head (``MultiLevelHeads``);
            empty for none.
        head_width: the OPM width m = f; None means ``default_head_width(name)``
            (216 for Swin, 64 for CIFAR ResNets / plain nets, PMG's 512 otherwise).
            Pass 512 to rebuild a Swin model trained with PMG's width.
    """
    if name in CIFAR_RESNETS:
        if pretrained:
            raise ValueError(f"no pretrained weights exist for {name}")
        model = CifarResNet(CIFAR_RESNETS[name][0], num_classes, block, shortcut)
    elif name in PLAIN_NETS:
        if pretrained:
            raise ValueError(f"no pretrained weights exist for {name}")
        model = PlainNet(PLAIN_NETS[name], num_classes, init=plain_init)
    elif name in TORCHVISION_CNNS:
        model = TorchvisionCNN(name, num_classes, image_size, pretrained)
    elif name in SWINS:
        model = Swin(name, num_classes, pretrained)
    else:
        raise ValueError(f"unknown model {name!r}; choose from {', '.join(MODEL_NAMES)}")
    if weights:
        load_partial_state_dict(model, weights)
    if heads:
        if head_width is None:
            head_width = default_head_width(name)
        model = MultiLevelHeads(model, heads, num_classes, head_width)
    if deep_sup:
        model = DeeplySupervised(model, deep_sup, num_classes, dropout=aux_dropout)
    if projection_dim:
        model = HybridNet(model, embedding_dim(model), projection_dim)
    return model


def embedding_dim(model):
    """d, the width of ``embedding``: the input width of the final classifier."""
    model = getattr(model, "backbone", model)
    net = getattr(model, "net", model)
    for name in ("fc", "head", "classifier"):
        layer = getattr(net, name, None)
        if isinstance(layer, nn.Sequential):
            layer = layer[-1]
        if isinstance(layer, nn.Linear):
            return layer.in_features
    raise ValueError(f"cannot find the final linear classifier of {type(model).__name__}")


# ----------------------------------------------------------------------------------
# Deep supervision (Wang, Lee, Tu, Lazebnik 2015)
# ----------------------------------------------------------------------------------
class AuxHead(nn.Module):
    """Auxiliary classifier of Wang et al. 2015 (as the Wang et al. 2015 digest describes
    it): a conv3x3-BN-ReLU block, two FC layers each followed by ReLU and dropout,
    and a final FC.

    not in the paper: global average pooling between the conv block and the FC
    layers (so one head fits any resolution), and the widths (conv keeps C
    channels, FC layers of ``hidden`` = 256 units).
    Shapes: (B, C, H, W) -> (B, K).
    """

    def __init__(self, in_channels, num_classes, hidden=256, dropout=0.5):
        super().__init__()
        self.conv = Conv2dNormActivation(in_channels, in_channels, kernel_size=3)
        self.classifier = nn.Sequential(
            nn.Linear(in_channels, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, num_classes))

    def forward(self, feature_map):
        pooled = self.conv(feature_map).mean(dim=(2, 3))  # (B, C)
        return self.classifier(pooled)                      # (B, K)


class DeeplySupervised(nn.Module):
    """A backbone plus one ``AuxHead`` per chosen stage. ``forward`` returns the
    backbone's dict plus ``"aux_logits"`` (one (B, K) tensor per head, in the order
    of ``aux_stages``). The heads only read the stage maps, so ``"logits"`` are
    exactly the backbone's: at inference the branch is simply ignored.
    """

    def __init__(self, backbone, stages, num_classes, hidden=256, dropout=0.5):
        super().__init__()
        num_stages = len(backbone.stage_channels)
        stages = list(stages)
        for s in stages:
            if not 0 <= s < num_stages - 1:
                raise ValueError(f"--deep-sup stage {s} is not an intermediate stage of this "
                                 f"backbone (stages 0..{num_stages - 1}; the last one has the main classifier)")
        if len(set(stages)) != len(stages):
            raise ValueError(f"--deep-sup claims a stage twice: {stages}")
        self.backbone, self.aux_stages = backbone, stages
        self.aux_heads = nn.ModuleList(
            AuxHead(backbone.stage_channels[s], num_classes, hidden, dropout) for s in stages)
        self.stage_channels = backbone.stage_channels
        self.stage_prefixes = [[f"backbone.{p}" for p in ps] for ps in backbone.stage_prefixes]

    def forward(self, x):
        out = self.backbone(x)
        out["aux_logits"] = [head(out["stages"][s]) for s, head in zip(self.aux_stages, self.aux_heads)]
        return out


def probe_gradients(model, step, loader, sampler, scheduler, iterations, threshold, path):
    """The rule for placing the auxiliary classifier (Wang et al. 2015, as the Wang et al. 2015
    digest gives it): train ``iterations`` steps, record the mean |gradient| of every
    conv / linear weight of the backbone after
    each backward pass, and attach the head after the stage holding the deepest layer
    whose mean falls below ``threshold`` (1e-7 in the paper). Writes ``path``
    (gradient_probe.csv: iteration, layer, stage, mean_abs_grad)."""
    backbone = getattr(model, "backbone", model)
    prefix = "backbone." if backbone is not model else ""
    stage_of = parameter_stages(backbone)
    layers = [(name, m) for name, m in backbone.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    sums = {name: 0.0 for name, _ in layers}
    model.train()
    with open(path + ".tmp", "w") as f:
        f.write("iteration,layer,stage,mean_abs_grad\n")
        iteration, epoch = 0, 0
        while iteration < iterations:
            sampler.set_epoch(epoch)
            for batch in loader:
                step(batch)  # the gradients stay in .grad after the optimizer step
                for name, module in layers:
                    mean_abs = module.weight.grad.abs().mean().item() if module.weight.grad is not None else 0.0
                    sums[name] += mean_abs
                    f.write(f"{iteration},{prefix}{name},{stage_of[name + '.weight']},{mean_abs:.6e}\n")
                scheduler.step()
                iteration += 1
                if iteration >= iterations:
                    break
            epoch += 1
    os.replace(path + ".tmp", path)
    means = {name: total / iterations for name, total in sums.items()}
    vanishing = [name for name, _ in layers if means[name] < threshold]
    print(f"wrote {path}: {len(layers)} layers x {iterations} iterations", flush=True)
    print(f"layers with mean |grad| < {threshold:g}: "
          + (", ".join(f"{n} ({means[n]:.2e})" for n in vanishing) or "none"), flush=True)
    if vanishing:
        deepest = stage_of[vanishing[-1] + ".weight"]
        stage = min(deepest, len(backbone.stage_channels) - 2)  # the last stage holds the main classifier
        print(f"deepest vanishing layer {vanishing[-1]} is in stage {deepest}: "
              f"attach the auxiliary head after stage {stage} (--deep-sup {stage})", flush=True)
    return means


# ----------------------------------------------------------------------------------
# Hybrid network (Wang et al., CVPR 2021)
# ----------------------------------------------------------------------------------
class ProjectionHead(nn.Module):
    """The contrastive branch's MLP f_e (Wang et al. CVPR 2021, "A Hybrid Framework"):
    Linear d -> d, ReLU, Linear d -> out_dim (128), then L2 normalisation (z lies on
    the unit sphere).

    not in the paper: two layers with a ReLU and the hidden width d (SupContrast's
    choice); the digest only says "MLP".
    Shapes: (B, d) -> (B, out_dim), unit norm.
    """

    def __init__(self, in_dim, out_dim=128):
        super().__init__()
        self.mlp = nn.Sequential(nn.Linear(in_dim, in_dim), nn.ReLU(), nn.Linear(in_dim, out_dim))

    def forward(self, embedding):
        return F.normalize(self.mlp(embedding), dim=1)


class HybridNet(nn.Module):
    """A backbone with the hybrid network's two branches on its ``embedding`` r:
    the backbone's own linear classifier (``logits``, the CE branch; the only
    output used at inference) and a ``ProjectionHead`` (``projection``, the
    contrastive branch). ``forward`` returns the backbone's dict plus
    ``"projection"`` (B, P), P = ``projection_dim`` (128 by default)."""

    def __init__(self, backbone, embedding_dim, projection_dim=128):
        super().__init__()
        self.backbone = backbone
        self.projection_head = ProjectionHead(embedding_dim, projection_dim)
        self.stage_channels = backbone.stage_channels
        self.stage_prefixes = [[f"backbone.{p}" for p in ps] for ps in backbone.stage_prefixes]
        self.aux_stages = getattr(backbone, "aux_stages", [])

    def forward(self, x):
        out = self.backbone(x)
        out["projection"] = self.projection_head(out["embedding"])  # (B, P)
        return out


# ----------------------------------------------------------------------------------
# MKSMT (Yu et al. 2023)
# ----------------------------------------------------------------------------------
class MultiLevelHeads(nn.Module):
    """A backbone whose chosen stages each end in an ``OPM`` with its own K-way
    output (MKSMT, Yu et al. 2023, Sec. 2.1). The deepest head replaces the
    backbone's classifier (which is removed) and is the model's answer.

    ``forward(x, upto=None)`` runs the backbone up to stage ``upto`` only (all
    stages by default; MKSMT's step 1 stops at S3) and returns the usual dict with
    ``logits`` / ``embedding`` of the deepest head computed, plus
        "head_logits":   [(B, K), ...]  one per computed head, shallow to deep,
        "head_features": [(B, f), ...]  the OPM features (feature distillation),
        "head_stages":   [s, ...]       their stage indices.

    Args:
        backbone: a model with ``run_stages`` and ``stage_channels``.
        head_stages: stage indices (0-based) that get an OPM, e.g. [2, 3] for
            Swin's S3, S4.
        width: the OPM's m = f, one width for all heads (512 in PMG;
            ``build_model`` passes ``default_head_width``).
    """

    def __init__(self, backbone, head_stages, num_classes, width=512):
        super().__init__()
        num_stages = len(backbone.stage_channels)
        head_stages = list(head_stages)
        if not head_stages or sorted(set(head_stages)) != head_stages or not (
                0 <= head_stages[0] and head_stages[-1] < num_stages):
            raise ValueError(f"--heads must be increasing stage indices in 0..{num_stages - 1}, got {head_stages}")
        _drop_classifier(backbone)
        self.backbone, self.head_stages = backbone, head_stages
        self.heads = nn.ModuleList(OPM(backbone.stage_channels[s], num_classes, width, width) for s in head_stages)
        self.stage_channels = backbone.stage_channels
        self.stage_prefixes = [[f"backbone.{p}" for p in ps] for ps in backbone.stage_prefixes]

    def forward(self, x, upto=None):
        stages = self.backbone.run_stages(x, upto)
        computed = [(s, head) for s, head in zip(self.head_stages, self.heads) if s < len(stages)]
        outputs = [head(stages[s]) for s, head in computed]                 # [((B, K), (B, f))]
        head_logits = [logits for logits, _ in outputs]
        head_features = [feature for _, feature in outputs]
        return {"logits": head_logits[-1], "embedding": head_features[-1], "stages": stages,
                "head_logits": head_logits, "head_features": head_features,
                "head_stages": [s for s, _ in computed]}


def _drop_classifier(backbone):
    """Replace a backbone's own final classifier with Identity (MKSMT's heads take over)."""
    net = getattr(backbone, "net", backbone)
    for name in ("fc", "head", "classifier"):
        if isinstance(getattr(net, name, None), (nn.Linear, nn.Sequential)):
            setattr(net, name, nn.Identity())
            return
    raise ValueError(f"cannot find the classifier of {type(backbone).__name__}")


def parameter_stages(model):
    """{parameter name: stage index} for a backbone's parameters, in forward order.
    Parameters before the first stage (the stem) count to stage 0, those after the
    last stage (the head) to the last; auxiliary heads are left out."""
    stages, current = {}, 0
    for name, _ in model.named_parameters():
        if name.startswith("aux_heads."):
            continue
        matches = [s for s, prefixes in enumerate(model.stage_prefixes) if name.startswith(tuple(prefixes))]
        if matches:
            current = matches[0]
        stages[name] = current
    return stages


def load_partial_state_dict(model, path):
    """Load the tensors of ``path`` whose names and shapes match ``model``.

    Accepts a bare state dict or a dict with a ``"model"`` entry, with or without
    the ``net.`` prefix our torchvision wrappers add. Official Swin Transformer
    releases (keys ``patch_embed.*`` / ``layers.*``) go through
    ``load_swin_official``. Returns (loaded names, or their number for an official
    Swin file; skipped names) and prints one summary line.
    """
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("model"), dict):
        state = state["model"]
    if any(k.startswith(("patch_embed.", "layers.")) for k in state):
        report = load_swin_official(model, state)
        return report["loaded"], report["unexpected"] + report["skipped_shape"]
    own = model.state_dict()
    prefix = "net." if any(k.startswith("net.") for k in own) else ""
    loaded, skipped = {}, []
    for key, value in state.items():
        target = key if key in own else prefix + key
        if target in own and own[target].shape == value.shape:
            loaded[target] = value
        else:
            skipped.append(key)
    model.load_state_dict(loaded, strict=False)
    missing = [k for k in own if k not in loaded]
    print(f"loaded {len(loaded)} tensors from {path}; skipped {len(skipped)} "
          f"(e.g. {skipped[:3]}); left at init {len(missing)} (e.g. {missing[:3]})")
    return list(loaded), skipped


def count_parameters(model):
    return sum(p.numel() for p in model.parameters())


# ----------------------------------------------------------------------------------
# MKSMT (Yu et al. 2023): output processing module, Swin-L weights
# ----------------------------------------------------------------------------------
class OPM(nn.Module):
    """Output processing module of MKSMT (Yu et al. 2023, Sec. 2.1, Fig. 2; README, Code map): maps
    one stage's feature map to K class scores, one module per supervised stage.

        conv1x1 C -> m, BN, ReLU;  conv3x3 m -> 2m, BN, ReLU
        global max pool;  BN1d(2m);  Linear 2m -> f;  BN1d(f);  ELU  (= feature)
        Linear f -> K                                                  (= logits)

    not in the paper: the layers (the paper shows the OPM only in a figure); this is
    PMG's head (Du et al. 2020, "progressive multi-granularity training"), whose
    m = f = 512 is this class's default. not in the paper: the width ``build_model``
    uses, ``default_head_width`` (216 on Swin: the paper gives only "+1.1%
    parameters" over Swin-L, Yu et al. 2023, Sec. 3.3 / Table 7).

    Args:
        in_channels: C, channels of the stage map (192/384/768/1536 for Swin-L).
        num_classes: K.
        mid_channels: m (the 3x3 conv has 2m channels); pass less for tiny CIFAR nets.
        feat_dim: f, width of the feature used for feature distillation.
    Shapes:
        feature_map (B, C, H, W), any H, W >= 1 -> (logits (B, K), feature (B, f)).
        BatchNorm1d needs B >= 2 in training mode.
    """

    def __init__(self, in_channels, num_classes, mid_channels=512, feat_dim=512):
        super().__init__()
        # not in the paper: the paper's OPM is only in a figure; PMG's head. Its width is
        # not in the paper either: see SWIN_HEAD_WIDTH for how build_model's default was chosen.
        self.conv = nn.Sequential(
            Conv2dNormActivation(in_channels, mid_channels, kernel_size=1),       # conv-BN-ReLU
            Conv2dNormActivation(mid_channels, 2 * mid_channels, kernel_size=3))  # conv-BN-ReLU
        self.embed = nn.Sequential(
            nn.BatchNorm1d(2 * mid_channels), nn.Linear(2 * mid_channels, feat_dim),
            nn.BatchNorm1d(feat_dim), nn.ELU())
        self.fc = nn.Linear(feat_dim, num_classes)

    def forward(self, feature_map):
        pooled = self.conv(feature_map).amax(dim=(2, 3))  # (B, 2m) global max pool
        feature = self.embed(pooled)                       # (B, f)
        return self.fc(feature), feature                   # (B, K), (B, f)


def swin_official_to_torchvision(state_dict, depths):
    """Rename an official Swin Transformer (v1) state dict (microsoft/Swin-Transformer
    release, ``checkpoint["model"]``) to torchvision ``SwinTransformer`` keys.

        patch_embed.proj / .norm                 -> features.0.0 / features.0.2
        layers.i.blocks.j.{norm1, attn.qkv, attn.proj, attn.relative_position_bias_table, norm2}
                                                 -> features.{2i+1}.j.<same>
        layers.i.blocks.j.mlp.fc1 / .fc2         -> features.{2i+1}.j.mlp.0 / .mlp.3
        layers.i.downsample.{reduction, norm}    -> features.{2i+2}.<same>
        norm, head                               -> norm, head

    Tensors are passed through unchanged: both codes concatenate the 2x2 patch
    neighbours in the same order in patch merging (x0 = [0::2, 0::2],
    x1 = [1::2, 0::2], x2 = [0::2, 1::2], x3 = [1::2, 1::2] on (B, H, W, C)), split
    qkv as (3, heads, C / heads), and index the (2W-1)^2 x heads bias table with the
    same relative-position index, so no weight is permuted.

    Args:
        state_dict: the official tensors.
        depths: blocks per stage of the target net, e.g. [2, 2, 18, 2] (Swin-L); a
            stage or block outside them is left unmapped.
    Returns:
        (converted dict, dropped, unmapped): ``dropped`` lists the buffers
        ``relative_position_index`` / ``attn_mask`` that torchvision recomputes;
        ``unmapped`` the official keys that match no rule.
    """
    converted, dropped, unmapped = {}, [], []
    for key, value in state_dict.items():
        if key.endswith(("relative_position_index", "attn_mask")):
            dropped.append(key)
            continue
        parts = key.split(".")
        new = None
        if key.startswith("patch_embed.proj."):
            new = "features.0.0." + parts[-1]
        elif key.startswith("patch_embed.norm."):
            new = "features.0.2." + parts[-1]
        elif parts[0] in ("norm", "head") and len(parts) == 2:
            new = key
        elif parts[0] == "layers" and len(parts) > 3 and parts[1].isdigit():
            i = int(parts[1])
            if i < len(depths) and parts[2] == "blocks" and parts[3].isdigit() and int(parts[3]) < depths[i]:
                rest = ".".join(parts[4:]).replace("mlp.fc1.", "mlp.0.").replace("mlp.fc2.", "mlp.3.")
                new = f"features.{2 * i + 1}.{parts[3]}.{rest}"
            elif i < len(depths) - 1 and parts[2] == "downsample":
                new = f"features.{2 * i + 2}." + ".".join(parts[3:])
        if new is None:
            unmapped.append(key)
        else:
            converted[new] = value
    return converted, dropped, unmapped


def _pair(window):
    return (window, window) if isinstance(window, int) else tuple(window)


def resize_relative_position_bias(table, old_window, new_window):
    """Bicubic resize of a Swin relative-position bias table, as the official code
    does when fine-tuning at another window size (microsoft/Swin-Transformer,
    ``utils.load_pretrained``): the table is read as a (2W_h-1) x (2W_w-1) image
    with one channel per head.

    Args:
        table: ((2W_h-1)(2W_w-1), heads) for ``old_window``.
        old_window, new_window: int or (W_h, W_w).
    Returns:
        ((2W'_h-1)(2W'_w-1), heads), in the table's dtype.
    """
    (oh, ow), (nh, nw) = _pair(old_window), _pair(new_window)
    heads = table.shape[1]
    if table.shape[0] != (2 * oh - 1) * (2 * ow - 1):
        raise ValueError(f"table has {table.shape[0]} rows; a {oh}x{ow} window needs {(2 * oh - 1) * (2 * ow - 1)}")
    image = table.to(torch.promote_types(table.dtype, torch.float32)).t()         # at least float32
    image = image.reshape(1, heads, 2 * oh - 1, 2 * ow - 1)                       # (1, heads, 2W-1, 2W-1)
    image = F.interpolate(image, size=(2 * nh - 1, 2 * nw - 1), mode="bicubic")   # (1, heads, 2W'-1, 2W'-1)
    return image.reshape(heads, -1).t().contiguous().to(table.dtype)              # ((2W'-1)^2, heads)


def load_swin_official(model, path_or_state_dict):
    """Load official Swin Transformer weights (e.g. the ImageNet-22K Swin-L release,
    ``swin_large_patch4_window7_224_22k.pth``) into torchvision's ``SwinTransformer``
    or into any module holding one (this file's ``Swin`` holds it at ``.net``, so
    the keys get a ``net.`` prefix); the first ``SwinTransformer`` found is loaded.

    Keys are renamed by ``swin_official_to_torchvision``. Bias tables of another
    window size (e.g. the window-12 / 384 px checkpoints into a window-7 net) are
    resized with ``resize_relative_position_bias``. Any other tensor whose shape
    differs from the model's, typically the classification head when K differs
    (21841 for 22K), is skipped and stays at its initialisation.

    Caveat: the official code shrinks the window of a stage whose map is smaller
    than the window; torchvision pads the map instead. Both agree whenever
    every stage map is at least one window (Swin-L at 224 px with window 7, or 384 px
    with window 12).

    Args:
        model: ``SwinTransformer`` or a module containing one.
        path_or_state_dict: a file path, or a dict; either may wrap the tensors
            as ``{"model": state_dict}``.
    Returns:
        report dict: ``loaded`` (int), ``missing`` (model keys left at init, except
        the ``relative_position_index`` buffers torchvision computes), ``unexpected``
        (checkpoint keys with no place in the model), ``resized`` (bias tables),
        ``skipped_shape`` (shape mismatches), ``dropped_buffers``; one summary line
        is printed.
    """
    state = path_or_state_dict
    if not isinstance(state, dict):
        try:
            state = torch.load(state, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as e:  # a checkpoint pickling more than tensors (e.g. a config object)
            raise ValueError(f"cannot read {path_or_state_dict} with weights_only=True ({e.__class__.__name__}); "
                             f"re-save its 'model' entry with torch.save(ckpt['model'], path)") from None
    if isinstance(state.get("model"), dict):
        state = state["model"]
    name, net = next(((n, m) for n, m in model.named_modules()
                      if isinstance(m, torchvision.models.SwinTransformer)), (None, None))
    if net is None:
        raise ValueError(f"{model.__class__.__name__} holds no torchvision SwinTransformer to load Swin weights into")
    prefix = name + "." if name else ""  # "net." inside ``Swin``
    depths = [len(net.features[i]) for i in range(1, len(net.features), 2)]
    windows = {f"features.{i}.{j}.attn.relative_position_bias_table": block.attn.window_size
               for i in range(1, len(net.features), 2) for j, block in enumerate(net.features[i])}
    converted, dropped, unexpected = swin_official_to_torchvision(state, depths)
    own = model.state_dict()
    loaded, resized, skipped = {}, [], []
    for key, value in converted.items():
        target = prefix + key
        if target not in own:
            unexpected.append(key)
            continue
        if key in windows and value.shape != own[target].shape and value.shape[1] == own[target].shape[1]:
            side = int(round(value.shape[0] ** 0.5))  # official v1 windows are square
            value = resize_relative_position_bias(value, (side + 1) // 2, windows[key])
            resized.append(key)
        if value.shape != own[target].shape:
            skipped.append(f"{key} {tuple(value.shape)} -> {tuple(own[target].shape)}")
            continue
        loaded[target] = value
    model.load_state_dict(loaded, strict=False)
    missing = [k for k in own if k not in loaded and not k.endswith("relative_position_index")]
    report = {"loaded": len(loaded), "missing": missing, "unexpected": unexpected, "resized": resized,
              "skipped_shape": skipped, "dropped_buffers": dropped}
    print(f"Swin weights: loaded {len(loaded)} tensors; missing {len(missing)} {missing[:4]}; "
          f"unexpected {len(unexpected)} {unexpected[:4]}; resized {len(resized)} bias tables; "
          f"skipped (shape) {skipped[:4]}; dropped {len(dropped)} recomputed buffers")
    return report
