"""Datasets and transforms, in the formats users have on disk.

Stands alone: imports only torch / torchvision / numpy / stdlib.

    build_datasets(name, data_path, ...) -> (train_set, test_set, num_classes)

Every returned dataset yields ``(image_tensor, label)`` and has ``.targets`` (list
of int) and ``.classes`` (list of str). Missing or malformed data raises
``DataError`` with a one-line message naming the path and the flag to pass; the
scripts print it and exit with code 2.

Formats (README.md, section Data):
    cifar10, cifar100  torchvision's CIFAR; without a data path fetched into ./data on first use
    npz                x_train, y_train, x_test, y_test; uint8 NHWC images
    imagefolder        <root>/train/<class>/*.jpg and <root>/val/<class>/*.jpg
    lfw                <root>/<Name>/<Name>_NNNN.jpg; top-k identities, seeded 8:2 split
    cub                CUB_200_2011 release: images.txt, image_class_labels.txt,
                       train_test_split.txt, images/
    inat               iNaturalist 2018: train2018.json, val2018.json (+ the image tree)
    nabirds            NABirds release: the same files plus classes.txt; UUID image
                       ids, non-contiguous class ids mapped to 0..K-1
    dogs               Stanford Dogs as <root>/train/<class>/*.jpg and
                       <root>/test/<class>/*.jpg (or val/)

``imbalance_ratio`` makes the cifar10 / cifar100 / npz training set long-tailed
(``long_tailed_subset``); ``hybrid_transforms``, ``PositivesSampler`` and
``ClassBalancedSampler`` are the hybrid network's views, contrastive-branch and
CE-branch samplers (Wang et al., CVPR 2021, read through a Chinese digest).

Sources named in the docstrings: Tong's write-up = Tong C., "Application of joint
supervision loss in deep image classification" (Chinese; applies Qi & Su 2017's
contrastive-center loss to LFW and CUB); Wu's write-up = Wu W., "Image
classification with deep residual learning" (Chinese; ResNet-32 on CIFAR-10);
Yu et al. 2023 (MKSMT); the Wang et al. 2021 digest = a Chinese digest of Wang et
al., "Contrastive learning based hybrid networks for long-tailed image
classification", CVPR 2021.
"""
import copy
import json
import math
import os
import zipfile

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image
from torchvision.datasets.folder import default_loader

DATASETS = ("cifar10", "cifar100", "npz", "imagefolder", "lfw", "cub", "inat", "nabirds", "dogs")
SMALL_DATASETS = ("cifar10", "cifar100", "npz")  # 32-px images: the CIFAR stem and augmentation

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Wu's write-up (Sec. 3.2) scales pixels to x*2/255 - 1: ToTensor gives x/255, then (t - 0.5)/0.5.
SEED001_MEAN, SEED001_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
# LDAM-DRW's cifar_train.py (and many CIFAR repositories): the same mean, another std.
LDAM_MEAN, LDAM_STD = (0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)
NORMALIZATIONS = {"cifar": (CIFAR_MEAN, CIFAR_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
                  "seed001": (SEED001_MEAN, SEED001_STD), "ldam": (LDAM_MEAN, LDAM_STD)}


class DataError(Exception):
    """Missing or malformed data; the message is one line meant for the user."""


# ----------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------
def resize_from(stored_size, image_size):
    """[T.Resize to image_size square] for images stored at another (H, W), else []."""
    return [] if tuple(stored_size) == (image_size, image_size) else [T.Resize((image_size, image_size))]


def cifar_transforms(normalize="cifar", image_size=32, stored_size=(32, 32)):
    """Train: pad 4 with zeros, random crop, horizontal flip p=0.5 (He et al. 2016;
    Wu's write-up, Sec. 3.2). Test: no augmentation. ``normalize="seed001"`` gives
    Wu's x*2/255-1, ``"cifar"`` the per-channel CIFAR-10 mean/std. Images stored at
    another (H, W) than ``image_size`` square are first resized to it, train and test."""
    norm = T.Normalize(*NORMALIZATIONS[normalize])
    resize = resize_from(stored_size, image_size)
    # not in the paper: Wu pads "4 pixels of zeros on all four sides" but gives the padded
    # shape as 36x36; we keep the 4-px width (40x40 before the crop), He et al.'s Sec. 4.2.
    train = T.Compose(resize + [T.RandomCrop(image_size, padding=4), T.RandomHorizontalFlip(),
                                T.ToTensor(), norm])
    test = T.Compose(resize + [T.ToTensor(), norm])
    return train, test


def resized_crop_transforms(image_size=224, normalize="imagenet"):
    """ImageNet-style views of photos (LFW, image folders, iNaturalist):
    RandomResizedCrop + horizontal flip for training, resize and center crop for
    testing (Tong's write-up, Sec. 3.1, for LFW)."""
    norm = T.Normalize(*NORMALIZATIONS[normalize])
    train = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    # not in the paper: the test resize side (image_size / 0.875, torchvision's ratio).
    test = T.Compose([T.Resize(round(image_size / 0.875)), T.CenterCrop(image_size), T.ToTensor(), norm])
    return train, test


def cub_transforms(image_size=224, normalize="imagenet"):
    """Tong's write-up, Sec. 3.2 (CUB): resize, random crop with 4 px padding,
    horizontal flip; test: resize only. Not in the papers: also NABirds, Dogs and the MKSMT recipes."""
    norm = T.Normalize(*NORMALIZATIONS[normalize])
    resize = T.Resize((image_size, image_size))
    train = T.Compose([resize, T.RandomCrop(image_size, padding=4), T.RandomHorizontalFlip(),
                       T.ToTensor(), norm])
    test = T.Compose([resize, T.ToTensor(), norm])
    return train, test


SUPCON_CROP_SCALE = (0.2, 1.0)  # SupContrast's CIFAR RandomResizedCrop (main_supcon.py)


def hybrid_transforms(normalize="cifar", image_size=32, small=True, stored_size=(32, 32), crop="pad"):
    """The hybrid network's training views (Wang et al. 2021 digest, Implementation details):
    a "32x32 random crop", horizontal flip and grayscale with p = 0.2, shared by both
    branches; the contrastive branch gets two views, one with colour jitter and one
    without. Small images stored at another (H, W) (``stored_size``) are first resized
    to ``image_size``, as in ``cifar_transforms``.

    not in the paper: which crop. ``crop="pad"``: 4 px padding + random crop, as
    CIFAR classifiers train; ``"resized"``: SupContrast's CIFAR views,
    RandomResizedCrop(32, scale=(0.2, 1)); larger images (iNaturalist's 224) always
    get a RandomResizedCrop. The jitter is SupContrast's RandomApply(ColorJitter(
    0.4, 0.4, 0.4, 0.1), p=0.8).
    Returns (ce_transform: PIL -> (3, H, W), two_view_transform: PIL -> (2, 3, H, W)).
    """
    if crop not in ("pad", "resized"):
        raise ValueError(f"crop must be 'pad' or 'resized', got {crop!r}")
    norm = T.Normalize(*NORMALIZATIONS[normalize])
    if small and crop == "pad":
        crop = resize_from(stored_size, image_size) + [T.RandomCrop(image_size, padding=4)]
    else:
        crop = [T.RandomResizedCrop(image_size, **({"scale": SUPCON_CROP_SCALE} if small else {}))]
    shared = crop + [T.RandomHorizontalFlip(), T.RandomGrayscale(p=0.2)]
    jitter = [T.RandomApply([T.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8)]
    plain = T.Compose(shared + [T.ToTensor(), norm])
    jittered = T.Compose(crop + [T.RandomHorizontalFlip()] + jitter + [T.RandomGrayscale(p=0.2), T.ToTensor(), norm])
    return plain, TwoViews(jittered, plain)


class TwoViews:
    """Apply two transforms to one image and stack them: PIL -> (2, 3, H, W)."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __call__(self, image):
        return torch.stack([self.first(image), self.second(image)])

    def __repr__(self):
        return f"TwoViews(\n{self.first},\n{self.second})"


# ----------------------------------------------------------------------------------
# Dataset classes
# ----------------------------------------------------------------------------------
class ArrayDataset(torch.utils.data.Dataset):
    """Images held in memory as a uint8 (N, H, W, 3) array."""

    def __init__(self, images, labels, classes, transform=None):
        self.images, self.targets, self.classes = images, [int(y) for y in labels], list(classes)
        self.transform = transform

    def __len__(self):
        return len(self.targets)

    def __getitem__(self, index):
        image = Image.fromarray(self.images[index])
        if self.transform is not None:
            image = self.transform(image)
        return image, self.targets[index]


def load_image(path):
    """torchvision's loader (RGB), with a one-line DataError naming an unreadable file."""
    try:
        return default_loader(path)
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"cannot read image {path} ({e.__class__.__name__}); fix or remove it, "
                        f"or pass --skip-corrupt") from None


def drop_unreadable(samples):
    """--skip-corrupt: open every image once and keep the readable ones.
    Returns (kept samples, list of dropped paths)."""
    kept, dropped = [], []
    for path, label in samples:
        try:
            with Image.open(path) as image:
                image.convert("RGB")
            kept.append((path, label))
        except (OSError, SyntaxError, ValueError):
            dropped.append(path)
    return kept, dropped


class FileListDataset(torch.utils.data.Dataset):
    """(path, label) pairs; images opened with torchvision's loader (RGB, so
    grayscale files become 3 equal channels)."""

    def __init__(self, samples, classes, transform=None):
        self.samples, self.classes, self.transform = samples, list(classes), transform
        self.targets = [label for _, label in samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        path, label = self.samples[index]
        image = load_image(path)
        if self.transform is not None:
            image = self.transform(image)
        return image, label


class ResumableSampler(torch.utils.data.Sampler):
    """Seeded shuffling that can restart at any position of any epoch.

    Epoch e visits ``randperm(n)`` drawn from a generator seeded with (seed, e), so
    the order needs no saved state; ``set_epoch(e, start)`` skips the first
    ``start`` positions (a resumed run). Each element is ``(index, sample_seed)``
    with a seed unique to (seed, epoch, position): ``PerSampleSeed`` augments every
    sample from its own seed, so the images are the same whatever the number of
    workers and wherever a run was resumed. With ``num_replicas`` processes, rank
    r takes positions r, r + num_replicas, ... (the distributed version); the
    union over ranks of batch k is then batch k of one process with the global
    batch size. ``stream=1`` gives a second order of the same run, independent of
    the first, with sample seeds of its own (offset by 23_757_000_000: see
    ``PositivesSampler``): the hybrid network's instance-sampled CE batch.
    """

    def __init__(self, num_samples, seed=0, num_replicas=1, rank=0, stream=0):
        self.num_samples, self.seed, self.epoch, self.start = num_samples, seed, 0, 0
        self.num_replicas, self.rank, self.stream = num_replicas, rank, stream

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __len__(self):
        return len(range(self.rank, self.num_samples, self.num_replicas)) - self.start

    def __iter__(self):
        key = self.seed * 1_000_003 + self.epoch
        generator = torch.Generator().manual_seed(key + 250_000 * self.stream)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        base = key * self.num_samples + 23_757_000_000 * self.stream
        positions = range(self.rank, self.num_samples, self.num_replicas)  # this process's share
        for position in positions[self.start:]:
            yield order[position], base + position


class PerSampleSeed(torch.utils.data.Dataset):
    """Wraps a dataset so ``dataset[(index, sample_seed)]`` runs its random
    transforms with the CPU generator seeded to ``sample_seed`` (as
    ``torch.manual_seed`` seeds it; the torchvision transforms draw from it), leaving
    the caller's RNG, CPU and CUDA, untouched."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, sample_seed = key
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(int(sample_seed))  # torch.manual_seed would reseed CUDA too
            return self.dataset[index]


class ClassBalancedSampler(torch.utils.data.Sampler):
    """Class-balanced sampling for the hybrid network's CE branch (Wang et al.,
    CVPR 2021): every draw picks a class uniformly among the classes present,
    then an image of that class uniformly, with replacement. An epoch is
    ``num_samples`` draws (default: the dataset size, so both branches have the
    same number of batches).

    Where it comes from: the Wang et al. 2021 digest never names the CE branch's
    sampler. It says the two branches sample differently, to suit their losses
    (Sec. "A Hybrid Framework": the feature branch's batch B_SC holds each x_i
    with its same-class positives and other-class negatives, while the
    classifier branch "directly takes images and labels", B_CE = {(x_i, y_i)}),
    and its introduction cites recent work that splits long-tailed
    classification into feature learning and classifier learning, two stages
    suited to different sampling strategies: "e.g. random sampling suits feature
    learning better, class-balanced sampling suits classifier learning better".
    Class-balanced sampling for the CE branch is our inference from that
    sentence (the digest adds that the joint two-branch training follows BBN,
    and that PSC "allows random or class-balanced sampling"). not in the paper:
    the scheme itself (a uniform class, then a uniform image, with replacement).

    Like ``ResumableSampler``: draws of epoch e come from (seed, e), elements are
    ``(index, sample_seed)``, ``set_epoch(e, start)`` resumes at any position.
    ``num_replicas`` / ``rank`` give each process of a distributed run every
    ``num_replicas``-th draw (the distributed version).
    """

    def __init__(self, targets, seed=0, num_samples=None, num_replicas=1, rank=0):
        targets = torch.as_tensor(targets, dtype=torch.long)
        self.order = torch.argsort(targets, stable=True)                    # indices grouped by class
        counts = torch.bincount(targets)
        self.present = torch.nonzero(counts).flatten()                       # classes with >= 1 image
        self.counts = counts[self.present]
        self.offsets = torch.cumsum(counts, 0)[self.present] - self.counts   # start of each class in order
        self.num_samples = len(targets) if num_samples is None else num_samples
        self.seed, self.epoch, self.start = seed, 0, 0
        self.num_replicas, self.rank = num_replicas, rank

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __len__(self):
        return len(range(self.rank, self.num_samples, self.num_replicas)) - self.start

    def draw(self, epoch):
        """All ``num_samples`` dataset indices of ``epoch`` (every rank's)."""
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 500_000)
        classes = torch.randint(len(self.present), (self.num_samples,), generator=generator)
        within = (torch.rand(self.num_samples, generator=generator, dtype=torch.float64)
                  * self.counts[classes]).long()
        return self.order[self.offsets[classes] + within]

    def __iter__(self):
        indices = self.draw(self.epoch)[self.rank::self.num_replicas].tolist()
        # not the instance stream's seeds: offset so the two branches never share augmentations
        base = (self.seed * 1_000_003 + self.epoch) * self.num_samples + 7_919_000_000
        for position in range(self.start, len(indices)):
            yield indices[position], base + position * self.num_replicas + self.rank


class PositivesSampler(torch.utils.data.Sampler):
    """Batches that hold every anchor's same-class positives: the hybrid network's
    contrastive branch on data with many classes (Wang et al., CVPR 2021).

    Why: the Wang et al. 2021 digest says the n images of a supervised
    contrastive batch "cannot be picked at random: for the supervised purpose,
    the images of a class must be more than one" (Sec. "Supervised contrastive"), the feature
    branch's batch must hold each x_i's same-class positives (Sec. "A Hybrid
    Framework"), and on iNaturalist "for the SC loss, the number of positives is
    fixed at 2" (Implementation details). With 8,142 classes and batch 100, an
    instance-sampled batch holds almost no positive but the anchor's other view.

    Rule, for epoch e (every draw depends only on (seed, e)):

    - The epoch has ``len(targets) // batch_size`` global batches (not in the
      paper: the remainder is dropped), each of G = ``batch_size // m`` groups
      of ``m`` images.
    - Anchors: the first (number of batches) * G entries of a seeded
      permutation of the training set, i.e. instance sampling, so classes
      appear in proportion to their frequency, as in the instance sampler of
      the contrastive branch. not in the paper: only about len(targets) / m
      images are anchors in an epoch, a different subset each epoch.
    - Group: the anchor plus ``m - 1`` other images of its class, drawn
      uniformly without replacement. not in the paper: a class with fewer than
      ``m`` images gives all its other images, then fills the remaining slots
      uniformly with replacement from the whole class, anchor included (a
      one-image class repeats its image; every copy has its own sample seed, so
      its own augmentation).
    - not in the paper: an image may be in several groups of one epoch, even
      of one batch (an anchor and another anchor's partner); SC then treats
      the two copies as positives of each other.
    - Layout (not in the paper): member-major, position g + G * j of a global
      batch holds member j of group g (the G anchors come first). Rank r of
      ``num_replicas`` N takes positions r, r + N, ... of the epoch's global
      sequence, so the union of the ranks' k-th batches (``batch_size // N``
      each) is global batch k, and when N divides G each rank's share holds
      whole groups (those with g = r mod N); otherwise groups straddle ranks
      and a per-rank contrastive loss loses positives unless features are
      gathered across ranks.

    The digest does not say whether its "2 positives" count images or views,
    nor whether an image's own second view counts: ``m`` is the caller's choice
    (m = 2: one same-class partner image per image; m = 3: two).

    Like ``ResumableSampler``: elements are ``(index, sample_seed)``, with a seed
    unique to (seed, epoch, position); ``set_epoch(e, start)`` skips this rank's
    first ``start`` elements (a resumed run continues exactly). Sample seeds are
    offset by 15_838_000_000 (``ClassBalancedSampler``'s offset is 7_919_000_000, an
    instance-sampled CE stream's 23_757_000_000), so the samplers of one run share no
    seed while epochs * len(targets) stays below 7.9e9 (with ``ClassBalancedSampler``'s
    default num_samples).

    Args:
        targets: class index of every training image (sequence or tensor of int).
        m: images per group (anchor included), >= 1.
        batch_size: the global batch, all ranks together; divisible by ``m`` and
            by ``num_replicas``.
    Raises ValueError for an ``m`` that does not divide ``batch_size`` (and for
    a ``num_replicas`` that does not, or fewer images than one batch).
    """

    SEED_OFFSET = 15_838_000_000

    def __init__(self, targets, m, batch_size, seed=0, num_replicas=1, rank=0):
        if m < 1 or batch_size % m:
            raise ValueError(f"batch_size {batch_size} must be divisible by m = {m} "
                             f"(batch_size // m groups of m images)")
        if batch_size % num_replicas:
            raise ValueError(f"batch_size {batch_size} (the global batch) must be divisible by "
                             f"num_replicas = {num_replicas}")
        if len(targets) < batch_size:
            raise ValueError(f"{len(targets)} training images make no batch of {batch_size}")
        self.targets = torch.as_tensor(targets, dtype=torch.long)              # (n,)
        n = len(self.targets)
        self.order = torch.argsort(self.targets, stable=True)                  # indices grouped by class
        self.class_counts = torch.bincount(self.targets)                        # (K,)
        self.class_starts = torch.cumsum(self.class_counts, 0) - self.class_counts  # start of each class in order
        self.rank_in_class = torch.empty_like(self.targets)                     # position of image i in its class
        self.rank_in_class[self.order] = torch.arange(n) - self.class_starts[self.targets[self.order]]
        self.m, self.batch_size = m, batch_size
        self.num_batches = n // batch_size                                      # not in the paper: remainder dropped
        self.seed, self.epoch, self.start = seed, 0, 0
        self.num_replicas, self.rank = num_replicas, rank

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __len__(self):
        return len(range(self.rank, self.num_batches * self.batch_size, self.num_replicas)) - self.start

    def draw(self, epoch):
        """All dataset indices of ``epoch``, every rank's: (num_batches * batch_size,)
        in the member-major layout of the class docstring."""
        m, groups = self.m, self.batch_size // self.m
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch + 750_000)
        anchors = torch.randperm(len(self.targets), generator=generator)[:self.num_batches * groups]  # (A,)
        classes = self.targets[anchors]
        counts, starts = self.class_counts[classes], self.class_starts[classes]  # (A,) each
        taken = self.rank_in_class[anchors][:, None]                         # (A, 1) in-class positions used
        uniform = torch.rand(len(anchors), m - 1, generator=generator, dtype=torch.float64)  # (A, m - 1)
        for k in range(m - 1):
            free = counts - 1 - k                                            # (A,) other images not yet drawn
            # the pick-th free position: count it up past the taken ones, in increasing order
            pick = (uniform[:, k] * free.clamp_min(1)).long()
            for used in taken.sort(dim=1).values.unbind(1):
                pick = pick + (used <= pick)
            # not in the paper: the class is exhausted, draw from all of it with replacement
            refill = (uniform[:, k] * counts).long()
            taken = torch.cat([taken, torch.where(free > 0, pick, refill)[:, None]], dim=1)
        members = self.order[starts[:, None] + taken]                        # (A, m), anchor first
        return members.view(self.num_batches, groups, m).transpose(1, 2).reshape(-1)

    def __iter__(self):
        indices = self.draw(self.epoch)[self.rank::self.num_replicas].tolist()
        base = (self.seed * 1_000_003 + self.epoch) * len(self.targets) + self.SEED_OFFSET
        for position in range(self.start, len(indices)):
            yield indices[position], base + position * self.num_replicas + self.rank


class LabeledSubset(torch.utils.data.Subset):
    """``Subset`` that keeps ``.targets`` and ``.classes`` (the long-tailed sets)."""

    def __init__(self, dataset, indices):
        super().__init__(dataset, list(indices))
        self.classes = dataset.classes
        self.targets = [dataset.targets[i] for i in self.indices]


def with_transform(dataset, transform):
    """A shallow copy of ``dataset`` (or of a ``Subset`` and the set under it)
    whose images go through ``transform``; the data is shared, not copied."""
    dataset = copy.copy(dataset)
    if isinstance(dataset, torch.utils.data.Subset):
        dataset.dataset = with_transform(dataset.dataset, transform)
    else:
        dataset.transform = transform
    return dataset


def long_tailed_counts(num_per_class, num_classes, imbalance_ratio):
    """Images kept per class in long-tailed CIFAR (Cui et al. 2019; LDAM, Cao et al.
    2019; the imbalance ratio beta = N_max / N_min as in the Wang et al. 2021 digest,
    Datasets): n_i = int(n_max * (1 / beta)^(i / (K - 1))), class 0 the head.

    CIFAR-10-LT (n_max 5000) has 12,406 / 13,996 / 20,431 images for beta = 100 /
    50 / 10; CIFAR-100-LT (n_max 500) 10,847 / 12,608 / 19,573.
    """
    if imbalance_ratio < 1:
        raise DataError(f"--imbalance-ratio must be >= 1 (n_max / n_min), got {imbalance_ratio}")
    if num_classes == 1:
        return [int(num_per_class)]
    return [int(num_per_class * (1.0 / imbalance_ratio) ** (i / (num_classes - 1)))
            for i in range(num_classes)]


def shot_groups(train_counts, many_threshold=100, few_threshold=20):
    """{"many": [classes], "medium": [...], "few": [...]}: classes with more than
    ``many_threshold`` training images, ``few_threshold`` to ``many_threshold``,
    and fewer than ``few_threshold`` (the usual long-tail split: > 100, 20-100, < 20)."""
    groups = {"many": [], "medium": [], "few": []}
    for c, n in enumerate(train_counts):
        groups["many" if n > many_threshold else "few" if n < few_threshold else "medium"].append(c)
    return groups


def long_tailed_subset(dataset, imbalance_ratio, seed=0):
    """Keep the first n_i images of class i after a seeded shuffle within each class
    (n_max = the smallest class size, 5000 on CIFAR-10). Returns a ``LabeledSubset``
    whose indices are sorted."""
    targets = np.asarray(dataset.targets)
    num_classes = len(dataset.classes)
    per_class = np.bincount(targets, minlength=num_classes)
    counts = long_tailed_counts(int(per_class.min()), num_classes, imbalance_ratio)
    if min(counts) < 1:  # an empty class would make beta meaningless (and n_max 0 empties the set)
        raise DataError(f"a long-tailed cut at --imbalance-ratio {imbalance_ratio:g} with n_max {per_class.min()} "
                        f"(the smallest class's training images) leaves {counts.count(0)} of {num_classes} classes "
                        f"empty; lower the ratio or use a training set with more images per class")
    rng = np.random.default_rng(seed)
    keep = []
    for c, n in enumerate(counts):
        keep += rng.permutation(np.flatnonzero(targets == c))[:n].tolist()
    return LabeledSubset(dataset, sorted(keep))


# ----------------------------------------------------------------------------------
# Loaders per format
# ----------------------------------------------------------------------------------
CIFAR_ARCHIVES = {"cifar10": ("cifar-10-python.tar.gz", "170 MB", "cifar-10-batches-py"),
                  "cifar100": ("cifar-100-python.tar.gz", "169 MB", "cifar-100-python")}


def load_cifar(name, root, download, transforms, fetch_if_missing=False):
    """torchvision's CIFAR-10 / CIFAR-100 under ``root``. Missing: fetched with
    ``download``, or, with ``fetch_if_missing`` (no --data-path given: the default
    ./data), fetched once after saying where and how big, as SupContrast or
    pytorch-cifar do; else one line saying how to get it."""
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    archive, size, folder = CIFAR_ARCHIVES[name]
    if (download or fetch_if_missing) and not os.path.isdir(os.path.join(root, folder)):
        download = True
        print(f"{name} not found in {os.path.abspath(root)}: downloading it there ({archive}, {size}) once",
              flush=True)
    try:
        train = cls(root, train=True, transform=transforms[0], download=download)
        test = cls(root, train=False, transform=transforms[1], download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted..."
        raise DataError(f"{name} not found under {os.path.abspath(root)}: pass --download to fetch "
                        f"it, or --data-path DIR where it already is ({e})") from None
    except OSError as e:  # no network while downloading
        raise DataError(f"could not download {name} into {os.path.abspath(root)} (no network? {e}); fetch "
                        f"{cls.url} elsewhere, unpack it so that DIR/{folder} exists, pass --data-path DIR") from None
    return train, test, len(train.classes)


def load_npz(path, transforms):
    if os.path.isdir(path):
        raise DataError(f"--data-path {path} is a folder; --dataset npz needs the .npz file itself")
    try:  # reading a key decompresses it, so every read is inside
        arrays = np.load(path)
        missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
        if missing:
            raise DataError(f"{path} lacks keys {missing}; an npz dataset needs "
                            f"x_train, y_train, x_test, y_test (uint8 NHWC images, int labels)")
        arrays = {k: arrays[k] for k in ("x_train", "y_train", "x_test", "y_test", "classes") if k in arrays}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read {path} as .npz ({e.__class__.__name__}: {e}); pass "
                        f"--data-path FILE.npz with keys x_train, y_train, x_test, y_test") from None
    x_train, x_test = arrays["x_train"], arrays["x_test"]
    for key, x in (("x_train", x_train), ("x_test", x_test)):
        if x.dtype != np.uint8 or x.ndim != 4 or x.shape[-1] != 3:
            raise DataError(f"{path}: {key} must be uint8 (N, H, W, 3), got {x.dtype} {x.shape}")
    for key in ("y_train", "y_test"):
        if not np.issubdtype(arrays[key].dtype, np.integer):
            raise DataError(f"{path}: {key} must hold integer class indices, got {arrays[key].dtype}")
    y_train, y_test = arrays["y_train"].astype(np.int64), arrays["y_test"].astype(np.int64)
    for x_key, x, y in (("x_train", x_train, y_train), ("x_test", x_test, y_test)):
        if len(x) != len(y) or len(x) == 0:
            raise DataError(f"{path}: {x_key} has {len(x)} images but its labels have {len(y)}")
    classes = [str(c) for c in arrays["classes"]] if "classes" in arrays else \
        [str(k) for k in range(int(max(y_train.max(), y_test.max())) + 1)]
    num_classes = len(classes)
    for y_key, y in (("y_train", y_train), ("y_test", y_test)):
        if y.min() < 0 or y.max() >= num_classes:
            raise DataError(f"{path}: {y_key} has labels in [{y.min()}, {y.max()}], "
                            f"outside [0, {num_classes}) ({num_classes} classes)")
    return (ArrayDataset(x_train, y_train, classes, transforms[0]),
            ArrayDataset(x_test, y_test, classes, transforms[1]), num_classes)


def load_imagefolder(root, transforms, name="imagefolder", test_split="val"):
    """torchvision ImageFolder trees <root>/train/<class>/ and <root>/<test_split>/<class>/."""
    sets = []
    for split, transform in zip(("train", test_split), transforms):
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            raise DataError(f"{folder} not found: --dataset {name} needs --data-path DIR "
                            f"with DIR/train/<class>/ and DIR/{test_split}/<class>/")
        try:
            sets.append(torchvision.datasets.ImageFolder(folder, transform=transform, loader=load_image))
        except FileNotFoundError as e:  # no class folders / no images
            raise DataError(f"{folder}: {e}; --dataset {name} needs DIR/{split}/<class>/*.jpg") from None
    if sets[0].classes != sets[1].classes:
        raise DataError(f"{root}: train/ and {test_split}/ have different class folders")
    return sets[0], sets[1], len(sets[0].classes)


def stratified_split(labels, train_fraction, seed):
    """Seeded per-class split: for each class, a random ``train_fraction`` of its
    indices (rounded, at least 1 when the class has 2 or more) go to training.
    Returns (train_indices, test_indices), each sorted."""
    rng = np.random.default_rng(seed)
    labels = np.asarray(labels)
    train, test = [], []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        n_train = min(max(int(round(train_fraction * len(idx))), 1), len(idx) - (len(idx) > 1))
        train += idx[:n_train].tolist()
        test += idx[n_train:].tolist()
    return sorted(train), sorted(test)


def validation_split(train_set, fraction, seed, transform):
    """Hold out a stratified ``fraction`` of ``train_set`` for model selection.

    Per class, a seeded random ``fraction`` of its images (rounded, at least one when
    the class has two or more) goes to validation; the rest stays for training.
    A long-tailed set is split *after* the long-tailed cut, so validation has the
    training set's own class frequencies and no image outside the long-tailed
    subset is used. The validation part gets ``transform`` (the test set's: no
    augmentation). Returns (train, val), two ``LabeledSubset``s of ``train_set``.
    """
    if not 0 < fraction < 1:
        raise DataError(f"--val-split must be between 0 and 1 (a fraction of the training set), got {fraction}")
    keep, held_out = stratified_split(train_set.targets, 1.0 - fraction, seed)
    if not held_out:
        raise DataError(f"--val-split {fraction} leaves no validation image: every class has a single "
                        f"training image; pass a larger --val-split or use more data")
    return LabeledSubset(train_set, keep), with_transform(LabeledSubset(train_set, held_out), transform)


def load_lfw(root, transforms, top_k=20, seed=0):
    """LFW tree <root>/<Name>/<Name>_NNNN.jpg. Keeps the ``top_k`` identities with
    the most images (ties broken by name, alphabetically), then splits each identity
    8:2 with ``seed`` (Tong's write-up, Sec. 3.1: "the 20 people with the most
    images", split 8:2)."""
    if not os.path.isdir(root):
        raise DataError(f"LFW folder {root} not found: pass --data-path DIR holding <Name>/<Name>_NNNN.jpg")
    counts = []
    for name in sorted(os.listdir(root)):
        folder = os.path.join(root, name)
        if os.path.isdir(folder):
            files = sorted(f for f in os.listdir(folder) if f.lower().endswith((".jpg", ".jpeg", ".png")))
            if files:
                counts.append((name, [os.path.join(folder, f) for f in files]))
    if len(counts) < 2:
        raise DataError(f"{root} holds {len(counts)} identity folders with images; --dataset lfw needs "
                        f"--data-path DIR with <Name>/<Name>_NNNN.jpg for at least 2 people")
    counts.sort(key=lambda item: (-len(item[1]), item[0]))
    chosen = sorted(counts[:top_k], key=lambda item: item[0])
    classes = [name for name, _ in chosen]
    samples = [(path, label) for label, (_, paths) in enumerate(chosen) for path in paths]
    train_idx, test_idx = stratified_split([s[1] for s in samples], 0.8, seed)
    return (FileListDataset([samples[i] for i in train_idx], classes, transforms[0]),
            FileListDataset([samples[i] for i in test_idx], classes, transforms[1]), len(classes))


def _read_table(path):
    """Rows of a CUB/NABirds metadata file: '<id> <value>' per line."""
    if not os.path.isfile(path):
        raise DataError(f"{path} not found: pass --data-path DIR of the CUB_200_2011 release "
                        f"(images.txt, image_class_labels.txt, train_test_split.txt, images/)")
    with open(path) as f:
        rows = [line.split(maxsplit=1) for line in f if line.strip()]
    if any(len(row) != 2 for row in rows):
        raise DataError(f"{path} is malformed: every line must be '<image id> <value>'")
    return dict(rows)


def load_cub(root, transforms, num_classes=None, seed=0):
    """CUB-200-2011 release layout. Official train/test split by default; with
    ``num_classes=N`` (Tong's write-up, Sec. 3.2) keeps the first N classes and splits them
    8:2 per class with ``seed``."""
    paths = _read_table(os.path.join(root, "images.txt"))
    try:
        labels = {k: int(v) - 1 for k, v in _read_table(os.path.join(root, "image_class_labels.txt")).items()}
        is_train = {k: v.strip() == "1" for k, v in _read_table(os.path.join(root, "train_test_split.txt")).items()}
        ids = sorted(paths, key=int)
        missing = [i for i in ids if i not in labels or i not in is_train]
    except ValueError as e:
        raise DataError(f"{root}: malformed CUB metadata ({e})") from None
    if missing:
        raise DataError(f"{root}: image ids {missing[:3]} have no class label or split entry")
    class_names = {}
    classes_file = os.path.join(root, "classes.txt")
    if os.path.isfile(classes_file):
        class_names = {int(k) - 1: v.strip() for k, v in _read_table(classes_file).items()}
    total = max(labels.values()) + 1
    if num_classes is not None and num_classes > total:
        raise DataError(f"--cub-classes {num_classes}: {root} has {total} classes; pass at most {total}")
    keep = total if num_classes is None else num_classes
    ids = [i for i in ids if labels[i] < keep]
    samples = [(os.path.join(root, "images", paths[i].strip()), labels[i]) for i in ids]
    if not samples or not os.path.isfile(samples[0][0]):
        raise DataError(f"CUB images missing under {os.path.join(root, 'images')}: "
                        f"pass --data-path DIR of the extracted CUB_200_2011 release")
    if num_classes is None:
        train_idx = [k for k, i in enumerate(ids) if is_train[i]]
        test_idx = [k for k, i in enumerate(ids) if not is_train[i]]
    else:
        train_idx, test_idx = stratified_split([s[1] for s in samples], 0.8, seed)
    classes = [class_names.get(c, str(c)) for c in range(keep)]
    return (FileListDataset([samples[k] for k in train_idx], classes, transforms[0]),
            FileListDataset([samples[k] for k in test_idx], classes, transforms[1]), keep)


def load_inat(root, transforms):
    """iNaturalist 2018 from its released json files: ``train2018.json`` and
    ``val2018.json`` in ``root`` (COCO-style ``images`` [{id, file_name}],
    ``annotations`` [{image_id, category_id}], ``categories`` [{id, name}]), with
    every ``file_name`` relative to ``root``. Category ids are mapped to 0..K-1 in
    sorted order; names come from ``categories`` (or ``categories.json``) if given.
    The val set is the test set, as in the paper."""
    splits = []
    for split in ("train2018.json", "val2018.json"):
        path = os.path.join(root, split)
        if not os.path.isfile(path):
            raise DataError(f"{path} not found: --dataset inat needs --data-path DIR holding "
                            f"train2018.json, val2018.json and the image folders they name")
        try:
            with open(path) as f:
                meta = json.load(f)
            files = {image["id"]: image["file_name"] for image in meta["images"]}
            pairs = [(files[a["image_id"]], a["category_id"]) for a in meta["annotations"]]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{path} is not an iNaturalist json file ({e.__class__.__name__}: {e})") from None
        splits.append((meta, pairs))
    category_ids = sorted({c for _, pairs in splits for _, c in pairs})
    label_of = {c: k for k, c in enumerate(category_ids)}
    categories = splits[0][0].get("categories")
    if not categories and os.path.isfile(os.path.join(root, "categories.json")):
        with open(os.path.join(root, "categories.json")) as f:
            categories = json.load(f)
    names = {c["id"]: c.get("name", str(c["id"])) for c in categories or []}
    classes = [names.get(c, str(c)) for c in category_ids]
    sets = [FileListDataset([(os.path.join(root, name), label_of[c]) for name, c in pairs], classes, transform)
            for (_, pairs), transform in zip(splits, transforms)]
    if not sets[0].samples or not os.path.isfile(sets[0].samples[0][0]):
        raise DataError(f"iNaturalist images missing: {sets[0].samples[0][0] if sets[0].samples else root} "
                        f"not found; --data-path must be the folder the json file names are relative to")
    return sets[0], sets[1], len(classes)


def load_nabirds(root, transforms):
    """NABirds release layout (Van Horn et al. 2015): images.txt, image_class_labels.txt,
    train_test_split.txt, images/, classes.txt. Image ids are UUID strings (kept in
    file order); class ids are integers, not contiguous (only the leaf classes have
    images), so the sorted set of ids used in image_class_labels.txt becomes 0..K-1.
    Names come from classes.txt when present. Official train/test split."""
    for file in ("images.txt", "image_class_labels.txt", "train_test_split.txt"):
        if not os.path.isfile(os.path.join(root, file)):
            raise DataError(f"{os.path.join(root, file)} not found: --dataset nabirds needs --data-path DIR "
                            f"of the NABirds release (images.txt, image_class_labels.txt, "
                            f"train_test_split.txt, images/)")
    paths = _read_table(os.path.join(root, "images.txt"))
    raw_labels = _read_table(os.path.join(root, "image_class_labels.txt"))
    is_train = {k: v.strip() == "1" for k, v in _read_table(os.path.join(root, "train_test_split.txt")).items()}
    missing = [i for i in paths if i not in raw_labels or i not in is_train]
    if missing:
        raise DataError(f"{root}: image ids {missing[:3]} have no class label or split entry")
    classes_file = os.path.join(root, "classes.txt")
    try:
        used = sorted({int(v) for v in raw_labels.values()})
        names = {int(k): v.strip() for k, v in _read_table(classes_file).items()} \
            if os.path.isfile(classes_file) else {}
    except ValueError as e:
        raise DataError(f"{root}: malformed NABirds metadata, class ids must be integers ({e})") from None
    index = {class_id: k for k, class_id in enumerate(used)}
    samples = [(os.path.join(root, "images", paths[i].strip()), index[int(raw_labels[i])]) for i in paths]
    if not samples or not os.path.isfile(samples[0][0]):
        raise DataError(f"NABirds images missing under {os.path.join(root, 'images')}: "
                        f"pass --data-path DIR of the extracted NABirds release")
    classes = [names.get(class_id, str(class_id)) for class_id in used]
    train = [s for s, i in zip(samples, paths) if is_train[i]]
    test = [s for s, i in zip(samples, paths) if not is_train[i]]
    return (FileListDataset(train, classes, transforms[0]),
            FileListDataset(test, classes, transforms[1]), len(classes))


def load_dogs(root, transforms):
    """Stanford Dogs (Khosla et al. 2011) as an ImageFolder tree: <root>/train/<class>/
    and <root>/test/<class>/ (or val/). not in the paper: the release's
    train_list.mat / test_list.mat split must be laid out as folders first."""
    test_split = "val" if os.path.isdir(os.path.join(root, "val")) and not os.path.isdir(
        os.path.join(root, "test")) else "test"
    return load_imagefolder(root, transforms, "dogs", test_split)


def _skip_unreadable(dataset):
    """Drop unreadable files from a file-based dataset in place; records them in
    ``dataset.dropped``."""
    dataset.samples, dataset.dropped = drop_unreadable(dataset.samples)
    dataset.targets = [label for _, label in dataset.samples]
    if hasattr(dataset, "imgs"):
        dataset.imgs = dataset.samples
    return dataset


# not in the paper: Tong's write-up does not give its normalisation; ImageNet statistics for LFW / CUB.
DEFAULT_NORMALIZE = {"cifar10": "cifar", "cifar100": "cifar", "npz": "cifar",
                     "imagefolder": "imagenet", "lfw": "imagenet", "cub": "imagenet", "inat": "imagenet",
                     "nabirds": "imagenet", "dogs": "imagenet"}  # Yu et al. 2023: ImageNet-pretrained Swin-L


def build_datasets(name, data_path=None, download=False, image_size=None, normalize=None,
                   lfw_top_k=20, cub_classes=None, split_seed=0, skip_corrupt=False,
                   imbalance_ratio=None):
    """Build (train_set, test_set, num_classes) for ``name`` in ``DATASETS``.

    ``image_size`` defaults to 32 for CIFAR/npz and 224 otherwise; ``normalize``
    (a key of ``NORMALIZATIONS``) defaults per dataset.
    ``split_seed`` fixes the LFW / CUB-subset 8:2 splits. ``skip_corrupt`` opens
    every image of a file-based dataset once and drops the unreadable ones (listed
    in ``.dropped``); without it an unreadable image stops the run, named.
    ``imbalance_ratio`` (beta) makes a cifar10 / cifar100 / npz training set
    long-tailed with ``split_seed``; the test set stays balanced.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    small = name in SMALL_DATASETS
    image_size = image_size or (32 if small else 224)
    normalize = normalize or DEFAULT_NORMALIZE[name]
    if imbalance_ratio is not None and not small:
        raise DataError(f"--imbalance-ratio applies to cifar10, cifar100 and npz, not to --dataset {name}")
    if name in ("cifar10", "cifar100"):
        # no --data-path: ./data, fetched on first use; a path the user gave is never written to unasked
        sets = load_cifar(name, data_path or "./data", download, cifar_transforms(normalize, image_size),
                          fetch_if_missing=data_path is None)
        return _long_tailed(sets, imbalance_ratio, split_seed)
    if data_path is None:
        raise DataError(f"--dataset {name} needs --data-path")
    if not os.path.exists(data_path):
        raise DataError(f"{data_path} does not exist: pass --data-path pointing at the {name} data")
    if name == "npz":
        train, test, num_classes = load_npz(data_path, (None, None))
        stored = train.images.shape[1:3]  # (H, W); load_npz checked both sets are (N, H, W, 3)
        if test.images.shape[1:3] != stored:
            raise DataError(f"{data_path}: x_train images are {stored[0]}x{stored[1]} but x_test images "
                            f"{test.images.shape[1]}x{test.images.shape[2]}; store both at one size")
        train.transform, test.transform = cifar_transforms(normalize, image_size, stored)  # resize if not image_size
        return _long_tailed((train, test, num_classes), imbalance_ratio, split_seed)
    if name == "imagefolder":
        sets = load_imagefolder(data_path, resized_crop_transforms(image_size, normalize))
    elif name == "inat":
        sets = load_inat(data_path, resized_crop_transforms(image_size, normalize))
    elif name == "lfw":
        sets = load_lfw(data_path, resized_crop_transforms(image_size, normalize), lfw_top_k, split_seed)
    elif name == "nabirds":
        sets = load_nabirds(data_path, cub_transforms(image_size, normalize))
    elif name == "dogs":
        sets = load_dogs(data_path, cub_transforms(image_size, normalize))
    else:
        sets = load_cub(data_path, cub_transforms(image_size, normalize), cub_classes, split_seed)
    if skip_corrupt:
        for dataset in sets[:2]:
            _skip_unreadable(dataset)
    return sets


def _long_tailed(sets, imbalance_ratio, seed):
    train, test, num_classes = sets
    if imbalance_ratio is None:
        return sets
    return long_tailed_subset(train, imbalance_ratio, seed), test, num_classes


# ----------------------------------------------------------------------------------
# Tensor-resident data path: batched augmentation on the training device
# ----------------------------------------------------------------------------------
# The training set lives as one uint8 (N, 3, H, W) tensor on the device; a batch is
# indexed, augmented and normalised there in a few batched ops: no PIL, no worker
# processes, no host-to-device image copies. Each function draws the same
# distribution as the torchvision transform its docstring names.

def crop_flip_params(batch_size, padding=4, generator=None, device="cpu"):
    """Per-sample parameters of ``T.RandomCrop(H, padding)`` + ``T.RandomHorizontalFlip()``:
    top and left offsets into the padded image, each uniform on {0, ..., 2 * padding}
    (torchvision's ``randint(0, h + 2p - H + 1)``), drawn independently, and a flip
    with probability 0.5 (``rand < 0.5``).
    Returns offsets_y (B,) int64, offsets_x (B,) int64, flips (B,) bool."""
    high = 2 * padding + 1
    offsets_y = torch.randint(0, high, (batch_size,), generator=generator, device=device)
    offsets_x = torch.randint(0, high, (batch_size,), generator=generator, device=device)
    flips = torch.rand(batch_size, generator=generator, device=device) < 0.5
    return offsets_y, offsets_x, flips


def crop_flip_with_params(images, offsets_y, offsets_x, flips, padding=4):
    """Per sample b: ``F.pad(padding, fill=0)``, ``F.crop(top=offsets_y[b],
    left=offsets_x[b], H, W)``, then ``F.hflip`` where ``flips[b]``; one gather for
    the whole batch.
    Shapes: images (B, C, H, W) any dtype; offsets_y, offsets_x (B,) int in
    [0, 2 * padding]; flips (B,) bool -> (B, C, H, W), same dtype."""
    B, C, H, W = images.shape
    device = images.device
    padded = torch.nn.functional.pad(images, (padding,) * 4)                # (B, C, H + 2p, W + 2p), zeros
    rows = offsets_y[:, None] + torch.arange(H, device=device)              # (B, H)
    cols = torch.arange(W, device=device).expand(B, W)                      # (B, W)
    cols = torch.where(flips[:, None], W - 1 - cols, cols) + offsets_x[:, None]  # a flip reads the crop right to left
    batch = torch.arange(B, device=device)[:, None, None, None]             # (B, 1, 1, 1)
    channel = torch.arange(C, device=device)[None, :, None, None]           # (1, C, 1, 1)
    return padded[batch, channel, rows[:, None, :, None], cols[:, None, None, :]]  # (B, C, H, W)


def batched_crop_flip(images, padding=4, generator=None, shard=(0, 1)):
    """``T.RandomCrop(H, padding=padding)`` + ``T.RandomHorizontalFlip()`` on every
    image of a batch, each with its own random crop and flip, drawn from
    ``generator`` (a ``torch.Generator`` on the images' device; the global RNG when
    None). ``shard`` (rank, N): the batch is rank's share (every N-th image) of a
    batch N times larger; the draws are that whole batch's, so N processes together
    augment it as one process would. Shapes: images (B, C, H, W) uint8 (or float) -> (B, C, H, W)."""
    rank, n = shard
    params = crop_flip_params(images.shape[0] * n, padding, generator, images.device)
    return crop_flip_with_params(images, *(p[rank::n] for p in params), padding=padding)


def resized_crop_params(batch_size, height, width, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator=None,
                        device="cpu", attempts=10):
    """Per-sample boxes of ``T.RandomResizedCrop.get_params`` on an (height, width) image,
    drawn for the whole batch at once, and a flip with probability 0.5: up to ``attempts``
    (torchvision: 10) tries of area ~ U(scale) x height x width and log aspect ratio ~
    U(log ratio), w = round(sqrt(area x ratio)), h = round(sqrt(area / ratio)); the first
    try that fits the image wins, its top / left uniform over the positions that fit; if
    none fits, torchvision's fallback: the whole image, cut to the ratio range, centred.
    Returns top, left, h, w (B,) int64 and flips (B,) bool."""
    shape = (batch_size, attempts)
    target_area = torch.empty(shape, device=device).uniform_(scale[0], scale[1], generator=generator) * height * width
    log_ratio = torch.empty(shape, device=device).uniform_(math.log(ratio[0]), math.log(ratio[1]), generator=generator)
    aspect = torch.exp(log_ratio)
    w = torch.round(torch.sqrt(target_area * aspect)).long()                # (B, attempts)
    h = torch.round(torch.sqrt(target_area / aspect)).long()
    fits = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)                          # (B, 1): the first try that fits
    found = fits.any(dim=1)
    if width / height < min(ratio):
        fallback_w, fallback_h = width, int(round(width / min(ratio)))
    elif width / height > max(ratio):
        fallback_w, fallback_h = int(round(height * max(ratio))), height
    else:
        fallback_w, fallback_h = width, height
    w = torch.where(found, w.gather(1, first)[:, 0], fallback_w)            # (B,)
    h = torch.where(found, h.gather(1, first)[:, 0], fallback_h)
    top = torch.where(found, (torch.rand(batch_size, generator=generator, device=device) * (height - h + 1)).long(),
                      (height - h) // 2)                                    # uniform on {0, ..., height - h}
    left = torch.where(found, (torch.rand(batch_size, generator=generator, device=device) * (width - w + 1)).long(),
                       (width - w) // 2)
    flips = torch.rand(batch_size, generator=generator, device=device) < 0.5
    return top, left, h, w, flips


def _bilinear_taps(start, length, size):
    """Source rows (or columns) of ``F.interpolate(mode="bilinear", align_corners=False)``
    resizing ``length`` pixels from ``start`` to ``size``, per sample, as PyTorch computes
    them: src = (o + 0.5) x length / size - 0.5, clamped at 0; neighbours i0 = floor(src)
    and i0 + 1 (i0 at the last pixel); weight of the second, src - i0.
    Shapes: start, length (B,) int64 -> i0, i1 (B, size) int64 (absolute), weight (B, size) float32."""
    o = torch.arange(size, device=start.device, dtype=torch.float32)
    src = ((o[None] + 0.5) * (length[:, None].float() / size) - 0.5).clamp(min=0)   # (B, size)
    i0 = src.long()
    i1 = i0 + (i0 < length[:, None] - 1).long()
    return start[:, None] + i0, start[:, None] + i1, src - i0


def resized_crop_with_params(images, top, left, h, w, flips, size):
    """Per sample b: ``F.resized_crop(images[b], top[b], left[b], h[b], w[b], [size, size],
    InterpolationMode.BILINEAR, antialias=False)``, then ``F.hflip`` where ``flips[b]``:
    bilinear along rows, then along columns, by gathers over the whole batch.
    Shapes: images (B, C, H, W) float; top, left, h, w (B,) int64; flips (B,) bool ->
    (B, C, size, size), same dtype."""
    B, C = images.shape[:2]
    batch, channel = torch.arange(B, device=images.device), torch.arange(C, device=images.device)
    y0, y1, wy = _bilinear_taps(top, h, size)                               # (B, size)
    x0, x1, wx = _bilinear_taps(left, w, size)
    x0, x1, wx = (torch.where(flips[:, None], t.flip(1), t) for t in (x0, x1, wx))  # a flip reads right to left
    rows = lambda y: images[batch[:, None, None], channel[None, :, None], y[:, None, :]]   # (B, C, size, W)
    x = rows(y0) * (1 - wy[:, None, :, None]) + rows(y1) * wy[:, None, :, None]
    cols = lambda c: x[batch[:, None, None, None], channel[None, :, None, None],
                       torch.arange(size, device=images.device)[None, None, :, None], c[:, None, None, :]]
    return cols(x0) * (1 - wx[:, None, None, :]) + cols(x1) * wx[:, None, None, :]   # (B, C, size, size)


def batched_resized_crop(images, size, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3), generator=None, shard=(0, 1)):
    """``T.RandomResizedCrop(size, scale, ratio)`` + ``T.RandomHorizontalFlip()`` on every
    image of a batch (``resized_crop_params``, ``resized_crop_with_params``); ``shard`` as
    in ``batched_crop_flip``. not torchvision's pixels: its PIL path rounds to uint8 and,
    shrinking, antialiases; this one stays in float (tested against ``F.resized_crop``
    without antialias). Shapes: images (B, C, H, W) float -> (B, C, size, size)."""
    rank, n = shard
    params = resized_crop_params(images.shape[0] * n, *images.shape[2:], scale, ratio, generator, images.device)
    return resized_crop_with_params(images, *(p[rank::n] for p in params), size=size)


def batched_rgb_to_gray(images):
    """Luma with torchvision's weights 0.2989 R + 0.587 G + 0.114 B (its
    ``rgb_to_grayscale``; PIL's ``convert("L")`` uses 0.299).
    Shapes: (B, 3, H, W) float -> (B, 1, H, W)."""
    r, g, b = images.unbind(1)                                              # (B, H, W) each
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)                # (B, 1, H, W)


def _blend(images, other, factors):
    """factor * images + (1 - factor) * other, clamped to [0, 1] (torchvision's
    ``_blend`` on float images). factors (B,) -> one factor per image."""
    f = factors.to(images.dtype).view(-1, 1, 1, 1)                          # (B, 1, 1, 1)
    return (f * images + (1 - f) * other).clamp(0, 1)


def batched_brightness(images, factors):
    """``F.adjust_brightness`` per image: blend with black. (B, 3, H, W), (B,) -> (B, 3, H, W)."""
    return _blend(images, 0.0, factors)


def batched_contrast(images, factors):
    """``F.adjust_contrast`` per image: blend with the image's mean luma.
    (B, 3, H, W), (B,) -> (B, 3, H, W)."""
    mean = batched_rgb_to_gray(images).mean(dim=(1, 2, 3), keepdim=True)    # (B, 1, 1, 1)
    return _blend(images, mean, factors)


def batched_saturation(images, factors):
    """``F.adjust_saturation`` per image: blend with its own grayscale.
    (B, 3, H, W), (B,) -> (B, 3, H, W)."""
    return _blend(images, batched_rgb_to_gray(images), factors)


def batched_rgb_to_hsv(images):
    """RGB in [0, 1] -> HSV in [0, 1] (h in turns), per pixel; ties go to R, then G,
    and gray pixels get h = s = 0, as torchvision's ``_rgb2hsv``.
    Shapes: (B, 3, H, W) -> (B, 3, H, W)."""
    r, g, b = images.unbind(1)                                              # (B, H, W) each
    maxc, minc = images.amax(1), images.amin(1)                             # (B, H, W)
    chroma = maxc - minc
    s = chroma / torch.where(maxc > 0, maxc, torch.ones_like(maxc))
    c = torch.where(chroma > 0, chroma, torch.ones_like(chroma))            # gray: any h works, 0 results
    h = torch.where(maxc == r, (g - b) / c,
                    torch.where(maxc == g, 2 + (b - r) / c, 4 + (r - g) / c))  # in sixths of a turn
    return torch.stack((torch.remainder(h / 6, 1.0), s, maxc), dim=1)


def batched_hsv_to_rgb(hsv):
    """HSV in [0, 1] -> RGB in [0, 1]: channel_n = v - v s clamp(min(k, 4 - k), 0, 1)
    with k = (n + 6 h) mod 6 and n = 5, 3, 1 for R, G, B (the closed form of the
    usual six-sector table). Shapes: (B, 3, H, W) -> (B, 3, H, W)."""
    h, s, v = hsv[:, 0:1], hsv[:, 1:2], hsv[:, 2:3]                         # (B, 1, H, W) each
    n = (5 - 2 * torch.arange(3, device=hsv.device, dtype=hsv.dtype)).view(1, 3, 1, 1)  # 5, 3, 1
    k = torch.remainder(n + 6 * h, 6)                                       # (B, 3, H, W)
    return v - v * s * torch.minimum(k, 4 - k).clamp(0, 1)


def batched_hue(images, shifts):
    """``F.adjust_hue`` per image: rotate the hue by ``shifts[b]`` turns (in
    [-0.5, 0.5]). (B, 3, H, W), (B,) -> (B, 3, H, W)."""
    h, s, v = batched_rgb_to_hsv(images).unbind(1)                          # (B, H, W) each
    h = torch.remainder(h + shifts.to(h.dtype).view(-1, 1, 1), 1.0)
    return batched_hsv_to_rgb(torch.stack((h, s, v), dim=1))


COLOR_OPS = (batched_brightness, batched_contrast, batched_saturation, batched_hue)  # ColorJitter's fn_idx 0..3


def color_jitter_params(batch_size, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1,
                        generator=None, device="cpu"):
    """Per-sample factors of ``T.ColorJitter(brightness, contrast, saturation, hue)``:
    brightness, contrast, saturation uniform on [max(0, 1 - x), 1 + x], hue shift
    uniform on [-hue, hue]; an op whose strength is 0 gets None (skipped, as in
    torchvision). Returns a list of 4 (B,) tensors or None, in ``COLOR_OPS`` order."""
    ranges = [(max(0.0, 1 - x), 1 + x) if x else None for x in (brightness, contrast, saturation)]
    ranges.append((-hue, hue) if hue else None)
    factors = []
    for r in ranges:
        u = torch.rand(batch_size, generator=generator, device=device)      # (B,), drawn even for a skipped op
        factors.append(None if r is None else r[0] + (r[1] - r[0]) * u)
    return factors


def color_jitter_with_params(images, factors, order=(0, 1, 2, 3)):
    """Apply ``COLOR_OPS[i]`` with ``factors[i]`` for i in ``order`` (None factors
    skipped). Shapes: images (B, 3, H, W) float in [0, 1], factors 4 x (B,) -> (B, 3, H, W)."""
    for i in order:
        if factors[i] is not None:
            images = COLOR_OPS[i](images, factors[i])
    return images


def batched_color_jitter(images, brightness=0.4, contrast=0.4, saturation=0.4, hue=0.1, p=0.8,
                         generator=None, order=None, shard=(0, 1)):
    """``T.RandomApply([T.ColorJitter(brightness, contrast, saturation, hue)], p=p)``
    on a batch: every image gets its own factors and its own coin (drawn from
    ``generator``, on the images' device). ``order``: the op order, a permutation
    of 0..3 (``COLOR_OPS`` indices) shared by the batch; drawn here with
    ``torch.randperm(4)`` from the global CPU RNG when None.
    Shapes: images (B, 3, H, W) float in [0, 1] -> (B, 3, H, W).
    """
    B, device, (rank, n) = images.shape[0], images.device, shard              # shard: as in batched_crop_flip
    factors = color_jitter_params(B * n, brightness, contrast, saturation, hue, generator, device)
    factors = [None if f is None else f[rank::n] for f in factors]
    apply = (torch.rand(B * n, generator=generator, device=device) < p)[rank::n]   # (B,) RandomApply's coin
    # not in torchvision: one random op order per batch, not per image (per-image
    # orders would cost all 4 ops at each of 4 steps). It is drawn on the host
    # (TensorLoader draws it from the batch seed) so that no device sync is needed.
    order = torch.randperm(4).tolist() if order is None else order
    jittered = color_jitter_with_params(images, factors, order)
    return torch.where(apply[:, None, None, None], jittered, images)


def batched_grayscale(images, p=0.2, generator=None, shard=(0, 1)):
    """``T.RandomGrayscale(p)`` on a batch: each image, with probability p, becomes
    its luma on all 3 channels; ``shard`` as in ``batched_crop_flip``.
    Shapes: (B, 3, H, W) float -> (B, 3, H, W)."""
    rank, n = shard
    gray = (torch.rand(images.shape[0] * n, generator=generator, device=images.device) < p)[rank::n]   # (B,)
    return torch.where(gray[:, None, None, None], batched_rgb_to_gray(images).expand_as(images), images)


def normalize_(images, mean, std):
    """``T.Normalize(mean, std)`` on a batch already in [0, 1], in place. ``mean``,
    ``std``: 3 floats, or (1, 3, 1, 1) tensors already on the device (no copy, so
    no device sync). Shapes: (B, 3, H, W) float -> (B, 3, H, W)."""
    mean = torch.as_tensor(mean, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    std = torch.as_tensor(std, dtype=images.dtype, device=images.device).view(1, -1, 1, 1)
    return images.sub_(mean).div_(std)


def normalize_uint8(images, mean, std):
    """``T.ToTensor()`` then ``T.Normalize(mean, std)`` on a batch (test-set
    evaluation): (x / 255 - mean) / std. Shapes: (B, 3, H, W) uint8 -> (B, 3, H, W) float32."""
    return normalize_(images.float().div_(255), mean, std)


def _uint8_source(dataset):
    """The (N, H, W, 3) uint8 array behind an ArrayDataset or torchvision CIFAR set, else None."""
    if isinstance(dataset, ArrayDataset):
        array = dataset.images
    elif isinstance(dataset, torchvision.datasets.CIFAR10):  # CIFAR100 subclasses it
        array = dataset.data
    else:
        return None
    ok = isinstance(array, np.ndarray) and array.dtype == np.uint8 and array.ndim == 4 and array.shape[-1] == 3
    return array if ok else None


def _base(dataset):
    """The dataset under any (nested) Subsets."""
    while isinstance(dataset, torch.utils.data.Subset):
        dataset = dataset.dataset
    return dataset


def stored_size(dataset):
    """(H, W) of the uint8 images behind an ArrayDataset / torchvision CIFAR set or a
    (nested) Subset of one, else None."""
    array = _uint8_source(_base(dataset))
    return None if array is None else tuple(array.shape[1:3])


def _transform_steps(dataset):
    transform = getattr(_base(dataset), "transform", None)
    return getattr(transform, "transforms", [transform])


def can_use_tensor_loader(dataset, files=False):
    """True for an ArrayDataset, a torchvision CIFAR10/100, or a (nested) Subset of
    one, whose transform does not resize: TensorLoader crops at the stored size and
    ignores the dataset's own transform. ``files``: also a ``FileListDataset`` (LFW)
    trained with ``T.RandomResizedCrop``, decoded once into memory (its images must
    share one size; ``dataset_uint8`` checks)."""
    base, steps = _base(dataset), _transform_steps(dataset)
    if files and isinstance(base, FileListDataset):
        return any(isinstance(t, T.RandomResizedCrop) for t in steps)
    if any(isinstance(t, T.Resize) for t in steps):
        return False
    return _uint8_source(base) is not None


def tensor_augmentation(dataset):
    """The ``TensorLoader`` augmentation that stands for the dataset's own training
    transform: {"resized": (size, scale, ratio)} for a ``T.RandomResizedCrop``, else {}
    (``cifar_transforms``' pad-4 crop). Both flip with p = 0.5."""
    crop = next((t for t in _transform_steps(dataset) if isinstance(t, T.RandomResizedCrop)), None)
    return {} if crop is None else {"resized": (crop.size[0], tuple(crop.scale), tuple(crop.ratio))}


def _decode_files(dataset):
    """(N, H, W, 3) uint8 of every image of a ``FileListDataset``, decoded once (kept on
    the dataset); images of different sizes are one DataError."""
    if getattr(dataset, "decoded", None) is None:
        sizes = []
        for path, _ in dataset.samples:  # from the headers first: a folder of mixed sizes stops before decoding
            try:
                with Image.open(path) as image:
                    sizes.append(image.size)
            except (OSError, SyntaxError, ValueError):
                load_image(path)  # its one-line DataError
        odd = next((path for (path, _), size in zip(dataset.samples, sizes) if size != sizes[0]), None)
        if odd is not None:
            raise DataError(f"--loader tensor needs images of one size: {odd} is not {sizes[0][0]}x{sizes[0][1]} "
                            f"like {dataset.samples[0][0]}; pass --loader torch")
        dataset.decoded = np.stack([np.asarray(load_image(path)) for path, _ in dataset.samples])
    return dataset.decoded


def dataset_uint8(dataset):
    """All images and labels of an ArrayDataset / torchvision CIFAR set, or of a
    (nested) Subset of one with its indices applied, as CPU tensors.
    Returns images (N, 3, H, W) uint8, labels (N,) int64."""
    if isinstance(dataset, torch.utils.data.Subset):
        images, labels = dataset_uint8(dataset.dataset)
        index = torch.as_tensor(dataset.indices, dtype=torch.long)
        return images[index], labels[index]
    array = _decode_files(dataset) if isinstance(dataset, FileListDataset) else _uint8_source(dataset)
    if array is None:
        raise TypeError(f"{type(dataset).__name__} holds no uint8 (N, H, W, 3) array; the tensor loader takes "
                        f"an ArrayDataset, a CIFAR set, a FileListDataset or a Subset of one")
    images = torch.from_numpy(np.ascontiguousarray(array)).permute(0, 3, 1, 2).contiguous()  # (N, 3, H, W)
    return images, torch.as_tensor(dataset.targets, dtype=torch.long)


class TensorEvalLoader:
    """The evaluation counterpart of ``TensorLoader``: the whole uint8 set is one
    (N, 3, H, W) tensor on ``device``; batches come in order, converted there as
    ``T.ToTensor()`` + ``T.Normalize(mean, std)`` would (``normalize_uint8``), so
    the results equal a DataLoader over the set's un-augmented test transform
    (``cifar_transforms``' test side), without PIL, workers or host copies.
    ``rank`` / ``world_size``: this process's shard, every world_size-th image.

    Yields (images (B, 3, H, W) float32, labels (B,) int64), both on ``device``."""

    def __init__(self, dataset, batch_size, device, mean, std, rank=0, world_size=1):
        images, labels = dataset_uint8(dataset)                              # (N, 3, H, W) uint8, (N,)
        device = torch.device(device)
        self.images, self.labels = images[rank::world_size].to(device), labels[rank::world_size].to(device)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1).to(device)   # (1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1).to(device)
        self.batch_size = batch_size

    def __len__(self):
        return -(-len(self.labels) // self.batch_size)

    def __iter__(self):
        for start in range(0, len(self.labels), self.batch_size):
            batch = slice(start, start + self.batch_size)
            yield normalize_uint8(self.images[batch], self.mean, self.std), self.labels[batch]


class TensorLoader:
    """A DataLoader replacement for uint8 image sets that fit on the device.

    The whole set is one (N, 3, H, W) uint8 tensor on ``device``. Each batch is
    indexed there, augmented with ``batched_crop_flip`` (pad ``padding``, random
    crop, flip p=0.5: ``cifar_transforms``'s training augmentation) or, with
    ``resized=(size, scale, ratio)``, ``batched_resized_crop`` (``T.RandomResizedCrop``
    + flip: ``resized_crop_transforms``', e.g. LFW's), scaled to [0, 1] and normalised
    with ``mean`` / ``std``.

    Order and resume: the batches follow ``sampler``, which yields ``(index,
    sample_seed)`` pairs like ``ResumableSampler``; the trainer calls
    ``sampler.set_epoch(epoch, start)`` as with the DataLoader. A batch's random
    augmentation comes from generators seeded with its first sample_seed, so a run
    resumed at a batch boundary sees the same images. A sampler of plain indices
    also works: batch k of this loader's life then uses seed ``seed * 1_000_003 + k``
    (not reproducible across a resume). With ``num_replicas`` N processes, each
    reading every N-th sample of the sampler, the generators start from the whole
    N-process batch's seed and every draw is made for that whole batch, each process
    keeping its share: together they augment it exactly as one process would.

    ``views=2, contrastive=True`` (SupContrast-style two views, Wang et al. 2021
    digest: "one view with colour jitter, one without"): view 1 = crop + flip + ``batched_color_jitter``
    (0.4, 0.4, 0.4, 0.1, p=0.8) + ``batched_grayscale`` (p=0.2); view 2 = crop +
    flip + grayscale (p=0.2). Without ``contrastive`` every view is crop + flip, plus
    grayscale with probability ``grayscale`` (the hybrid network's CE branch: 0.2).

    Yields (images, labels): images (B, 3, H, W) float32 when ``views == 1``, else
    (B, views, 3, H, W); labels (B,) int64; both on ``device``. ``len()`` is the
    number of batches left in the sampler's epoch. ``tensors``: ``dataset_uint8(dataset)``
    already made (and placed), to share one copy between loaders of the same set.
    """

    def __init__(self, dataset, batch_size, device, mean, std, sampler, seed=0, drop_last=True,
                 views=1, contrastive=False, padding=4, grayscale=0.0, num_replicas=1, rank=0, tensors=None,
                 resized=None):
        images, labels = tensors if tensors is not None else dataset_uint8(dataset)
        self.device = torch.device(device)
        self.images, self.labels = images.to(self.device), labels.to(self.device)   # (N, 3, H, W) uint8, (N,)
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1).to(self.device)  # (1, 3, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1).to(self.device)
        self.dataset, self.sampler, self.batch_size, self.drop_last = dataset, sampler, batch_size, drop_last
        self.seed, self.views, self.contrastive, self.padding = seed, views, contrastive, padding
        self.grayscale, self.shard, self.resized = grayscale, (rank, num_replicas), resized
        self.generator = torch.Generator(device=self.device)  # crops, flips, colour factors
        self.host_generator = torch.Generator()               # the colour-op order, drawn without a device sync
        self.batches_made = 0

    def __len__(self):
        n = len(self.sampler)
        return n // self.batch_size if self.drop_last else -(-n // self.batch_size)

    def __iter__(self):
        items = []
        for item in self.sampler:
            items.append(item)
            if len(items) == self.batch_size:
                yield self.make_batch(items)
                items = []
        if items and not self.drop_last:
            yield self.make_batch(items)

    def make_batch(self, items):
        """items: list of (index, sample_seed) pairs or plain indices -> (images, labels)."""
        if isinstance(items[0], (tuple, list)):
            # the samplers seed global position p with base + p, and this process's first sample is at
            # position k B N + rank: minus rank, the seed of the whole (N-process) batch's first sample
            indices, batch_seed = [i for i, _ in items], items[0][1] - self.shard[0]
        else:
            indices, batch_seed = list(items), self.seed * 1_000_003 + self.batches_made
        self.batches_made += 1
        self.generator.manual_seed(batch_seed)
        self.host_generator.manual_seed(batch_seed)
        index = torch.tensor(indices, dtype=torch.long)                     # (B,)
        if self.device.type == "cuda":
            index = index.pin_memory()  # a pinned, non-blocking copy does not wait for the GPU
        index = index.to(self.device, non_blocking=True)
        images, labels = self.images[index], self.labels[index]             # (B, 3, H, W) uint8, (B,)
        views = [self.augment(images, view) for view in range(self.views)]
        if self.views == 1:
            return views[0], labels
        return torch.stack(views, dim=1), labels                            # (B, V, 3, H, W)

    def augment(self, images, view):
        """One augmented view: (B, 3, H, W) uint8 -> (B, 3, H, W) float32, normalised."""
        if self.resized:  # (B, 3, size, size)
            x = batched_resized_crop(images.float(), *self.resized, generator=self.generator, shard=self.shard).div_(255)
        else:
            x = batched_crop_flip(images, self.padding, self.generator, self.shard).float().div_(255)  # (B, 3, H, W)
        if self.contrastive:
            if view == 0:
                order = torch.randperm(4, generator=self.host_generator).numpy().tolist()  # a host tensor: no device wait
                x = batched_color_jitter(x, 0.4, 0.4, 0.4, 0.1, p=0.8, generator=self.generator, order=order,
                                         shard=self.shard)
            x = batched_grayscale(x, p=0.2, generator=self.generator, shard=self.shard)
        elif self.grayscale:
            x = batched_grayscale(x, p=self.grayscale, generator=self.generator, shard=self.shard)
        return normalize_(x, self.mean, self.std)


# ----------------------------------------------------------------------------------
# Training and test loaders: one stream, or the hybrid network's two
# ----------------------------------------------------------------------------------
def use_tensor_loader(train_set, loader="auto"):
    """``loader`` "auto" picks the tensor-resident loader when the training set is a
    uint8 array at its training size (cifar10/100, npz, their long-tailed subsets);
    "tensor" insists on it, and also takes a file dataset trained with
    RandomResizedCrop (LFW), decoded into memory once; "torch" never uses it."""
    fits = can_use_tensor_loader(train_set, files=loader == "tensor")
    if loader == "tensor" and not fits:
        size = stored_size(train_set)
        fix = (f"pass --image-size {size[0]} (its stored size) or --loader torch" if size and size[0] == size[1]
               else "pass --loader torch")
        raise DataError(f"--loader tensor needs an in-memory uint8 dataset trained at its stored size "
                        f"(cifar10, cifar100, npz) or an LFW-like folder of one image size: {fix}")
    return loader == "tensor" or (loader == "auto" and fits)


def make_train_loader(train_set, batch_size, device, seed, loader="auto", sampler="instance", workers=2,
                      normalize="cifar", two_streams=False, positives=0, image_size=32, small=True,
                      rank=0, world_size=1, hybrid_crop="pad", ce_sampler="class-balanced"):
    """Shuffled with ``ResumableSampler`` and augmented per sample from its own seed
    (``PerSampleSeed``), so a resumed run sees the same batches. With the tensor
    loader (``TensorLoader``, see ``use_tensor_loader``) the whole uint8 set sits on
    ``device`` and each batch is augmented there in a few batched ops, from a seed of
    the batch. In a distributed run each process draws every ``world_size``-th
    sample. ``sampler="class-balanced"`` replaces the shuffled order with
    ``ClassBalancedSampler``.

    ``two_streams`` (the hybrid network, Wang et al. 2021) yields per iteration
    ((views (B, 2, 3, H, W), labels (B,)), (images (B', 3, H, W), labels (B',))): the
    contrastive branch's instance-sampled images (in groups of ``positives``
    same-class images with ``PositivesSampler`` when > 0), two views each
    (``hybrid_transforms``), and the CE branch's batch of single views: class-balanced
    (``ClassBalancedSampler``) or, with ``ce_sampler="instance"``, a second shuffled order
    (``ResumableSampler``, stream 1). Both streams have
    len(train_set) // batch_size batches per epoch. ``small``: 32-px images (CIFAR's
    crop); ``hybrid_crop``: their crop in both streams (``hybrid_transforms``).
    Returns (loader, sampler), the sampler to ``set_epoch``."""
    if hybrid_crop not in ("pad", "resized"):
        raise ValueError(f"hybrid_crop must be 'pad' or 'resized', got {hybrid_crop!r}")
    if ce_sampler not in ("class-balanced", "instance"):
        raise ValueError(f"ce_sampler must be 'class-balanced' or 'instance', got {ce_sampler!r}")
    if batch_size * world_size > len(train_set):
        per = f" x {world_size} processes" if world_size > 1 else ""
        raise DataError(f"--batch-size {batch_size}{per} is larger than the training set "
                        f"({len(train_set)} images); pass a smaller --batch-size")
    order = ResumableSampler(len(train_set), seed, world_size, rank)
    if not two_streams and sampler == "class-balanced":
        order = ClassBalancedSampler(train_set.targets, seed, num_replicas=world_size, rank=rank)
    tensor = use_tensor_loader(train_set, loader)
    if tensor:
        shared = [t.to(device) for t in dataset_uint8(train_set)]  # one copy of the set for both streams

        def tensor_loader(order, **augment):
            return TensorLoader(train_set, batch_size, device, *NORMALIZATIONS[normalize], order, seed,
                                num_replicas=world_size, rank=rank, tensors=shared,
                                **{**tensor_augmentation(train_set), **augment})

    def torch_loader(dataset, order):
        return torch.utils.data.DataLoader(
            PerSampleSeed(dataset), batch_size=batch_size, sampler=order, num_workers=workers,
            pin_memory=device.type == "cuda", drop_last=True, persistent_workers=workers > 0,
            generator=torch.Generator().manual_seed(seed))  # worker seeds never touch the global RNG
    if not two_streams:
        return (tensor_loader(order) if tensor else torch_loader(train_set, order)), order
    ce_order = (ClassBalancedSampler(train_set.targets, seed, num_replicas=world_size, rank=rank)
                if ce_sampler == "class-balanced" else ResumableSampler(len(train_set), seed, world_size, rank, stream=1))
    if positives:  # the contrastive stream in groups of same-class images (many classes, small batches)
        try:
            order = PositivesSampler(train_set.targets, positives, batch_size * world_size, seed, world_size, rank)
        except ValueError as e:
            raise DataError(f"--positives {positives}: {e}") from None
    if tensor:
        resized = small and hybrid_crop == "resized"
        crop = {"resized": (image_size, SUPCON_CROP_SCALE, (3 / 4, 4 / 3))} if resized else {}  # T's default ratio
        streams = [tensor_loader(order, views=2, contrastive=True, **crop),
                   tensor_loader(ce_order, grayscale=0.2, **crop)]
        return ZippedLoaders(streams), ZippedSamplers([order, ce_order])
    ce_transform, two_views = hybrid_transforms(normalize, image_size, small, stored_size(train_set) or (32, 32),
                                                hybrid_crop)
    streams = [torch_loader(with_transform(train_set, two_views), order),
               torch_loader(with_transform(train_set, ce_transform), ce_order)]
    return ZippedLoaders(streams), ZippedSamplers([order, ce_order])


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
    name) and a set that ``can_use_tensor_loader`` accepts, a ``TensorEvalLoader``
    (the set on the device, no PIL); else a DataLoader. In a distributed run each
    process takes every world_size-th image; the caller sums the counts."""
    if normalize is not None and can_use_tensor_loader(test_set):
        return TensorEvalLoader(test_set, batch_size, device, *NORMALIZATIONS[normalize], rank, world_size)
    if world_size > 1:
        test_set = torch.utils.data.Subset(test_set, range(rank, len(test_set), world_size))
    return torch.utils.data.DataLoader(test_set, batch_size=batch_size, shuffle=False,
                                       num_workers=workers, pin_memory=device.type == "cuda",
                                       generator=torch.Generator().manual_seed(0))
