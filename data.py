"""Datasets and transforms, in the formats users have on disk.

Stands alone: imports only torch / torchvision / numpy / stdlib.

    build_datasets(name, data_path, ...) -> (train_set, test_set, num_classes)

Every returned dataset yields ``(image_tensor, label)`` and has ``.targets`` (list
of int) and ``.classes`` (list of str). Missing or malformed data raises
``DataError`` with a one-line message naming the path and the flag to pass; the
scripts print it and exit with code 2.

Formats (SPEC.md Sec. 6):
    cifar10, cifar100  torchvision's CIFAR (``download=True`` fetches it)
    npz                x_train, y_train, x_test, y_test; uint8 NHWC images
    imagefolder        <root>/train/<class>/*.jpg and <root>/val/<class>/*.jpg
    lfw                <root>/<Name>/<Name>_NNNN.jpg; top-k identities, seeded 8:2 split
    cub                CUB_200_2011 release: images.txt, image_class_labels.txt,
                       train_test_split.txt, images/
    nabirds            NABirds release: the same files plus classes.txt; UUID image
                       ids, non-contiguous class ids mapped to 0..K-1
    dogs               Stanford Dogs as <root>/train/<class>/*.jpg and
                       <root>/test/<class>/*.jpg (or val/)
"""
import os
import zipfile

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
from PIL import Image
from torchvision.datasets.folder import default_loader

DATASETS = ("cifar10", "cifar100", "npz", "imagefolder", "lfw", "cub", "nabirds", "dogs")

CIFAR_MEAN, CIFAR_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
# Seed 001 scales pixels to x*2/255 - 1: ToTensor gives x/255, then (t - 0.5)/0.5.
SEED001_MEAN, SEED001_STD = (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)
NORMALIZATIONS = {"cifar": (CIFAR_MEAN, CIFAR_STD), "imagenet": (IMAGENET_MEAN, IMAGENET_STD),
                  "seed001": (SEED001_MEAN, SEED001_STD)}


class DataError(Exception):
    """Missing or malformed data; the message is one line meant for the user."""


# ----------------------------------------------------------------------------------
# Transforms
# ----------------------------------------------------------------------------------
def cifar_transforms(normalize="cifar", image_size=32):
    """Train: pad 4 with zeros, random crop, horizontal flip p=0.5 (He et al. 2016;
    seed 001 Sec. 3.2). Test: no augmentation. ``normalize="seed001"`` gives seed
    001's x*2/255-1, ``"cifar"`` the per-channel CIFAR-10 mean/std."""
    norm = T.Normalize(*NORMALIZATIONS[normalize])
    resize = [] if image_size == 32 else [T.Resize(image_size)]
    train = T.Compose(resize + [T.RandomCrop(image_size, padding=4), T.RandomHorizontalFlip(),
                                T.ToTensor(), norm])
    test = T.Compose(resize + [T.ToTensor(), norm])
    return train, test


def lfw_transforms(image_size=224, normalize="imagenet"):
    """Seed 000 (LFW): RandomResizedCrop + horizontal flip for training, resize and
    center crop for testing."""
    norm = T.Normalize(*NORMALIZATIONS[normalize])
    train = T.Compose([T.RandomResizedCrop(image_size), T.RandomHorizontalFlip(), T.ToTensor(), norm])
    # not in the paper: the test resize side (image_size / 0.875, torchvision's ratio).
    test = T.Compose([T.Resize(round(image_size / 0.875)), T.CenterCrop(image_size), T.ToTensor(), norm])
    return train, test


def cub_transforms(image_size=224, normalize="imagenet"):
    """Seed 000 (CUB): resize, random crop with 4 px padding, horizontal flip;
    test: resize only."""
    norm = T.Normalize(*NORMALIZATIONS[normalize])
    resize = T.Resize((image_size, image_size))
    train = T.Compose([resize, T.RandomCrop(image_size, padding=4), T.RandomHorizontalFlip(),
                       T.ToTensor(), norm])
    test = T.Compose([resize, T.ToTensor(), norm])
    return train, test


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
    workers and wherever a run was resumed.
    """

    def __init__(self, num_samples, seed=0):
        self.num_samples, self.seed, self.epoch, self.start = num_samples, seed, 0, 0

    def set_epoch(self, epoch, start=0):
        self.epoch, self.start = epoch, start

    def __len__(self):
        return self.num_samples - self.start

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        base = (self.seed * 1_000_003 + self.epoch) * self.num_samples
        for position in range(self.start, self.num_samples):
            yield order[position], base + position


class PerSampleSeed(torch.utils.data.Dataset):
    """Wraps a dataset so ``dataset[(index, sample_seed)]`` runs its random
    transforms under ``torch.manual_seed(sample_seed)``, leaving the caller's RNG
    untouched."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, sample_seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(sample_seed)
            return self.dataset[index]


# ----------------------------------------------------------------------------------
# Loaders per format
# ----------------------------------------------------------------------------------
def load_cifar(name, root, download, transforms):
    cls = torchvision.datasets.CIFAR10 if name == "cifar10" else torchvision.datasets.CIFAR100
    try:
        train = cls(root, train=True, transform=transforms[0], download=download)
        test = cls(root, train=False, transform=transforms[1], download=download)
    except RuntimeError as e:  # torchvision: "Dataset not found or corrupted..."
        raise DataError(f"{name} not found under {os.path.abspath(root)}: pass --download to fetch "
                        f"it, or --data-path DIR where it already is ({e})") from None
    except OSError as e:  # no network while downloading
        raise DataError(f"could not download {name} into {os.path.abspath(root)} ({e}); "
                        f"download it elsewhere and pass --data-path DIR") from None
    return train, test, len(train.classes)


def load_npz(path, transforms):
    if os.path.isdir(path):
        raise DataError(f"--data-path {path} is a folder; --dataset npz needs the .npz file itself")
    try:
        arrays = np.load(path)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:
        raise DataError(f"cannot read {path} as .npz ({e.__class__.__name__}); pass "
                        f"--data-path FILE.npz with keys x_train, y_train, x_test, y_test") from None
    missing = [k for k in ("x_train", "y_train", "x_test", "y_test") if k not in arrays]
    if missing:
        raise DataError(f"{path} lacks keys {missing}; an npz dataset needs "
                        f"x_train, y_train, x_test, y_test (uint8 NHWC images, int labels)")
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


def load_imagefolder(root, transforms):
    sets = []
    for split, transform in zip(("train", "val"), transforms):
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            raise DataError(f"{folder} not found: --dataset imagefolder needs --data-path DIR "
                            f"with DIR/train/<class>/ and DIR/val/<class>/")
        try:
            sets.append(torchvision.datasets.ImageFolder(folder, transform=transform, loader=load_image))
        except FileNotFoundError as e:  # no class folders / no images
            raise DataError(f"{folder}: {e}; --dataset imagefolder needs DIR/{split}/<class>/*.jpg") from None
    if sets[0].classes != sets[1].classes:
        raise DataError(f"{root}: train/ and val/ have different class folders")
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


def load_lfw(root, transforms, top_k=20, seed=0):
    """LFW tree <root>/<Name>/<Name>_NNNN.jpg. Keeps the ``top_k`` identities with
    the most images (ties broken by name, alphabetically), then splits each identity
    8:2 with ``seed`` (seed 000: "20 identities with the most images, 8:2")."""
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
    ``num_classes=N`` (seed 000's setup) keeps the first N classes and splits them
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
    test_split = "test" if os.path.isdir(os.path.join(root, "test")) else "val"
    sets = []
    for split, transform in zip(("train", test_split), transforms):
        folder = os.path.join(root, split)
        if not os.path.isdir(folder):
            raise DataError(f"{folder} not found: --dataset dogs needs --data-path DIR with "
                            f"DIR/train/<class>/ and DIR/test/<class>/ (the official split as folders)")
        try:
            sets.append(torchvision.datasets.ImageFolder(folder, transform=transform, loader=load_image))
        except FileNotFoundError as e:  # no class folders / no images
            raise DataError(f"{folder}: {e}; --dataset dogs needs DIR/{split}/<class>/*.jpg") from None
    if sets[0].classes != sets[1].classes:
        raise DataError(f"{root}: train/ and {test_split}/ have different class folders")
    return sets[0], sets[1], len(sets[0].classes)


def _skip_unreadable(dataset):
    """Drop unreadable files from a file-based dataset in place; records them in
    ``dataset.dropped``."""
    dataset.samples, dataset.dropped = drop_unreadable(dataset.samples)
    dataset.targets = [label for _, label in dataset.samples]
    if hasattr(dataset, "imgs"):
        dataset.imgs = dataset.samples
    return dataset


# not in the paper: seed 000 does not give its normalisation; ImageNet statistics for LFW / CUB.
DEFAULT_NORMALIZE = {"cifar10": "cifar", "cifar100": "cifar", "npz": "cifar",
                     "imagefolder": "imagenet", "lfw": "imagenet", "cub": "imagenet",
                     "nabirds": "imagenet", "dogs": "imagenet"}  # seed 002: ImageNet-pretrained Swin-L


def build_datasets(name, data_path=None, download=False, image_size=None, normalize=None,
                   lfw_top_k=20, cub_classes=None, split_seed=0, skip_corrupt=False):
    """Build (train_set, test_set, num_classes) for ``name`` in ``DATASETS``.

    ``image_size`` defaults to 32 for CIFAR/npz and 224 otherwise; ``normalize``
    (``"cifar"``, ``"imagenet"`` or ``"seed001"``) defaults per dataset.
    ``split_seed`` fixes the LFW / CUB-subset 8:2 splits. ``skip_corrupt`` opens
    every image of a file-based dataset once and drops the unreadable ones (listed
    in ``.dropped``); without it an unreadable image stops the run, named.
    """
    if name not in DATASETS:
        raise DataError(f"unknown dataset {name!r}; choose from {', '.join(DATASETS)}")
    small = name in ("cifar10", "cifar100", "npz")
    image_size = image_size or (32 if small else 224)
    normalize = normalize or DEFAULT_NORMALIZE[name]
    if name in ("cifar10", "cifar100"):
        return load_cifar(name, data_path or "./data", download, cifar_transforms(normalize, image_size))
    if data_path is None:
        raise DataError(f"--dataset {name} needs --data-path")
    if not os.path.exists(data_path):
        raise DataError(f"{data_path} does not exist: pass --data-path pointing at the {name} data")
    if name == "npz":
        return load_npz(data_path, cifar_transforms(normalize, image_size))
    if name == "imagefolder":
        sets = load_imagefolder(data_path, lfw_transforms(image_size, normalize))
    elif name == "lfw":
        sets = load_lfw(data_path, lfw_transforms(image_size, normalize), lfw_top_k, split_seed)
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
