"""All tests. Run as ``python test_all.py`` (prints ``N passed, N failed``) or
``python -m pytest test_all.py``. Tiny models and inputs: under 5 minutes on 2 CPU cores.

Loss tests compare against per-sample Python loops written from the paper's
equation (floats and ``math``, not tensors), in float64.
"""
import argparse
import copy
import contextlib
import importlib.util
import io
import json
import math
import os
import pickle
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
import torchvision.transforms as T
import torchvision.transforms.functional as TF
from PIL import Image

import benchmark
import data
import evaluate
import losses
import models
import reproduce
import train
import utils

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_DATA = os.path.join(HERE, "..", "shared", "data")


def assert_data_error(fn, *fragments):
    """``fn()`` raises DataError whose one-line message holds every fragment; returns the message."""
    try:
        fn()
    except data.DataError as e:
        assert all(f in str(e) for f in fragments) and "\n" not in str(e), str(e)
        return str(e)
    raise AssertionError("no DataError raised")


@contextlib.contextmanager
def tmpdir():
    path = tempfile.mkdtemp(prefix="test_all_")
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


# ----------------------------------------------------------------------------------
# Losses vs naive loops
# ----------------------------------------------------------------------------------
def _features_and_centers(B, K, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, d, generator=g, dtype=torch.float64), torch.randn(K, d, generator=g, dtype=torch.float64)


def test_contrastive_center_matches_naive_loop_with_absent_class():
    x, c = _features_and_centers(7, 5, 3)
    y = torch.tensor([0, 1, 1, 3, 0, 4, 3])  # class 2 absent from the batch
    for reduction in ("sum", "mean"):
        loss = losses.ContrastiveCenterLoss(5, 3, delta=0.7, reduction=reduction).double()
        loss.centers.data.copy_(c)
        want = losses.naive_contrastive_center(x.tolist(), y.tolist(), c.tolist(), 0.7, reduction)
        assert abs(loss(x, y).item() - want) < 1e-12, (reduction, loss(x, y).item(), want)


def test_contrastive_center_single_sample_and_single_class():
    x, c = _features_and_centers(1, 4, 6, seed=1)
    y = torch.tensor([2])
    loss = losses.ContrastiveCenterLoss(4, 6).double()
    loss.centers.data.copy_(c)
    assert abs(loss(x, y).item() - losses.naive_contrastive_center(x.tolist(), [2], c.tolist(), 1.0)) < 1e-12
    # K = 1: no other center, the denominator is delta alone.
    one = losses.ContrastiveCenterLoss(1, 6, delta=2.0).double()
    one.centers.data.copy_(c[:1])
    want = 0.5 * sum((a - b) ** 2 for a, b in zip(x[0].tolist(), c[0].tolist())) / 2.0
    assert abs(one(x, torch.tensor([0])).item() - want) < 1e-12


def test_contrastive_center_gradcheck():
    x, c = _features_and_centers(4, 3, 2, seed=2)
    y = torch.tensor([0, 2, 2, 1])
    loss = losses.ContrastiveCenterLoss(3, 2).double()

    def f(features, centers):
        return torch.func.functional_call(loss, {"centers": centers}, (features, y))

    assert torch.autograd.gradcheck(f, (x.requires_grad_(), c.requires_grad_()))


def test_center_loss_matches_naive_loop():
    x, c = _features_and_centers(6, 4, 3, seed=3)
    y = torch.tensor([3, 3, 0, 1, 0, 3])  # class 2 absent
    for reduction in ("sum", "mean"):
        for update in ("wen", "autograd"):
            loss = losses.CenterLoss(4, 3, reduction, update).double()
            loss.centers.data.copy_(c)
            want = losses.naive_center(x.tolist(), y.tolist(), c.tolist(), reduction)
            assert abs(loss(x, y).item() - want) < 1e-12


def test_center_loss_wen_update_and_feature_gradient():
    """One SGD step at lr alpha moves c_j by alpha * sum_i [y_i=j](c_j - x_i) / (1 + n_j)
    (Wen et al. Eq. 4), whatever lambda is; x_i gets lambda * (x_i - c_{y_i})."""
    x, c = _features_and_centers(5, 3, 2, seed=6)
    y = [2, 0, 2, 2, 1]
    loss = losses.CenterLoss(3, 2).double()
    loss.centers.data.copy_(c)
    x.requires_grad_()
    (0.003 * loss(x, torch.tensor(y))).backward()
    torch.optim.SGD(loss.parameters(), lr=0.5).step()
    for j in range(3):
        members = [i for i in range(5) if y[i] == j]
        for k in range(2):
            delta = sum(c[j, k].item() - x[i, k].item() for i in members) / (1 + len(members))
            assert abs(loss.centers[j, k].item() - (c[j, k].item() - 0.5 * delta)) < 1e-12
    for i in range(5):
        for k in range(2):
            assert abs(x.grad[i, k].item() - 0.003 * (x[i, k].item() - c[y[i], k].item())) < 1e-12
    absent = losses.CenterLoss(4, 2).double()
    before = absent.centers.detach().clone()
    absent(x.detach(), torch.tensor([0, 0, 1, 1, 2])).backward()
    torch.optim.SGD(absent.parameters(), lr=0.5).step()
    assert torch.equal(absent.centers[3], before[3])  # class 3 absent: its center stays


def test_center_loss_autograd_gradcheck():
    x, c = _features_and_centers(4, 3, 2, seed=7)
    loss = losses.CenterLoss(3, 2, update="autograd").double()

    def f(features, centers):
        return torch.func.functional_call(loss, {"centers": centers}, (features, torch.tensor([0, 2, 2, 1])))

    assert torch.autograd.gradcheck(f, (x.requires_grad_(), c.requires_grad_()))


def test_joint_loss_is_ce_plus_lambda_times_center_term():
    x, c = _features_and_centers(5, 3, 4, seed=4)
    logits = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    y = [2, 0, 0, 1, 2]
    ctc = losses.ContrastiveCenterLoss(3, 4).double()
    ctc.centers.data.copy_(c)
    total, parts = losses.JointSupervisionLoss(ctc, lam=0.3)(logits, x, torch.tensor(y))
    ce = sum(-logits[i, y[i]].item() + math.log(sum(math.exp(v) for v in logits[i].tolist()))
             for i in range(5)) / 5
    want = ce + 0.3 * losses.naive_contrastive_center(x.tolist(), y, c.tolist(), 1.0)  # Eq. 8
    assert abs(total.item() - want) < 1e-12
    assert abs(parts["ce"].item() - ce) < 1e-12


def test_center_losses_keep_float32_under_half_precision_features():
    loss = losses.ContrastiveCenterLoss(3, 4)
    out = loss(torch.randn(5, 4).to(torch.bfloat16), torch.tensor([0, 1, 2, 0, 1]))
    assert out.dtype == torch.float32


# ----------------------------------------------------------------------------------
# Models
# ----------------------------------------------------------------------------------
def test_cifar_resnet_parameter_table_in_docstring():
    rows = re.findall(r"^\s*(resnet\d+)\s+(\d+)\s+([\d.]+)M\s+([\d.]+)\s*$", models.__doc__, re.M)
    assert len(rows) == 5, rows
    for name, depth, params_m, _error in rows:
        model = models.build_model(name, 10)
        n = models.count_parameters(model)
        decimals = len(params_m.split(".")[1])
        assert round(n / 1e6, decimals) == float(params_m), (name, n, params_m)
        layers = sum(1 for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)) + 1
        assert layers == int(depth), (name, layers)
    assert round(models.count_parameters(models.build_model("resnet32", 10, block="preact")) / 1e6, 2) == 0.46


def _check_output(model, x, k):
    out = model(x)
    assert set(out) == {"logits", "embedding", "stages"}
    assert out["logits"].shape == (x.shape[0], k)
    assert out["embedding"].shape[0] == x.shape[0] and out["embedding"].ndim == 2
    assert [s.shape[1] for s in out["stages"]] == model.stage_channels
    sides = [s.shape[-1] for s in out["stages"]]
    assert sides == sorted(sides, reverse=True) and all(s.ndim == 4 for s in out["stages"])
    return out


def test_model_output_dicts():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    for block in ("post", "preact"):
        for shortcut in ("A", "B"):
            out = _check_output(models.build_model("resnet20", 7, block=block, shortcut=shortcut), x, 7)
            assert out["embedding"].shape == (2, 64) and len(out["stages"]) == 3
    for name, dim in (("resnet18", 512), ("mobilenet_v2", 1280)):
        out = _check_output(models.build_model(name, 5, image_size=32), x, 5)
        assert out["embedding"].shape == (2, dim) and len(out["stages"]) == 4
        assert out["stages"][0].shape[-1] >= 16  # CIFAR stem kept the resolution
    out = _check_output(models.build_model("resnet18", 5, image_size=96), torch.randn(2, 3, 96, 96), 5)
    assert out["stages"][0].shape[-1] == 24  # ImageNet stem: /4
    out = _check_output(models.build_model("swin_t", 4).eval(), x, 4)
    assert out["embedding"].shape == (2, 768) and len(out["stages"]) == 4


def test_embedding_is_the_input_of_the_final_fc():
    model = models.build_model("resnet20", 6).eval()
    out = model(torch.randn(3, 3, 32, 32))
    torch.testing.assert_close(model.fc(out["embedding"]), out["logits"])


def test_swin_l_configuration():
    with torch.device("meta"):
        model = models.build_model("swin_l", 1000)
    # Liu et al. 2021, Table 1: Swin-L has 197M parameters.
    assert abs(models.count_parameters(model) / 1e6 - 197) < 1.0
    assert model.stage_channels == [192, 384, 768, 1536]
    assert [len(model.net.features[i]) for i in (1, 3, 5, 7)] == [2, 2, 18, 2]
    assert model.net.features[7][0].attn.num_heads == 48


def test_seed001_first_unit_activates_before_the_split():
    model = models.build_model("resnet20", 10, block="preact").eval()
    first, second = model.groups[0][0], model.groups[0][1]
    for unit in (first, second):
        torch.nn.init.zeros_(unit.conv2.weight)  # residual branch outputs 0: only the shortcut remains
        unit.bn1.running_mean.fill_(0.5)
    x = torch.randn(2, 16, 8, 8)
    with torch.no_grad():
        torch.testing.assert_close(first(x), torch.relu(first.bn1(x)))  # shortcut saw BN+ReLU
        torch.testing.assert_close(second(x), x)                        # plain identity


def test_load_partial_state_dict_skips_the_mismatched_head():
    src = models.build_model("resnet20", 10)
    with tmpdir() as d:
        path = os.path.join(d, "w.pth")
        torch.save({"model": src.state_dict()}, path)
        dst = models.build_model("resnet20", 3, weights=path)
    torch.testing.assert_close(dst.stem[0].weight, src.stem[0].weight)
    assert dst.fc.weight.shape == (3, 64)


# ----------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------
def _train_loader(args, train_set, device=torch.device("cpu")):
    """The run's training loader, as train.build makes it."""
    return utils.train_loader_from_args(args, train_set, device, args.loss in train.HYBRID_LOSSES)


def _write_npz(path, n_train=40, n_test=20, classes=4, side=32, **override):
    rng = np.random.default_rng(0)
    arrays = dict(x_train=rng.integers(0, 256, (n_train, side, side, 3), dtype=np.uint8),
                  y_train=np.arange(n_train) % classes,
                  x_test=rng.integers(0, 256, (n_test, side, side, 3), dtype=np.uint8),
                  y_test=np.arange(n_test) % classes)
    arrays.update(override)
    np.savez(path, **{k: v for k, v in arrays.items() if v is not None})
    return path


def _jpeg(path, side=40, mode="L", value=128):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new(mode, (side, side), value if mode == "L" else (value, value // 2, 0)).save(path)


def test_npz_dataset_and_malformed_file():
    with tmpdir() as d:
        path = _write_npz(os.path.join(d, "t.npz"))
        train_set, test_set, k = data.build_datasets("npz", path)
        assert (len(train_set), len(test_set), k) == (40, 20, 4)
        image, label = train_set[5]
        assert image.shape == (3, 32, 32) and label == 1 and image.dtype == torch.float32
        bad = _write_npz(os.path.join(d, "bad.npz"), y_test=None)
        assert_data_error(lambda: data.build_datasets("npz", bad), "y_test")
        assert_data_error(lambda: data.build_datasets("npz", os.path.join(d, "none.npz")), "--data-path")
        # an array numpy reads only with pickle: one line, not a traceback
        pickled = os.path.join(d, "pickled.npz")
        np.savez(pickled, **dict(np.load(path)), classes=np.array(["a", 1, None, 2.0], dtype=object))
        assert_data_error(lambda: data.build_datasets("npz", pickled), "cannot read")
        # images stored at another size: train and test both resized to --image-size, whichever loader reads
        # them (16 px: a 32-px crop of the padded 24 px would fail); at their own size, the tensor loader
        for side, image_size, tensor_path in ((16, 32, False), (40, 32, False), (40, 40, True)):
            stored = _write_npz(os.path.join(d, f"side{side}.npz"), side=side)
            train_set, test_set, _ = data.build_datasets("npz", stored, image_size=image_size)
            assert train_set[0][0].shape == test_set[0][0].shape == (3, image_size, image_size)
            assert data.can_use_tensor_loader(train_set) == data.can_use_tensor_loader(test_set) == tensor_path
        flags = ["--dataset", "npz", "--data-path", os.path.join(d, "side16.npz"), "--recipe", "none",
                 "--batch-size", "4", "--workers", "0"]
        args = train.parse_args(flags + ["--loss", "hybrid-sc"])  # the hybrid's two DataLoader streams too
        train_set = utils.build_datasets_from_args(args)[0]
        (views, _), (ce_batch, _) = next(iter(_train_loader(args, train_set)[0]))
        assert views.shape == (4, 2, 3, 32, 32) and ce_batch.shape == (4, 3, 32, 32)
        args = train.parse_args(flags + ["--loader", "tensor"])
        assert_data_error(lambda: data.use_tensor_loader(train_set, args.loader), "pass --image-size 16 (its stored size)")
        mixed = _write_npz(os.path.join(d, "mixed.npz"), x_test=np.zeros((20, 40, 40, 3), np.uint8))
        assert_data_error(lambda: data.build_datasets("npz", mixed), "store both at one size")


def test_seed001_pixel_scaling_and_cifar_std():
    _, test = data.cifar_transforms("seed001")
    img = Image.fromarray(np.array([[[0, 255, 51]]], dtype=np.uint8))
    torch.testing.assert_close(test(img).flatten(), torch.tensor([0 * 2 / 255 - 1, 255 * 2 / 255 - 1, 51 * 2 / 255 - 1]))
    assert data.CIFAR_STD == (0.2470, 0.2435, 0.2616)


def test_lfw_top_k_ties_split_and_grayscale():
    with tmpdir() as d:
        counts = {"Zed_A": 10, "Amy_B": 10, "Bob_C": 5, "Cat_D": 5, "Dan_E": 3}
        for name, n in counts.items():
            for i in range(1, n + 1):
                _jpeg(os.path.join(d, name, f"{name}_{i:04d}.jpg"))
        train_set, test_set, k = data.build_datasets("lfw", d, image_size=32, lfw_top_k=3)
        # 10, 10 then the tie at 5 goes to the alphabetically first name (Bob_C).
        assert k == 3 and train_set.classes == ["Amy_B", "Bob_C", "Zed_A"]
        assert sorted(train_set.targets) == [0] * 8 + [1] * 4 + [2] * 8
        assert sorted(test_set.targets) == [0] * 2 + [1] * 1 + [2] * 2
        train_paths = {p for p, _ in train_set.samples}
        assert not train_paths & {p for p, _ in test_set.samples}
        again, _, _ = data.build_datasets("lfw", d, image_size=32, lfw_top_k=3)
        assert {p for p, _ in again.samples} == train_paths  # seeded
        other, _, _ = data.build_datasets("lfw", d, image_size=32, lfw_top_k=3, split_seed=1)
        assert {p for p, _ in other.samples} != train_paths
        assert test_set[0][0].shape == (3, 32, 32)
        test_set.transform = None
        pixels = np.asarray(test_set[0][0])
        assert pixels.shape == (40, 40, 3) and (pixels == pixels[..., :1]).all()  # gray -> 3 equal channels
        assert_data_error(lambda: data.build_datasets("lfw", os.path.join(d, "Dan_E")), "--data-path")


def _write_cub(root, classes=3, per_class=5):
    lines, labels, split = [], [], []
    for c in range(classes):
        for i in range(per_class):
            image_id = c * per_class + i + 1
            rel = f"{c + 1:03d}.Bird_{c}/Bird_{c}_{i}.jpg"
            _jpeg(os.path.join(root, "images", rel), mode="RGB", value=20 * c)
            lines.append(f"{image_id} {rel}")
            labels.append(f"{image_id} {c + 1}")
            split.append(f"{image_id} {int(i < 3)}")
    for name, rows in (("images.txt", lines), ("image_class_labels.txt", labels),
                       ("train_test_split.txt", split),
                       ("classes.txt", [f"{c + 1} {c + 1:03d}.Bird_{c}" for c in range(classes)])):
        with open(os.path.join(root, name), "w") as f:
            f.write("\n".join(rows) + "\n")


def test_cub_official_split_and_first_n_classes():
    with tmpdir() as d:
        _write_cub(d)
        train_set, test_set, k = data.build_datasets("cub", d, image_size=32)
        assert (k, len(train_set), len(test_set)) == (3, 9, 6)
        assert train_set.classes[1] == "002.Bird_1"
        assert train_set[0][0].shape == (3, 32, 32)
        sub_train, sub_test, k = data.build_datasets("cub", d, image_size=32, cub_classes=2)
        assert k == 2 and sorted(sub_train.targets) == [0] * 4 + [1] * 4 and len(sub_test) == 2
        assert_data_error(lambda: data.build_datasets("cub", d, image_size=32, cub_classes=4), "has 3 classes")
        os.remove(os.path.join(d, "train_test_split.txt"))
        assert_data_error(lambda: data.build_datasets("cub", d), "train_test_split.txt")
    with tmpdir() as d:
        _write_cub(d)
        with open(os.path.join(d, "image_class_labels.txt"), "a") as f:
            f.write("999\n")
        assert_data_error(lambda: data.build_datasets("cub", d), "malformed")


def test_imagefolder_dataset():
    with tmpdir() as d:
        for split in ("train", "val"):
            for cls in ("cat", "dog"):
                _jpeg(os.path.join(d, split, cls, "a.jpg"), mode="RGB")
        train_set, test_set, k = data.build_datasets("imagefolder", d, image_size=32)
        assert k == 2 and len(train_set) == 2 and test_set[1][1] == 1
        shutil.rmtree(os.path.join(d, "val"))
        assert_data_error(lambda: data.build_datasets("imagefolder", d), "val")


def test_missing_cifar_says_download():
    with tmpdir() as d:
        assert_data_error(lambda: data.build_datasets("cifar10", d), "--download")


def test_cifar_without_data_path_is_fetched_on_first_use_and_no_network_is_one_line():
    """No --data-path: CIFAR is fetched into ./data on first use (said first, with the
    size); without a network, one line that says how to point at a local copy. A path the
    user gave, or a file dataset, is never downloaded into. The download is replaced by one
    that fails as urllib does offline, so the test never touches the network."""
    import urllib.error
    calls = []

    def offline(self):
        calls.append(self.root)
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")
    real = torchvision.datasets.CIFAR10.download
    torchvision.datasets.CIFAR10.download = offline
    try:
        with tmpdir() as d, contextlib.redirect_stdout(io.StringIO()) as out:
            cwd = os.getcwd()
            os.chdir(d)
            try:
                message = assert_data_error(lambda: data.build_datasets("cifar10"), "--data-path DIR")
                assert calls == ["./data"] and "no network?" in message and "\n" not in message, message
                assert "cifar-10-batches-py" in message and "cifar-10-python.tar.gz" in message
                assert out.getvalue().startswith(f"cifar10 not found in {os.path.join(os.getcwd(), 'data')}: "
                                                 f"downloading it there (cifar-10-python.tar.gz, 170 MB) once")
                assert_data_error(lambda: data.build_datasets("cifar10", "given"), "pass --download")
                assert_data_error(lambda: data.build_datasets("npz", "x.npz"), "--data-path")
                assert calls == ["./data"]  # the given folder and the file dataset fetched nothing
            finally:
                os.chdir(cwd)
    finally:
        torchvision.datasets.CIFAR10.download = real


def test_shared_real_data_if_present():
    npz = os.path.join(SHARED_DATA, "cifar10_subset.npz")
    if not os.path.exists(npz):
        print("  skipped: ../shared/data not found")
        return
    train_set, test_set, k = data.build_datasets("npz", npz)
    assert (len(train_set), len(test_set), k) == (10000, 10000, 10)
    lfw_train, lfw_test, k = data.build_datasets("lfw", os.path.join(SHARED_DATA, "lfw_top20"))
    assert k == 20 and len(lfw_train) + len(lfw_test) == 1906
    assert lfw_train.classes[0] == "Alejandro_Toledo"


# ----------------------------------------------------------------------------------
# Training pieces
# ----------------------------------------------------------------------------------
def test_recipe_defaults_and_explicit_override():
    args = train.parse_args(["--recipe", "seed001-cifar10", "--lr", "0.2"])
    assert args.lr == 0.2 and args.iters == 80000 and args.block == "preact"
    assert args.milestones == [32000, 48000, 64000] and args.normalize == "seed001"
    # no --recipe: the recipe whose setup matches applies (the bare command is seed 001's ResNet-32 run)
    assert train.parse_args([]).recipe == "seed001-cifar10" and train.parse_args([]).iters == 80000
    # Wu's recipe is the balanced set's; CE on CIFAR-10-LT gets LDAM-DRW's, whose beta 100 the typed 50 overrides
    lt = train.parse_args(["--imbalance-ratio", "50"])
    assert (lt.recipe, lt.recipe_matched, lt.batch_size, lt.wd, lt.warmup_epochs, lt.iters, lt.imbalance_ratio) == \
        ("ldam-ce-cifar10lt", True, 128, 2e-4, 5, 0, 50.0)
    bare = train.parse_args(["--recipe", "none"])
    assert (bare.recipe, bare.lr, bare.iters, bare.block, bare.epochs) == ("none", 0.1, 0, "post", 200)
    lfw = ["--loss", "joint", "--model", "resnet34", "--dataset", "lfw", "--data-path", "x"]
    args = train.parse_args(lfw)                            # the paper's LFW protocol, as a user types it
    assert (args.recipe, args.recipe_matched, args.lr, args.batch_size, args.epochs, args.image_size) == \
        ("lfw-joint", True, 0.01, 64, 300, 224)
    ce = train.parse_args(lfw[2:] + ["--loss", "ce", "--lr", "0.02"])   # the setup stays yours, flags win
    assert (ce.recipe, ce.loss, ce.lr, ce.batch_size) == ("lfw-joint", "ce", 0.02, 64)
    assert train.parse_args(lfw + ["--recipe", "none"]).lr == 0.1
    # the paper's training hyper-parameters whatever the backbone; model and data agree on 224 px
    other = train.parse_args(lfw[:2] + ["--model", "resnet18"] + lfw[4:])
    assert (other.recipe, other.model, other.lr, other.image_size) == ("lfw-joint", "resnet18", 0.01, 224)
    center = train.parse_args(["--loss", "center"] + lfw[2:])  # the recipe's lambda is the joint loss's
    assert (center.recipe, center.lr, center.lam) == ("lfw-joint", 0.01, 0.003)
    named = train.parse_args(["--recipe", "lfw-joint", "--loss", "center", "--data-path", "x"])
    assert (named.lr, named.lam) == (0.01, 0.003) and train.parse_args(["--recipe", "lfw-joint"]).lam == 1.0
    # the center term's reduction: Tong's Eq. 7 sums (joint); Wen's lambda 0.003 weighs like-reduced terms (center)
    assert (center.ctc_reduction, named.ctc_reduction, args.ctc_reduction) == ("mean", "mean", "sum")
    assert train.parse_args(["--loss", "center", "--ctc-reduction", "sum"]).ctc_reduction == "sum"
    args.output_dir = "runs/x"
    line = train.config_line(args)
    assert line.startswith("config: recipe lfw-joint (matched") and "--lr 0.01" in line and "\n" not in line


def test_model_and_data_agree_on_the_image_size_for_every_dataset():
    """The input size is resolved once (32 px for CIFAR / npz, 224 otherwise): the model's
    stem and the data's transforms both follow it (a CIFAR stem on 224 px LFW images was
    the old default)."""
    for name in data.DATASETS:
        args = train.parse_args(["--dataset", name, "--recipe", "none", "--model", "resnet18", "--data-path", "x"])
        want = 32 if name in ("cifar10", "cifar100", "npz") else 224
        model = train.build_model_from_args(args, 3, load_weights=False)
        assert args.image_size == want and model.small_input == (want == 32), name
    with tmpdir() as d:  # a real LFW folder: its images come out at the size the model was built for
        for person in ("Amy_B", "Bob_C"):
            for i in range(1, 6):
                _jpeg(os.path.join(d, person, f"{person}_{i:04d}.jpg"))
        args = train.parse_args(["--dataset", "lfw", "--loss", "joint", "--model", "resnet18", "--data-path", d,
                                 "--lfw-top-k", "2"])
        train_set, test_set, _ = utils.build_datasets_from_args(args)
        assert args.recipe == "lfw-joint" and args.lr == 0.01  # the LFW recipe, whatever the backbone
        assert train_set[0][0].shape[-1] == test_set[0][0].shape[-1] == args.image_size == 224


def test_seed001_schedule_and_constant_center_lr():
    args = train.parse_args(["--recipe", "seed001-cifar10", "--loss", "joint"])
    model = torch.nn.Linear(2, 2)
    criterion = train.build_criterion(args, 2, 2)
    optimizer = train.build_optimizer(args, model, criterion)
    assert optimizer.param_groups[1]["weight_decay"] == 0.0 and optimizer.param_groups[1]["momentum"] == 0.0
    assert optimizer.param_groups[0]["momentum"] == 0.9 and args.lam == 1.0
    assert train.parse_args(["--loss", "center"]).lam == 0.003
    scheduler = train.build_scheduler(args, optimizer, iters_per_epoch=391)
    want = {0: 0.01, 499: 0.01, 500: 0.1, 31999: 0.1, 32000: 0.01, 48000: 0.001, 64000: 0.0001, 79999: 0.0001}
    seen = {}
    for it in range(80000):
        if it in want:
            seen[it] = (optimizer.param_groups[0]["lr"], optimizer.param_groups[1]["lr"])
        optimizer.step()
        scheduler.step()
    for it, lr in want.items():
        assert math.isclose(seen[it][0], lr, rel_tol=1e-9), (it, seen[it])
        assert seen[it][1] == 0.5


def _network_lrs(args, iters_per_epoch, iterations):
    """The network's lr at each of the first ``iterations`` steps of train.py's schedule."""
    optimizer = train.build_optimizer(args, torch.nn.Linear(1, 1), None)
    scheduler = train.build_scheduler(args, optimizer, iters_per_epoch=iters_per_epoch)
    lrs = []
    for _ in range(iterations):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    return lrs


def test_epoch_milestones_scale_by_iterations_per_epoch():
    lrs = _network_lrs(train.parse_args(["--recipe", "none", "--milestones", "2", "3", "--lr", "1.0"]), 10, 35)
    assert lrs[19] == 1.0 and math.isclose(lrs[20], 0.1) and math.isclose(lrs[30], 0.01)


def test_a_recipe_flag_in_a_group_the_run_turned_off_goes_back_to_its_default():
    """--warmup-iters switches the epoch warm-up off: the recipe's --warmup-epochs 5 must not
    run as well (it did: lr 0.001 for 20 iterations, then LDAM's ramp)."""
    args = train.parse_args(["--recipe", "ldam-ce-cifar10lt", "--warmup-iters", "20", "--warmup-lr", "0.001"])
    assert (args.warmup_epochs, args.warmup_iters) == (0, 20)
    lrs = _network_lrs(args, 10, 25)
    assert lrs[:20] == [0.001] * 20 and lrs[20:] == [0.1] * 5
    assert train.parse_args(["--recipe", "ldam-ce-cifar10lt"]).warmup_epochs == 5   # untouched otherwise
    psc = train.parse_args(["--recipe", "hybrid-psc-cifar10lt", "--loss", "ce"])    # the hybrid group is off
    assert psc.tau == 0.1 and train.parse_args(["--recipe", "hybrid-psc-cifar10lt"]).tau == 1.0


def test_the_run_line_names_milestones_after_the_end():
    sets = ([0] * 100, None, [0] * 10)
    line = lambda milestones, unit: utils.run_summary("m", 1e6, sets, 10, (10, 1000, 100), "cpu", 1, "tensor",
                                                      milestones, unit)
    assert "never applied" not in line([50, 99], "epoch") and "never applied" not in line([999], "iter")
    assert "lr milestones [500, 750] (epochs) come after the end" in line([50, 500, 750], "epoch")
    assert "[1000] (iters)" in line([1000], "iter")


def test_help_shows_defaults_but_not_none():
    text, other = (" ".join(m.get_args_parser().format_help().split()) for m in (train, evaluate))  # unwrapped
    assert "SGD lr of the class centers (default: 0.5)" in text and "(default: None)" not in text + other


def test_ldam_ce_recipe_matches_its_public_code():
    """--recipe ldam-ce-cifar10lt against LDAM-DRW's cifar_train.py as written there:
    adjust_learning_rate (epoch + 1 <= 5: lr * (epoch + 1) / 5; > 180: lr * 1e-4; > 160:
    lr * 0.01), SGD(0.1, momentum 0.9, weight_decay 2e-4), batch 128, 200 epochs, beta 100."""
    args = train.parse_args(["--recipe", "ldam-ce-cifar10lt"])
    assert (args.model, args.loss, args.batch_size, args.epochs, args.imbalance_ratio, args.sampler) == \
        ("resnet32", "ce", 128, 200, 100.0, "instance")
    assert data.NORMALIZATIONS[args.normalize] == ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010))
    optimizer = train.build_optimizer(args, torch.nn.Linear(1, 1), None)
    assert (optimizer.param_groups[0]["momentum"], optimizer.param_groups[0]["weight_decay"]) == (0.9, 2e-4)

    def ldam_lr(epoch):  # their function, epoch counted from 0
        epoch = epoch + 1
        if epoch <= 5:
            return 0.1 * epoch / 5
        return 0.1 * 0.0001 if epoch > 180 else 0.1 * 0.01 if epoch > 160 else 0.1
    iters = 7  # any number of iterations per epoch: the lr changes only at epoch boundaries
    scheduler = train.build_scheduler(args, optimizer, iters_per_epoch=iters)
    for it in range(200 * iters):
        assert math.isclose(optimizer.param_groups[0]["lr"], ldam_lr(it // iters), rel_tol=1e-9), it
        optimizer.step()
        scheduler.step()


class _FixedLogits(torch.nn.Module):
    """Returns the logits stored for each input (the input's first pixel is its index)."""

    def __init__(self, logits):
        super().__init__()
        self.logits = logits

    def forward(self, x):
        return {"logits": self.logits[x[:, 0, 0, 0].long()]}


def test_evaluate_counts_top1_top5_and_per_class():
    # 4 samples, 6 classes; labels 0, 1, 1, 5
    logits = torch.tensor([[9, 8, 7, 6, 5, 0.],    # label 0: top-1 hit
                           [9, 0, 8, 7, 6, 5],     # label 1: rank 6, miss both
                           [0, 9, 1, 2, 3, 4],     # label 1: top-1 hit
                           [9, 8, 7, 6, 0, 5]])    # label 5: rank 5, top-5 hit only
    images = torch.arange(4.0)[:, None, None, None].expand(4, 3, 2, 2)
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, torch.tensor([0, 1, 1, 5])),
                                         batch_size=3)
    result = train.evaluate(_FixedLogits(logits), loader, torch.device("cpu"), 6)
    assert result["top1"] == 50.0 and result["top5"] == 75.0 and result["n"] == 4
    assert result["per_class"] == [100.0, 50.0, None, None, None, 0.0]  # None: no test image of the class
    assert result["balanced_top1"] == (100 + 50 + 0) / 3  # classes 2-4 absent from the test set


def test_evaluate_top1_breaks_ties_like_the_head_counts():
    # bf16 logits tie often; top1 and the deepest head's count must then agree (first maximal class)
    logits = torch.randn(64, 10).bfloat16().float()
    logits[:, 3] = logits.max(1).values                               # class 3 ties with the max
    images = torch.arange(64.0)[:, None, None, None].expand(64, 3, 2, 2)
    labels = torch.randint(10, (64,), generator=torch.Generator().manual_seed(0))
    labels[:32] = logits[:32].argmax(1)                               # the first maximal class
    labels[32:48] = 3                                                 # tied with it

    class OneHead(_FixedLogits):  # an MKSMT-like output whose deepest head is the logits
        head_stages = [2]

        def forward(self, x):
            out = super().forward(x)
            return {**out, "head_logits": [out["logits"]]}

    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(images, labels), batch_size=16)
    result = train.evaluate(OneHead(logits), loader, torch.device("cpu"), 10)
    rows = logits.tolist()
    first_max = [row.index(max(row)) for row in rows]                  # list.index: the first maximal class
    expected = 100.0 * sum(p == y for p, y in zip(first_max, labels.tolist())) / len(rows)
    assert result["top1"] == result["head_top1_stage2"] == expected


def _run(*argv, cwd=HERE):
    return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True, timeout=240)


def _reject_nan(constant):
    raise ValueError(f"not strict JSON: {constant}")


def _cli(argv):
    """train.py's command line run in this process: (returncode, stdout, stderr) like subprocess.run."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = train.cli(argv)
        except SystemExit as e:
            code = e.code
    return subprocess.CompletedProcess(argv, code, out.getvalue(), err.getvalue())


def test_train_and_evaluate_end_to_end():
    with tmpdir() as d:
        npz = _write_npz(os.path.join(d, "t.npz"), n_train=48, n_test=24)
        out = os.path.join(d, "run")
        common = ["train.py", "--dataset", "npz", "--data-path", npz, "--model", "resnet20",
                  "--loss", "joint", "--batch-size", "16", "--workers", "0", "--epochs", "2",
                  "--milestones", "1", "--print-freq", "1", "--output-dir", out, "--device", "cpu"]
        r = _cli(common[1:])
        assert r.returncode == 0, r.stderr
        assert "img/s" in r.stdout and "eta" in r.stdout
        rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        assert [row["epoch"] for row in rows] == [0, 1] and rows[-1]["iteration"] == 6
        assert {"train_loss", "train_ce", "train_center", "train_top1", "test_top1", "test_top5", "lr",
                "seconds"} <= set(rows[0])
        assert all(0.0 <= row["train_top1"] <= 100.0 for row in rows)
        ckpt = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
        assert {"model", "optimizer", "scheduler", "criterion", "epoch", "iteration", "args"} <= set(ckpt)
        assert ckpt["criterion"]["center_loss.centers"].shape == (4, 64)
        config = json.load(open(os.path.join(out, "config.json")))
        assert config["loss"] == "joint"
        env = config["environment"]  # what the run ran on, for a reader of the folder alone
        assert (env["torch"], env["torchvision"], env["device"], env["processes"]) == \
            (torch.__version__, torchvision.__version__, "cpu", 1), env
        assert env["numpy"] == np.__version__ and env["python"].count(".") == 2 and env["device_name"], env
        r = _run("evaluate.py", "--checkpoint", os.path.join(out, "checkpoint.pth"), "--json",
                 "--workers", "0", "--device", "cpu")
        assert r.returncode == 0, r.stderr
        result = json.loads(r.stdout.strip().splitlines()[-1], parse_constant=_reject_nan)   # strict JSON
        assert abs(result["top1"] - rows[-1]["test_top1"]) < 1e-9 and len(result["per_class"]) == 4
        assert result["many_top1"] is None and result["few_top1"] is not None   # 12 images a class: all "few"
        # resume: a third epoch continues from the saved iteration
        r = _cli(common[1:] + ["--epochs", "3", "--resume", os.path.join(out, "checkpoint.pth")])
        assert r.returncode == 0, r.stderr
        rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        assert [row["epoch"] for row in rows] == [0, 1, 2] and rows[-1]["iteration"] == 9
        # resumed into another folder holding another run's rows: it gets the resumed run's history up to the
        # checkpoint (from the checkpoint's folder), then this segment's rows; the source is left alone
        other = os.path.join(d, "other")
        os.makedirs(other)
        with open(os.path.join(other, "metrics.jsonl"), "w") as f:
            f.write(json.dumps({"epoch": 2, "iteration": 9, "foreign": 1}) + "\n"
                    + json.dumps({"epoch": 3, "iteration": 12, "foreign": 1}) + "\n")
        assert train.main(train.parse_args(common[1:] + ["--epochs", "4", "--resume", os.path.join(out, "checkpoint.pth"),
                                                         "--output-dir", other])) == 0
        source_rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        assert [row["iteration"] for row in source_rows] == [3, 6, 9]
        rows = [json.loads(line) for line in open(os.path.join(other, "metrics.jsonl"))]
        assert rows[:3] == source_rows and [row["iteration"] for row in rows] == [3, 6, 9, 12], rows
        assert not any("foreign" in row for row in rows)
        # a checkpoint kept outside any run folder (a backup, no metrics.jsonl beside it) trims the folder's own rows
        os.makedirs(os.path.join(d, "backup"))
        shutil.copy(os.path.join(out, "checkpoint.pth"), os.path.join(d, "backup", "epoch3.pth"))  # iteration 9
        assert train.main(train.parse_args(common[1:] + ["--epochs", "4", "--resume", os.path.join(d, "backup", "epoch3.pth"),
                                                         "--output-dir", other])) == 0
        assert [json.loads(line)["iteration"] for line in open(os.path.join(other, "metrics.jsonl"))] == [3, 6, 9, 12]
        # another global batch (iterations count global batches): one line, nothing run
        resume = common[1:] + ["--epochs", "4", "--batch-size", "8", "--resume", os.path.join(out, "checkpoint.pth")]
        before = open(os.path.join(out, "metrics.jsonl")).read(), os.path.getmtime(os.path.join(out, "checkpoint.pth"))
        assert_data_error(lambda: train.main(train.parse_args(resume)), "global batch of 1 process(es) x 16")
        assert before == (open(os.path.join(out, "metrics.jsonl")).read(),
                          os.path.getmtime(os.path.join(out, "checkpoint.pth")))  # nothing written
        # a checkpoint of older code records no process count: it resumes, with a note saying so
        old = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
        del old["world_size"]
        torch.save(old, os.path.join(d, "old.pth"))
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert train.main(train.parse_args(common[1:] + ["--epochs", "4", "--resume", os.path.join(d, "old.pth"),
                                                             "--output-dir", os.path.join(d, "old")])) == 0
        assert "does not record its number of processes" in printed.getvalue()


def test_val_split_is_stratified_disjoint_unaugmented_and_logged():
    with tmpdir() as d:
        npz = _write_npz(os.path.join(d, "t.npz"), n_train=60, n_test=8, classes=3)
        train_set, test_set, _ = data.build_datasets("npz", npz)
        kept, val = data.validation_split(train_set, 0.2, 0, test_set.transform)
        assert sorted(kept.indices + val.indices) == list(range(60)) and not set(kept.indices) & set(val.indices)
        assert np.bincount(val.targets).tolist() == [4, 4, 4]                  # 20% of each class's 20
        assert torch.equal(val[0][0], test_set.transform(Image.fromarray(train_set.images[val.indices[0]])))
        again = data.validation_split(train_set, 0.2, 0, test_set.transform)[1].indices
        other = data.validation_split(train_set, 0.2, 1, test_set.transform)[1].indices
        assert again == val.indices and other != val.indices                   # --split-seed decides it
        lt, _, _ = data.build_datasets("npz", npz, imbalance_ratio=4.0)      # split after the long-tailed cut
        lt_kept, lt_val = data.validation_split(lt, 0.5, 0, test_set.transform)
        assert set(lt_kept.indices) | set(lt_val.indices) == set(range(len(lt)))
        assert np.bincount(lt_val.targets).tolist() == [10, 5, 3]     # half of 20 / 10 / 5 (round(2.5) = 2 kept)
        for bad in (0.0, 1.0, 1.5):
            assert_data_error(lambda: data.validation_split(train_set, bad, 0, None), "--val-split")
        out = os.path.join(d, "run")
        assert train.main(train.parse_args(["--dataset", "npz", "--data-path", npz, "--model", "resnet20",
                                            "--batch-size", "8", "--workers", "0", "--iters", "2", "--device", "cpu",
                                            "--val-split", "0.2", "--output-dir", out])) == 0
        text = open(os.path.join(out, "metrics.jsonl")).read()
        row = json.loads(text)
        assert {"val_top1", "val_balanced_top1", "val_loss", "test_top1"} <= set(row)
        assert row["test_many_top1"] is None and "NaN" not in text        # strict JSON: no class is many-shot


def test_tensor_evaluation_equals_the_dataloader_path():
    """evaluate() from one uint8 device tensor gives exactly the DataLoader + PIL
    transform's numbers: plain, flipped, on a long-tailed validation subset, and
    for an MKSMT model's every head."""
    with tmpdir() as d:
        npz = _write_npz(os.path.join(d, "t.npz"), n_train=40, n_test=21, classes=3)
        train_set, test_set, _ = data.build_datasets("npz", npz, imbalance_ratio=2.0)
        _, val_set = data.validation_split(train_set, 0.5, 0, test_set.transform)
        torch.manual_seed(0)
        for model in (models.build_model("resnet20", 3), models.build_model("resnet20", 3, heads=[1, 2], head_width=8)):
            for dataset in (test_set, val_set):
                tensor = data.make_test_loader(dataset, 8, 0, torch.device("cpu"), normalize="cifar")
                loader = data.make_test_loader(dataset, 8, 0, torch.device("cpu"))
                assert isinstance(tensor, data.TensorEvalLoader) and isinstance(loader, torch.utils.data.DataLoader)
                for flip in (None, "v"):
                    a = train.evaluate(model, tensor, torch.device("cpu"), 3, [20, 15, 10], 14, 11, flip=flip)
                    b = train.evaluate(model, loader, torch.device("cpu"), 3, [20, 15, 10], 14, 11, flip=flip)
                    assert a == b and a["n"] == len(dataset), (a, b)
        shard = data.TensorEvalLoader(test_set, 4, "cpu", *data.NORMALIZATIONS["cifar"], rank=1, world_size=2)
        assert torch.equal(torch.cat([y for _, y in shard]), torch.tensor(test_set.targets[1::2]))


_HOST_READS = ("item", "tolist", "__bool__", "__float__", "__int__", "__index__")


@contextlib.contextmanager
def count_host_reads():
    """Count calls of the Tensor methods that copy a value to the host (on a GPU,
    each one waits for every queued kernel: a device sync)."""
    counter = {"n": 0}
    originals = {name: getattr(torch.Tensor, name) for name in _HOST_READS}

    def counted(original):
        def wrapper(self, *a, **k):
            counter["n"] += 1
            return original(self, *a, **k)
        return wrapper

    for name, original in originals.items():
        setattr(torch.Tensor, name, counted(original))
    try:
        yield counter
    finally:
        for name, original in originals.items():
            setattr(torch.Tensor, name, original)


def test_training_steps_never_read_the_device():
    """Host reads inside train_one_epoch: one per --print-freq window plus one at
    the epoch end, whatever the number of iterations, for CE, joint (centers),
    deep supervision, hybrid SC / PSC (two loader streams) and MKSMT (two steps)."""
    with tmpdir() as d:
        npz = _write_npz(os.path.join(d, "t.npz"), n_train=64, n_test=4)     # 8 iterations of 8
        original = train.train_one_epoch
        counts = {}

        def counting(*a, **k):
            with count_host_reads() as counter:
                result = original(*a, **k)
            counts[key] = counter["n"]
            return result

        train.train_one_epoch = counting
        ce_reads = None
        try:
            for extra in ([], ["--loss", "joint"], ["--model", "plain20", "--deep-sup", "0"], ["--loss", "hybrid-sc"],
                          ["--loss", "hybrid-psc"], ["--loss", "mksmt", "--head-width", "8"]):
                for iters, print_freq in ((4, 4), (8, 2)):
                    key = (iters, print_freq)
                    assert train.main(train.parse_args([
                        "--dataset", "npz", "--data-path", npz, "--model", "resnet20", "--batch-size", "8",
                        "--iters", str(iters), "--print-freq", str(print_freq), "--device", "cpu",
                        "--output-dir", os.path.join(d, "r"), *extra])) == 0
                # 1 window vs 4 windows (the epoch end reads with the last one): 3 more reads for 4 more
                # steps, so none per step (the sampler's host-side shuffle adds the same once an epoch to both)
                assert counts[(8, 2)] - counts[(4, 4)] == 3, (extra, counts)
                assert counts[(4, 4)] <= 2 + 2, (extra, counts)
                ce_reads = counts[(8, 2)] if not extra else ce_reads
            key = "checkpoints on the progress lines"  # --save-every reads the meter, but once per iteration
            assert train.main(train.parse_args([
                "--dataset", "npz", "--data-path", npz, "--model", "resnet20", "--batch-size", "8", "--iters", "8",
                "--print-freq", "2", "--save-every", "2", "--device", "cpu", "--output-dir", os.path.join(d, "r")])) == 0
            assert counts[key] == ce_reads, (counts, ce_reads)
        finally:
            train.train_one_epoch = original


def test_same_seed_same_run():
    with tmpdir() as d:
        npz = _write_npz(os.path.join(d, "t.npz"), n_train=32, n_test=8)
        args = ["--dataset", "npz", "--data-path", npz, "--model", "resnet20", "--batch-size", "8",
                "--workers", "0", "--iters", "3", "--device", "cpu", "--seed", "3"]
        finals = []
        for run in ("a", "b"):
            train.main(train.parse_args(args + ["--output-dir", os.path.join(d, run)]))
            finals.append(torch.load(os.path.join(d, run, "checkpoint.pth"), weights_only=True)["model"])
        for key in finals[0]:
            assert torch.equal(finals[0][key], finals[1][key]), key


def test_missing_data_is_one_line_and_exit_code_2():
    r = _run("train.py", "--dataset", "npz", "--data-path", "/nonexistent/x.npz")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and "--data-path" in r.stderr
    with tmpdir() as d:
        r = _run("train.py", "--data-path", d, "--workers", "0")
        assert r.returncode == 2 and "--download" in r.stderr and "Traceback" not in r.stderr


# ----------------------------------------------------------------------------------
# Deep supervision (seed 004)
# ----------------------------------------------------------------------------------
def test_aux_weight_schedules():
    w = losses.deep_supervision_weight
    assert [w(0.3, t, 10) for t in (0, 5, 9)] == [0.3, 0.3 * 0.5, 0.3 * (1 - 9 / 10)]
    assert w(0.3, 7, 10, "none") == 0.3
    assert [w(0.3, t, 10, "step") for t in (4, 5)] == [0.3, 0.0]
    assert [w(0.3, t, 10, "step", stop_epoch=2) for t in (1, 2)] == [0.3, 0.0]


def test_deep_supervision_loss_is_main_plus_alpha_times_aux_ce():
    g = torch.Generator().manual_seed(8)
    aux = [torch.randn(3, 4, dtype=torch.float64, generator=g) for _ in range(2)]
    y = [1, 3, 0]
    total, parts = losses.deep_supervision_loss(torch.tensor(2.0, dtype=torch.float64), aux, torch.tensor(y), 0.25)
    ce = sum(sum(-a[i, y[i]].item() + math.log(sum(math.exp(v) for v in a[i].tolist())) for i in range(3)) / 3
             for a in aux)
    assert abs(total.item() - (2.0 + 0.25 * ce)) < 1e-12 and abs(parts["aux"].item() - ce) < 1e-12


def test_top1_counts_the_final_head_on_the_ce_batch_only():
    logits = torch.tensor([[2.0, 1.0], [0.0, 3.0], [5.0, 0.0]])   # argmax 0, 1, 0
    assert abs(train.top1(logits, torch.tensor([0, 0, 0])).item() - 200 / 3) < 1e-4

    class Fixed(nn.Module):  # rows 0-1 of the logits for the two views, row 2 for one CE image
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x):
            rows = logits[:2] if len(x) == 2 else logits[2:]
            return {"logits": rows + self.w, "projection": F.normalize(torch.ones(len(x), 4), dim=1) + self.w}

    model, criterion = Fixed(), losses.HybridLoss(losses.SupConLoss(0.1))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.0)
    # hybrid: one contrastive image (two views), then a CE batch of one image
    for ce_label, want in ((0, 100.0), (1, 0.0)):
        batch = ((torch.zeros(1, 2, 3, 8, 8), torch.tensor([1])), (torch.zeros(1, 3, 8, 8), torch.tensor([ce_label])))
        _, parts, _ = train.hybrid_step(batch, model, criterion, optimizer, place=lambda x: x,
                                        amp=contextlib.nullcontext, alpha=0.5)
        assert parts["top1"].item() == want


def test_aux_heads_do_not_change_the_logits():
    torch.manual_seed(0)
    plain = models.build_model("plain20", 10).eval()
    supervised = models.build_model("plain20", 10, deep_sup=[0, 1]).eval()
    supervised.backbone.load_state_dict(plain.state_dict())
    x = torch.randn(3, 3, 32, 32)
    out = supervised(x)
    assert torch.equal(out["logits"], plain(x)["logits"]) and [a.shape for a in out["aux_logits"]] == [(3, 10)] * 2
    head = supervised.aux_heads[0]
    assert isinstance(head.conv[1], torch.nn.BatchNorm2d) and sum(isinstance(m, torch.nn.Dropout) for m in head.modules()) == 2


def test_aux_loss_reaches_the_early_layers():
    torch.manual_seed(0)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    for deep_sup, reaches in (([0], True), ([], False)):
        model = models.build_model("plain20", 10, deep_sup=deep_sup)
        out = model(x)
        main = torch.nn.functional.cross_entropy(out["logits"].detach(), y)  # main path cut off
        loss, _ = train.add_deep_supervision(main, {}, out, y, aux_weight=1.0)
        if loss.requires_grad:
            loss.backward()
        grad = (model.backbone if deep_sup else model).stem[0].weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == reaches
        if reaches:
            assert loss.item() != main.item()  # the aux CE term was added
        else:
            assert loss.item() == main.item()


def test_deep_sup_stage_checks_and_parameter_stages():
    for bad in ([2], [0, 0], [-1]):
        try:
            models.build_model("resnet20", 10, deep_sup=bad)
            raise AssertionError(f"{bad} accepted")
        except ValueError as e:
            assert "--deep-sup" in str(e)
    stages = models.parameter_stages(models.build_model("resnet20", 10))
    assert stages["stem.0.weight"] == 0 and stages["groups.1.0.conv1.weight"] == 1 and stages["fc.weight"] == 2
    swin = models.parameter_stages(models.build_model("swin_t", 10))
    assert swin["net.features.2.reduction.weight"] == 1 and swin["net.head.weight"] == 3


def test_plain_network_has_no_bn_and_no_shortcuts():
    model = models.build_model("plain20", 10)
    convs = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) + 1 == 20 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with torch.no_grad():  # zeroing one middle conv zeroes everything after it: no shortcut around it
        model.groups[1][2].weight.zero_()
        model.groups[1][2].bias.zero_()
        out = model(torch.randn(2, 3, 32, 32))
    assert torch.count_nonzero(out["stages"][2]) == 0


def test_gradient_probe_csv_and_deep_sup_training():
    import csv
    with tmpdir() as d:
        npz = _write_npz(os.path.join(d, "t.npz"), n_train=16, n_test=8)
        common = ["--dataset", "npz", "--data-path", npz, "--model", "plain20", "--batch-size", "8",
                  "--workers", "0", "--device", "cpu"]
        train.main(train.parse_args(common + ["--probe-gradients", "3", "--output-dir", os.path.join(d, "p")]))
        rows = list(csv.DictReader(open(os.path.join(d, "p", "gradient_probe.csv"))))
        layers = {r["layer"] for r in rows}
        assert len(layers) == 20 and len(rows) == 3 * 20
        assert sorted({int(r["iteration"]) for r in rows}) == [0, 1, 2] and rows[0]["layer"] == "stem.0"
        out = os.path.join(d, "ds")
        train.main(train.parse_args(common + ["--deep-sup", "0,1", "--loss", "joint", "--epochs", "2",
                                              "--output-dir", out]))
        last = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))][-1]
        assert {"train_aux", "test_aux_top1_stage0", "test_aux_top1_stage1"} <= set(last)
        assert last["aux_weight"] == 0.3 * (1 - 1 / 2) and last["alpha"] is None  # alpha: hybrid runs only
        plain = os.path.join(d, "plain")  # no auxiliary head: the column is null, not the unused schedule's value
        train.main(train.parse_args(common + ["--epochs", "1", "--output-dir", plain]))
        assert json.loads(open(os.path.join(plain, "metrics.jsonl")).readline())["aux_weight"] is None
        r = _run("evaluate.py", "--checkpoint", os.path.join(out, "checkpoint.pth"), "--json", "--workers", "0")
        result = json.loads(r.stdout.strip().splitlines()[-1])
        assert result["aux_top1_stage1"] == last["test_aux_top1_stage1"], r.stderr


# ----------------------------------------------------------------------------------
# Reliability: exact resume, signals, non-finite losses, one-line errors
# ----------------------------------------------------------------------------------
def test_sampler_resumes_mid_epoch_and_augmentation_ignores_workers():
    sampler = data.ResumableSampler(10, seed=4)
    sampler.set_epoch(3)
    full = list(sampler)
    sampler.set_epoch(3, start=6)
    assert list(sampler) == full[6:] and len(sampler) == 4
    sampler.set_epoch(4)
    assert [i for i, _ in sampler] != [i for i, _ in full] and sorted(i for i, _ in full) == list(range(10))
    with tmpdir() as d:
        train_set, _, _ = data.build_datasets("npz", _write_npz(os.path.join(d, "t.npz"), n_train=16))
        batches = []
        for workers in (0, 2):
            sampler = data.ResumableSampler(16, seed=1)
            loader = torch.utils.data.DataLoader(data.PerSampleSeed(train_set), batch_size=8,
                                                 sampler=sampler, num_workers=workers)
            batches.append(next(iter(loader))[0])
        assert torch.equal(batches[0], batches[1])
        state = torch.get_rng_state()
        seeded, cuda_seeds = data.PerSampleSeed(train_set)[(0, 123)][0], []
        assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is untouched
        with torch.random.fork_rng(devices=[]):  # the same CPU stream as torch.manual_seed(123) ...
            torch.manual_seed(123)
            assert torch.equal(seeded, train_set[0][0])
        cuda_reseed, torch.cuda.manual_seed_all = torch.cuda.manual_seed_all, cuda_seeds.append
        try:  # ... without torch.manual_seed's reseeding of every GPU (dropout's stream there)
            data.PerSampleSeed(train_set)[(0, 123)]
        finally:
            torch.cuda.manual_seed_all = cuda_reseed
        assert cuda_seeds == [], cuda_seeds


def _train_cmd(npz, out, *extra):
    return [sys.executable, "train.py", "--dataset", "npz", "--data-path", npz, "--model", "resnet20",
            "--loss", "joint", "--batch-size", "4", "--workers", "0", "--epochs", "2",
            "--milestones", "1", "--print-freq", "1", "--device", "cpu", "--output-dir", out, *extra]


def _kill_when(cmd, needle, sig):
    """Start cmd, send ``sig`` once a stdout line contains ``needle``; returns (rc, stdout, stderr)."""
    proc = subprocess.Popen(cmd, cwd=HERE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if needle in line:
            proc.send_signal(sig)
            break
    out, err = proc.communicate(timeout=120)
    return proc.returncode, "".join(lines) + out, err


def _rows_without_time(path):
    return [{k: v for k, v in json.loads(line).items() if k != "seconds"} for line in open(path)]


def test_resume_after_sigkill_is_bit_identical():
    import signal
    with tmpdir() as d:
        npz = _write_npz(os.path.join(d, "t.npz"), n_train=48, n_test=8)  # 12 iterations per epoch
        straight, killed = os.path.join(d, "straight"), os.path.join(d, "killed")
        # plain20 with an auxiliary head: its dropout draws from the global RNG, which must be restored
        extra = ("--save-every", "5", "--model", "plain20", "--deep-sup", "0")
        r = subprocess.run(_train_cmd(npz, straight, *extra), cwd=HERE, capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stderr
        rc, _, _ = _kill_when(_train_cmd(npz, killed, *extra), "iter 11/24", signal.SIGKILL)
        assert rc == -signal.SIGKILL
        at = torch.load(os.path.join(killed, "checkpoint.pth"), weights_only=True)["iteration"]
        assert 10 <= at < 24, at
        r = subprocess.run(_train_cmd(npz, killed, *extra, "--resume", "auto"), cwd=HERE,
                           capture_output=True, text=True, timeout=240)
        assert r.returncode == 0 and f"resumed from {os.path.join(killed, 'checkpoint.pth')} at iteration {at}" in r.stdout
        a = torch.load(os.path.join(straight, "checkpoint.pth"), weights_only=True)
        b = torch.load(os.path.join(killed, "checkpoint.pth"), weights_only=True)
        for part in ("model", "criterion"):
            for key in a[part]:
                assert torch.equal(a[part][key], b[part][key]), (part, key)
        # identical rows except the wall-clock "seconds"
        assert _rows_without_time(os.path.join(straight, "metrics.jsonl")) == \
            _rows_without_time(os.path.join(killed, "metrics.jsonl"))


def test_resume_refuses_a_changed_loss_reduction_crop_sampler_or_recipe():
    """--ctc-reduction's default for --loss center became mean, --hybrid-crop and --hybrid-ce-sampler are new, recipe
    matching changed, center and joint share their centers' shape: a run resumed from a checkpoint trained otherwise
    stops with one line instead of switching."""
    with tmpdir() as d:
        npz, out = _write_npz(os.path.join(d, "t.npz"), n_train=16, n_test=8), os.path.join(d, "run")
        r = subprocess.run(_train_cmd(npz, out, "--loss", "center", "--ctc-reduction", "sum", "--epochs", "1"),
                           cwd=HERE, capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stderr
        r = subprocess.run(_train_cmd(npz, out, "--loss", "center", "--resume", "auto"),
                           cwd=HERE, capture_output=True, text=True, timeout=240)
        assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].endswith(
            "was trained with --ctc-reduction sum, this run has mean: pass --ctc-reduction sum to continue it"), r.stderr
        r = subprocess.run(_train_cmd(npz, out, "--loss", "center", "--ctc-reduction", "sum", "--resume", "auto"),
                           cwd=HERE, capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stderr
        ckpt_path = os.path.join(out, "checkpoint.pth")
        ckpt = torch.load(ckpt_path, weights_only=True)
        del ckpt["args"]["hybrid_crop"], ckpt["args"]["hybrid_ce_sampler"]   # as a checkpoint from before the flags
        torch.save(ckpt, ckpt_path)
        args = argparse.Namespace(output_dir=out, resume="auto", ctc_reduction="sum")
        for changed, expected in ((dict(loss="joint"), "--loss center"),
                                  (dict(hybrid_crop="resized"), "--hybrid-crop pad"),   # absent: as before the flags
                                  (dict(hybrid_ce_sampler="instance"), "--hybrid-ce-sampler class-balanced"),
                                  (dict(recipe="seed001-cifar10"), f"--recipe {ckpt['args']['recipe']}")):
            try:
                utils.resume(argparse.Namespace(**vars(args), **changed), None, None, None, None, None)
                raise AssertionError(f"resumed with {changed}")
            except data.DataError as e:
                assert f"trained with {expected}, this run has {next(iter(changed.values()))}" in str(e), e


def test_default_output_dirs_differ_by_model_and_loss():
    """A recipe matched for several losses or backbones (lfw-joint: joint, center, ce) must not put their runs in one
    folder: a fresh run there would delete the other's metrics.jsonl and overwrite its checkpoint."""
    folders = set()
    for argv in (["--dataset", "lfw", "--loss", "joint"], ["--dataset", "lfw", "--loss", "center"],
                 ["--dataset", "lfw", "--loss", "ce"], ["--dataset", "lfw", "--loss", "ce", "--model", "resnet18"],
                 ["--dataset", "lfw", "--loss", "ce", "--seed", "1"], ["--dataset", "lfw", "--loss", "ce", "--recipe", "none"]):
        args = train.parse_args(argv + ["--data-path", "unused"])
        folders.add(utils.default_output_dir(args))
    assert len(folders) == 6, folders
    assert utils.default_output_dir(train.parse_args(["--dataset", "lfw", "--loss", "center", "--data-path", "x"])) \
        == os.path.join("runs", "lfw-joint-resnet34-center-seed0")


def test_sigterm_finishes_the_step_saves_and_says_how_to_resume():
    import signal
    with tmpdir() as d:
        npz = _write_npz(os.path.join(d, "t.npz"), n_train=48, n_test=8)
        out = os.path.join(d, "run")
        rc, stdout, stderr = _kill_when(_train_cmd(npz, out), "iter 3/24", signal.SIGTERM)
        assert rc == 128 + signal.SIGTERM and "--resume auto" in stderr, (rc, stderr)
        ckpt = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
        assert 3 <= ckpt["iteration"] < 24 and not os.path.exists(os.path.join(out, "checkpoint.pth.tmp"))


def test_nonfinite_loss_stops_with_the_term_or_is_skipped():
    with tmpdir() as d:
        npz = _write_npz(os.path.join(d, "t.npz"), n_train=32, n_test=8)
        r = _cli(_train_cmd(npz, os.path.join(d, "a"), "--lr", "1e30")[2:])
        assert r.returncode == 3 and "Traceback" not in r.stderr
        assert re.search(r"non-finite loss \((ce|center|ce, center)\) at iteration \d+", r.stderr), r.stderr
        assert not os.path.exists(os.path.join(d, "a", "checkpoint.pth"))   # none written after the bad step
        r = _cli(_train_cmd(npz, os.path.join(d, "b"), "--lr", "1e30", "--skip-nonfinite", "100")[2:])
        assert r.returncode == 0, r.stderr
        rows = [json.loads(line) for line in open(os.path.join(d, "b", "metrics.jsonl"))]
        assert rows[-1]["skipped_nonfinite"] > 0


def test_nonfinite_step_changes_nothing_on_the_device():
    """update() with a NaN loss: parameters, momentum buffers and centers stay bit-identical
    (the fused SGD kernel's found_inf), and the flag it returns is a device tensor; the
    next finite step applies, with the same numbers as SGD's own first step."""
    args = train.parse_args(["--recipe", "none", "--loss", "joint"])
    torch.manual_seed(0)
    model = nn.Linear(3, 2)
    criterion = train.build_criterion(args, 2, 2)
    optimizer = train.build_optimizer(args, model, criterion)
    assert optimizer.defaults["fused"]
    x, y = torch.randn(4, 3), torch.tensor([0, 1, 0, 1])

    def joint_loss(scale):
        logits = model(x) * scale
        return criterion(logits, logits, y)[0]

    before = {k: v.clone() for k, v in {**model.state_dict(), **criterion.state_dict()}.items()}
    buffers = [optimizer.state[p]["momentum_buffer"].clone() for p in model.parameters()]
    finite = utils.backward_and_step(optimizer, joint_loss(float("nan")))
    assert isinstance(finite, torch.Tensor) and not finite
    after = {**model.state_dict(), **criterion.state_dict()}
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.equal(b, optimizer.state[p]["momentum_buffer"]) for b, p in zip(buffers, model.parameters()))
    reference = copy.deepcopy(model)                          # plain SGD, its own first step
    reference_sgd = torch.optim.SGD(reference.parameters(), lr=args.lr, momentum=args.momentum,
                                    weight_decay=args.wd)
    reference_logits = reference(x)                           # the same loss, before the centers move
    (F.cross_entropy(reference_logits, y) + args.lam * criterion.center_loss(reference_logits, y)).backward()
    reference_sgd.step()
    assert utils.backward_and_step(optimizer, joint_loss(1.0))
    for p, q in zip(model.parameters(), reference.parameters()):
        assert torch.allclose(p, q, atol=1e-6) and not torch.equal(p, before["weight" if p.dim() == 2 else "bias"])


def test_bad_inputs_are_one_line_exit_2_and_write_nothing():
    with tmpdir() as d:
        good = _write_npz(os.path.join(d, "good.npz"), n_train=16, n_test=8)
        floats = _write_npz(os.path.join(d, "floats.npz"), x_train=np.zeros((16, 32, 32, 3), np.float32))
        short = _write_npz(os.path.join(d, "short.npz"), y_train=np.zeros(5, np.int64))
        labels = _write_npz(os.path.join(d, "labels.npz"), y_test=-np.ones(20, np.int64))
        empty = os.path.join(d, "empty")
        os.makedirs(empty)
        folder = os.path.join(d, "folder")
        for split in ("train", "val"):
            for cls in ("a", "b"):
                _jpeg(os.path.join(folder, split, cls, "ok.jpg"), mode="RGB")
        broken = os.path.join(folder, "train", "b", "broken.jpg")
        with open(broken, "wb") as f:
            f.write(b"not a jpeg")
        a_file = os.path.join(d, "a_file")
        open(a_file, "w").close()
        old = os.path.join(d, "old")
        _cli(_train_cmd(good, old, "--epochs", "1")[2:])
        foreign = os.path.join(d, "foreign.pth")
        torch.save({"hello": 1}, foreign)
        truncated = os.path.join(d, "truncated.pth")
        with open(os.path.join(old, "checkpoint.pth"), "rb") as src, open(truncated, "wb") as dst:
            dst.write(src.read(200))
        empty_npz = os.path.join(d, "empty.npz")
        open(empty_npz, "w").close()
        float_labels = _write_npz(os.path.join(d, "float_labels.npz"), y_train=np.zeros(40, np.float32))
        npz_run = ["--dataset", "npz", "--workers", "0", "--batch-size", "8"]
        cases = [
            (["--dataset", "npz", "--data-path", os.path.join(d, "missing.npz")], "does not exist"),
            (["--dataset", "lfw", "--data-path", empty], "identity folders"),
            (npz_run + ["--data-path", floats], "must be uint8"),
            (npz_run + ["--data-path", short], "labels have 5"),
            (npz_run + ["--data-path", labels], "outside [0,"),
            (npz_run + ["--data-path", empty_npz], "cannot read"),
            (npz_run + ["--data-path", float_labels], "integer class indices"),
            (npz_run + ["--data-path", good, "--model", "resnet20", "--loss", "ce", "--resume",
                        os.path.join(old, "checkpoint.pth")],
             "was trained with --loss joint, this run has ce: pass --loss joint"),
            (npz_run + ["--data-path", good, "--deep-sup", "2"], "--deep-sup"),
            (["--dataset", "imagefolder", "--data-path", folder, "--image-size", "32", "--batch-size", "2",
              "--workers", "0"], broken),  # found while training: a config.json may exist, no torn file
            (["--dataset", "imagefolder", "--data-path", folder, "--image-size", "32", "--batch-size", "2",
              "--workers", "1"], broken),
            (npz_run + ["--data-path", good, "--output-dir", os.path.join(a_file, "sub")], "--output-dir"),
            (npz_run + ["--data-path", good, "--batch-size", "64"], "larger than the training set"),
            (npz_run + ["--data-path", good, "--resume", truncated], "truncated"),
            (npz_run + ["--data-path", good, "--resume", foreign], "not a train.py checkpoint"),
            (npz_run + ["--data-path", good, "--model", "resnet32", "--loss", "joint", "--resume",
                        os.path.join(old, "checkpoint.pth")], "does not fit this resnet32"),
        ]
        cases += [(npz_run + ["--data-path", good, "--amp", "fp16", "--device", "cpu"], "needs a CUDA device"),
                  (["--dataset", "imagefolder", "--data-path", folder, "--image-size", "32", "--loader", "tensor",
                    "--batch-size", "2"],
                   "--loader torch")]

        def run_case(k):  # each case in its own output folder, in this process (train.cli = the command line)
            argv = cases[k][0]
            out = os.path.join(d, f"out{k}")
            return out, _cli(argv + ["--output-dir", out] if "--output-dir" not in argv else argv)

        results = [run_case(k) for k in range(len(cases))]
        for (argv, fragment), (out, r) in zip(cases, results):
            lines = r.stderr.strip().splitlines()
            assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (argv, r.stderr)
            assert fragment in lines[0], (fragment, lines[0])
            if fragment != broken:  # the error comes first and alone: no config line above it
                assert "config:" not in r.stdout, r.stdout
            if fragment == broken:
                assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
                shutil.rmtree(out)
            assert not os.path.exists(out), argv  # nothing half-written
        for argv in (["--model", "resnet7"], ["--loss", "arcface"], ["--recipe", "nope"], ["--workers", "-1"]):
            stderr = io.StringIO()
            with contextlib.redirect_stderr(stderr):
                try:
                    train.parse_args(argv)
                    raise AssertionError(f"{argv} accepted")
                except SystemExit as e:
                    assert e.code == 2
            assert len(stderr.getvalue().strip().splitlines()) == 1 and argv[0] in stderr.getvalue()
        r = _cli(["--dataset", "imagefolder", "--data-path", folder, "--image-size", "32",
                  "--batch-size", "2", "--workers", "0", "--iters", "1", "--skip-corrupt",
                  "--output-dir", os.path.join(d, "skip")])
        assert r.returncode == 0 and "dropped 1 unreadable images" in r.stdout, r.stderr


def test_deterministic_flag():
    with tmpdir() as d:
        npz = _write_npz(os.path.join(d, "t.npz"), n_train=16, n_test=8)
        try:
            train.main(train.parse_args(["--dataset", "npz", "--data-path", npz, "--model", "resnet20",
                                         "--batch-size", "8", "--workers", "0", "--iters", "2",
                                         "--deterministic", "--output-dir", os.path.join(d, "r")]))
            assert torch.are_deterministic_algorithms_enabled()
        finally:
            torch.use_deterministic_algorithms(False)


# ----------------------------------------------------------------------------------
# MKSMT parts (seed 002): KD losses, OPM, official Swin weights, NABirds / Dogs, Grad-CAM
# ----------------------------------------------------------------------------------
def _jpeg_file(path, side=24, colour=(200, 100, 0)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (side, side), colour).save(path)


# ----------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------
def test_kd_loss_matches_naive_loop():
    torch.manual_seed(0)
    zs, zt = torch.randn(3, 4, dtype=torch.float64) * 3, torch.randn(3, 4, dtype=torch.float64) * 3
    for temperature in (1.0, 4.0):
        for t2 in (True, False):
            got = losses.kd_loss(zs, zt, temperature=temperature, t2_scale=t2).item()
            want = losses.naive_kd(zs.tolist(), zt.tolist(), temperature, t2)
            assert abs(got - want) < 1e-12, (temperature, t2, got, want)
    # T^2 matters at T = 4: the two conventions differ by exactly 16.
    assert abs(losses.kd_loss(zs, zt, 4.0, t2_scale=True).item()
               - 16 * losses.kd_loss(zs, zt, 4.0, t2_scale=False).item()) < 1e-12
    assert losses.kd_loss(zt, zt, 3.0).abs().item() < 1e-15  # KL(p || p) = 0


def test_kd_loss_gradients_and_detach():
    torch.manual_seed(1)
    B, K, T = 2, 3, 2.0
    zs = torch.randn(B, K, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(B, K, dtype=torch.float64, requires_grad=True)
    losses.kd_loss(zs, zt, temperature=T).backward()
    assert zt.grad is None  # detached teacher: no gradient
    # d/dz_s of T^2 * KL / B = T * (p_s - p_t) / B, written out per element.
    for b in range(B):
        s, t = zs[b].tolist(), zt[b].tolist()
        ps = [math.exp(v / T) / sum(math.exp(u / T) for u in s) for v in s]
        pt = [math.exp(v / T) / sum(math.exp(u / T) for u in t) for v in t]
        for i in range(K):
            assert abs(zs.grad[b, i].item() - T * (ps[i] - pt[i]) / B) < 1e-12
    zs.grad = None
    losses.kd_loss(zs, zt, temperature=T, detach_teacher=False).backward()
    assert zt.grad is not None and zt.grad.abs().sum() > 0


def test_kd_loss_is_stable_for_large_half_precision_logits():
    zs = torch.tensor([[1000.0, -1000.0, 0.0]], dtype=torch.float16)
    zt = torch.tensor([[-1000.0, 1000.0, 0.0]], dtype=torch.float16)
    value = losses.kd_loss(zs, zt)
    assert value.dtype == torch.float32 and torch.isfinite(value)
    assert abs(value.item() - 2000.0) < 1e-2  # sum_i p_t (log p_t - log p_s) = 0 - (-2000)


def test_feature_kd_loss_matches_naive_mean_and_detach():
    torch.manual_seed(2)
    fs = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    ft = torch.randn(3, 5, dtype=torch.float64, requires_grad=True)
    got = losses.feature_kd_loss(fs, ft)
    want = sum((fs[b, k].item() - ft[b, k].item()) ** 2 for b in range(3) for k in range(5)) / 15
    assert abs(got.item() - want) < 1e-12
    got.backward()
    assert ft.grad is None and fs.grad is not None
    losses.feature_kd_loss(fs, ft, detach_teacher=False).backward()
    assert ft.grad is not None


# ----------------------------------------------------------------------------------
# OPM
# ----------------------------------------------------------------------------------
def test_opm_shapes_widths_and_feature():
    torch.manual_seed(3)
    opm = models.OPM(in_channels=8, num_classes=5, mid_channels=4, feat_dim=6)
    for side in (4, 1):
        logits, feature = opm(torch.randn(2, 8, side, side))  # training mode, B = 2
        assert logits.shape == (2, 5) and feature.shape == (2, 6)
    opm.eval()
    logits, feature = opm(torch.randn(1, 8, 1, 1))
    assert logits.shape == (1, 5) and feature.shape == (1, 6)
    assert torch.allclose(opm.fc(feature), logits)  # the feature is the last Linear's input
    assert feature.min() > -1  # ELU output
    default = models.OPM(in_channels=16, num_classes=3)
    convs = [m for m in default.modules() if isinstance(m, nn.Conv2d)]
    linears = [m for m in default.modules() if isinstance(m, nn.Linear)]
    assert [(c.in_channels, c.out_channels, c.kernel_size) for c in convs] == [(16, 512, (1, 1)), (512, 1024, (3, 3))]
    assert [(l.in_features, l.out_features) for l in linears] == [(1024, 512), (512, 3)]


def test_opm_pools_with_max_not_mean():
    torch.manual_seed(4)
    opm = models.OPM(in_channels=3, num_classes=2, mid_channels=2, feat_dim=2).eval()
    seen = []
    opm.embed.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    x = torch.randn(1, 3, 5, 5)
    opm(x)
    conv_map = opm.conv(x)[0]  # (4, 5, 5)
    for c in range(4):
        assert abs(seen[0][0, c].item() - max(conv_map[c].flatten().tolist())) < 1e-6


# ----------------------------------------------------------------------------------
# Swin: official checkpoint layout -> torchvision
# ----------------------------------------------------------------------------------
TINY_SWIN = dict(patch_size=[4, 4], embed_dim=16, depths=[2, 2], num_heads=[2, 4], window_size=[4, 4])


def _tiny_swin(seed, num_classes=5, window=4):
    torch.manual_seed(seed)
    net = torchvision.models.SwinTransformer(**{**TINY_SWIN, "window_size": [window, window]},
                                             num_classes=num_classes)
    for p in net.parameters():  # not the init values (LayerNorm 1/0, tiny tables)
        p.data.normal_(0, 0.3)
    return net.eval()


def _official_relative_position_index(window):
    """The official WindowAttention's buffer: (N, N) with N = window^2."""
    coords = [(h, w) for h in range(window) for w in range(window)]
    return torch.tensor([[(a[0] - b[0] + window - 1) * (2 * window - 1) + (a[1] - b[1] + window - 1)
                          for b in coords] for a in coords])


def _to_official(tv_state):
    """torchvision SwinTransformer keys -> official keys (the inverse, written here),
    plus the official buffers relative_position_index and attn_mask."""
    official = {}
    for key, value in tv_state.items():
        if key.endswith("relative_position_index"):
            continue
        m = re.fullmatch(r"features\.0\.0\.(\w+)", key) or re.fullmatch(r"features\.0\.2\.(\w+)", key)
        if m:
            official[("patch_embed.proj." if ".0.0." in key else "patch_embed.norm.") + m.group(1)] = value
            continue
        m = re.fullmatch(r"features\.(\d+)\.(\d+)\.(.+)", key)
        if m and int(m.group(1)) % 2 == 1:
            stage, block, rest = (int(m.group(1)) - 1) // 2, m.group(2), m.group(3)
            rest = {"mlp.0.weight": "mlp.fc1.weight", "mlp.0.bias": "mlp.fc1.bias",
                    "mlp.3.weight": "mlp.fc2.weight", "mlp.3.bias": "mlp.fc2.bias"}.get(rest, rest)
            official[f"layers.{stage}.blocks.{block}.{rest}"] = value
            continue
        m = re.fullmatch(r"features\.(\d+)\.(reduction|norm)\.(\w+)", key)
        if m:
            official[f"layers.{int(m.group(1)) // 2 - 1}.downsample.{m.group(2)}.{m.group(3)}"] = value
            continue
        assert key in ("norm.weight", "norm.bias", "head.weight", "head.bias"), key
        official[key] = value
    for stage, depth in enumerate(TINY_SWIN["depths"]):
        for block in range(depth):
            prefix = f"layers.{stage}.blocks.{block}."
            official[prefix + "attn.relative_position_index"] = _official_relative_position_index(4)
            if block % 2 == 1 and stage == 0:  # shifted blocks whose map exceeds the window
                official[prefix + "attn_mask"] = torch.zeros(4, 16, 16)
    return official


def test_swin_official_checkpoint_round_trip():
    net_a = _tiny_swin(seed=0)
    official = _to_official(net_a.state_dict())
    assert "layers.0.downsample.reduction.weight" in official and "layers.1.blocks.1.mlp.fc2.bias" in official
    # The official relative-position index equals torchvision's (flattened): same table layout.
    assert torch.equal(_official_relative_position_index(4).flatten(),
                       net_a.features[1][0].attn.relative_position_index)
    x = torch.randn(2, 3, 32, 32)
    net_b = _tiny_swin(seed=1)
    assert not torch.allclose(net_b(x), net_a(x), atol=1e-3)
    report = models.load_swin_official(net_b, official)
    with torch.no_grad():
        assert torch.allclose(net_b(x), net_a(x), atol=1e-5)
    n_tensors = sum(1 for k in net_a.state_dict() if not k.endswith("relative_position_index"))
    assert report["loaded"] == n_tensors and report["missing"] == [] and report["unexpected"] == []
    assert len(report["dropped_buffers"]) == 4 + 1 and report["resized"] == [] and report["skipped_shape"] == []

    # From a file, wrapped as {"model": ...}, into a module holding the net at .net
    # (as models.Swin does) with another K: the head is skipped, the rest matches.
    class Holder(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = _tiny_swin(seed=2, num_classes=7)

    with tmpdir() as d:
        path = os.path.join(d, "swin_official.pth")
        torch.save({"model": official}, path)
        holder = Holder()
        report = models.load_swin_official(holder, path)
    assert sorted(report["missing"]) == ["net.head.bias", "net.head.weight"]
    assert len(report["skipped_shape"]) == 2 and all(s.startswith("head.") for s in report["skipped_shape"])
    with torch.no_grad():
        assert torch.allclose(holder.net.norm(holder.net.features(x)), net_a.norm(net_a.features(x)), atol=1e-5)

    # Another window: every bias table is resized, nothing else is skipped.
    net_c = _tiny_swin(seed=3, window=2)
    report = models.load_swin_official(net_c, official)
    assert len(report["resized"]) == 4 and report["skipped_shape"] == [] and report["missing"] == []
    assert net_c.features[1][0].attn.relative_position_bias_table.shape == (9, 2)


def _official_patch_merging(x, norm_weight, norm_bias, reduction_weight):
    """microsoft/Swin-Transformer PatchMerging.forward on x (B, H, W, C)."""
    x0 = x[:, 0::2, 0::2, :]
    x1 = x[:, 1::2, 0::2, :]
    x2 = x[:, 0::2, 1::2, :]
    x3 = x[:, 1::2, 1::2, :]
    merged = torch.cat([x0, x1, x2, x3], -1)
    merged = F.layer_norm(merged, merged.shape[-1:], norm_weight, norm_bias)
    return merged @ reduction_weight.t()


def test_official_patch_merging_order_needs_no_permutation():
    net_a = _tiny_swin(seed=0)
    official = _to_official(net_a.state_dict())
    net_b = _tiny_swin(seed=1)
    models.load_swin_official(net_b, official)
    x = torch.randn(2, 8, 8, 16)
    w = [official[f"layers.0.downsample.{k}"] for k in ("norm.weight", "norm.bias", "reduction.weight")]
    with torch.no_grad():
        want = _official_patch_merging(x, *w)
        assert torch.allclose(net_b.features[2](x), want, atol=1e-5)
        # Negative control: another concatenation order gives another result.
        swapped = torch.cat([x[:, 0::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 0::2], x[:, 1::2, 1::2]], -1)
        other = F.layer_norm(swapped, swapped.shape[-1:], w[0], w[1]) @ w[2].t()
        assert not torch.allclose(other, want, atol=1e-3)


def test_resize_relative_position_bias():
    torch.manual_seed(5)
    table = torch.randn(49, 3)  # window 4, 3 heads
    assert torch.equal(models.resize_relative_position_bias(table, 4, 4), table)
    for new_window, rows in ((2, 9), (7, 169)):
        resized = models.resize_relative_position_bias(table, 4, new_window)
        assert resized.shape == (rows, 3)
        # Offset (0, 0) sits at the centre of both grids and bicubic keeps it exactly.
        assert torch.allclose(resized[rows // 2], table[49 // 2], atol=1e-5)
    # A table varying only with dy (rows of the (2W-1) x (2W-1) grid) and per head
    # keeps that structure: no row/column or head/position mix-up.
    ramp = torch.tensor([[dy + 10.0 * h for h in range(3)] for dy in range(7) for dx in range(7)])
    grid = models.resize_relative_position_bias(ramp, 4, 7).reshape(13, 13, 3)
    assert torch.allclose(grid, grid[:, :1, :].expand(13, 13, 3))
    assert torch.allclose(grid[6, 0], torch.tensor([3.0, 13.0, 23.0]), atol=1e-5)
    assert torch.allclose(models.resize_relative_position_bias(torch.full((49, 2), 0.7), 4, 2), torch.full((9, 2), 0.7))
    # Values: 1-D cubic convolution (Keys, a = -0.75, half-pixel centres, clamped
    # borders) along dy of a table that is quadratic in dy (bilinear would differ).
    table = torch.tensor([[float(dy * dy)] for dy in range(7) for dx in range(7)], dtype=torch.float64)
    grid = models.resize_relative_position_bias(table, 4, 7).reshape(13, 13)

    def keys(t, a=-0.75):
        t = abs(t)
        return (a + 2) * t ** 3 - (a + 3) * t ** 2 + 1 if t <= 1 else a * t ** 3 - 5 * a * t ** 2 + 8 * a * t - 4 * a

    for i in range(13):
        src = (i + 0.5) * 7 / 13 - 0.5
        base = math.floor(src)
        want = sum(keys(src - (base + o)) * min(max(base + o, 0), 6) ** 2 for o in (-1, 0, 1, 2))
        assert abs(grid[i, 5].item() - want) < 1e-9, (i, grid[i, 5].item(), want)


# ----------------------------------------------------------------------------------
# datasets
# ----------------------------------------------------------------------------------
NABIRDS_IMAGES = [  # uuid, class id, is_train
    ("a5f0c1d2-0000-4e6f-9b1a-2c3d4e5f6a7b", 1000, 1),
    ("0b1c2d3e-1111-4a5b-8c7d-9e0f1a2b3c4d", 295, 1),
    ("ffee0011-2222-4333-a444-555566667777", 817, 0),
    ("12ab34cd-3333-4eee-bfff-000011112222", 295, 0),
]


def _write_nabirds(d):
    with open(os.path.join(d, "images.txt"), "w") as f:
        for uuid, class_id, _ in NABIRDS_IMAGES:
            f.write(f"{uuid} {class_id:04d}/{uuid.replace('-', '')}.jpg\n")
            _jpeg_file(os.path.join(d, "images", f"{class_id:04d}", uuid.replace("-", "") + ".jpg"))
    with open(os.path.join(d, "image_class_labels.txt"), "w") as f:
        f.writelines(f"{uuid} {class_id}\n" for uuid, class_id, _ in NABIRDS_IMAGES)
    with open(os.path.join(d, "train_test_split.txt"), "w") as f:
        f.writelines(f"{uuid} {is_train}\n" for uuid, _, is_train in NABIRDS_IMAGES)
    with open(os.path.join(d, "classes.txt"), "w") as f:  # includes unused (non-leaf) ids
        f.write("0 Birds\n295 Great Blue Heron\n500 Herons\n817 Mallard (Male)\n1000 Wood Duck\n")


def test_nabirds_uuid_ids_and_non_contiguous_classes():
    with tmpdir() as d:
        _write_nabirds(d)
        train_set, test_set, k = data.build_datasets("nabirds", d, image_size=16)
        assert k == 3 and train_set.classes == ["Great Blue Heron", "Mallard (Male)", "Wood Duck"]
        assert train_set.targets == [2, 0] and test_set.targets == [1, 0]  # 295 -> 0, 817 -> 1, 1000 -> 2
        assert train_set.samples[0][0].endswith("a5f0c1d200004e6f9b1a2c3d4e5f6a7b.jpg")
        image, label = test_set[0]
        assert image.shape == (3, 16, 16) and label == 1
        os.remove(os.path.join(d, "classes.txt"))
        assert data.build_datasets("nabirds", d, image_size=16)[0].classes == ["295", "817", "1000"]
        os.remove(os.path.join(d, "train_test_split.txt"))
        assert_data_error(lambda: data.build_datasets("nabirds", d), "train_test_split.txt")
        _write_nabirds(d)
        with open(os.path.join(d, "image_class_labels.txt"), "a") as f:
            f.write("deadbeef-0000-4000-8000-000000000000 heron\n")
        assert_data_error(lambda: data.build_datasets("nabirds", d), "malformed")


def test_nabirds_and_dogs_missing_data_one_line_errors():
    with tmpdir() as d:
        message = assert_data_error(lambda: data.load_nabirds(d, (None, None)), os.path.join(d, "images.txt"))
        assert "--data-path" in message
        _write_nabirds(d)
        shutil.rmtree(os.path.join(d, "images"))
        assert_data_error(lambda: data.build_datasets("nabirds", d), "images")
        assert_data_error(lambda: data.build_datasets("dogs", d), os.path.join(d, "train"))
        assert_data_error(lambda: data.build_datasets("dogs", os.path.join(d, "nowhere")), "does not exist")


def test_dogs_imagefolder_with_test_or_val():
    for test_split in ("test", "val"):
        with tmpdir() as d:
            for split, n in (("train", 2), (test_split, 1)):
                for breed in ("n02085620-Chihuahua", "n02085782-Japanese_spaniel"):
                    for i in range(n):
                        _jpeg_file(os.path.join(d, split, breed, f"{i}.jpg"))
            train_set, test_set, k = data.build_datasets("dogs", d, image_size=16)
            assert k == 2 and len(train_set) == 4 and len(test_set) == 2
            assert test_set.classes[1] == "n02085782-Japanese_spaniel" and test_set.targets == [0, 1]
            assert train_set[3][0].shape == (3, 16, 16)
            shutil.rmtree(os.path.join(d, test_split, "n02085620-Chihuahua"))
            assert_data_error(lambda: data.build_datasets("dogs", d), "different class folders")
    assert data.DEFAULT_NORMALIZE["nabirds"] == data.DEFAULT_NORMALIZE["dogs"] == "imagenet"


# ----------------------------------------------------------------------------------
# evaluation parts
# ----------------------------------------------------------------------------------
class TwoHeadNet(nn.Module):
    """Two conv stages, a GAP + dropout + Linear head on each: the MKSMT dict."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.drop = nn.Dropout(0.5)
        self.heads = nn.ModuleList([nn.Linear(4, num_classes), nn.Linear(6, num_classes)])

    def forward(self, x):
        s0 = F.relu(self.conv1(x))   # (B, 4, H, W)
        s1 = F.relu(self.conv2(s0))  # (B, 6, H/2, W/2)
        head_logits = [head(self.drop(s.mean(dim=(2, 3)))) for head, s in zip(self.heads, (s0, s1))]
        return {"stages": [s0, s1], "head_logits": head_logits, "head_stages": [0, 1], "logits": head_logits[1]}


def test_gradcam_equals_cam_for_a_gap_linear_head():
    torch.manual_seed(6)
    model = TwoHeadNet().double().train()
    images = torch.randn(2, 3, 16, 16, dtype=torch.float64)
    for head in (0, 1):
        cams, predictions = evaluate.gradcam(model, images, head)
        assert model.training  # mode restored
        assert cams.shape == (2, 16, 16) and predictions.shape == (2,)
        model.eval()
        with torch.no_grad():
            out = model(images)
        model.train()
        stage = out["stages"][head]
        assert torch.equal(predictions, out["head_logits"][head].argmax(1))
        # For GAP + Linear, d y^c / d A_{k,h,w} = W[c, k] / (h w): Grad-CAM = CAM (Selvaraju Sec. 3).
        weight = model.heads[head].weight
        C, h, w = stage.shape[1:]
        for b in range(2):
            c = predictions[b].item()
            low = [[max(0.0, sum(weight[c, k].item() / (h * w) * stage[b, k, i, j].item() for k in range(C)))
                    for j in range(w)] for i in range(h)]
            up = F.interpolate(torch.tensor(low, dtype=torch.float64)[None, None], size=(16, 16),
                               mode="bilinear", align_corners=False)[0, 0]
            want = (up - up.min()) / (up.max() - up.min())
            assert torch.allclose(cams[b], want, atol=1e-9)
            assert cams[b].min() == 0 and abs(cams[b].max().item() - 1) < 1e-12


class PlainTwoStageNet(nn.Module):
    """Two conv stages and the final GAP + Linear classifier only: a baseline, no heads."""

    def __init__(self, num_classes=3):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1)
        self.conv2 = nn.Conv2d(4, 6, 3, stride=2, padding=1)
        self.fc = nn.Linear(6, num_classes)

    def forward(self, x):
        s0 = torch.tanh(self.conv1(x))   # (B, 4, H, W); tanh: smooth, for finite differences
        s1 = F.relu(self.conv2(s0))      # (B, 6, H/2, W/2)
        return {"stages": [s0, s1], "logits": self.fc(s1.mean(dim=(2, 3)))}


def test_gradcam_of_any_stage_of_a_model_without_heads():
    """A stage no head reads uses the final classifier's logit: on the last stage (GAP +
    Linear) Grad-CAM is CAM; on the inner stage alpha_c is checked against central finite
    differences of the final logit with respect to that stage's map."""
    torch.manual_seed(3)
    model = PlainTwoStageNet().double().eval()
    images = torch.randn(2, 3, 8, 8, dtype=torch.float64)
    with torch.no_grad():
        out = model(images)
    cams, predictions = evaluate.gradcam(model, images, 1)
    assert torch.equal(predictions, out["logits"].argmax(1))
    s1, weight = out["stages"][1], model.fc.weight
    for b in range(2):
        c = predictions[b].item()
        low = [[max(0.0, sum(weight[c, k].item() / 16 * s1[b, k, i, j].item() for k in range(6))) for j in range(4)]
               for i in range(4)]
        up = F.interpolate(torch.tensor(low, dtype=torch.float64)[None, None], size=(8, 8), mode="bilinear",
                           align_corners=False)[0, 0]
        assert torch.allclose(cams[b], (up - up.min()) / (up.max() - up.min()), atol=1e-9)
    cams, _ = evaluate.gradcam(model, images, 0)
    s0 = out["stages"][0]
    with torch.no_grad():
        def logit_from_stage0(b, a):  # the rest of the network, run from a given stage-0 map
            return model.fc(F.relu(model.conv2(a[None])).mean(dim=(2, 3)))[0, predictions[b]].item()
        for b in range(2):
            alpha, eps = [], 1e-6
            for k in range(4):
                total = 0.0
                for i in range(8):
                    for j in range(8):
                        plus, minus = s0[b].clone(), s0[b].clone()
                        plus[k, i, j] += eps
                        minus[k, i, j] -= eps
                        total += (logit_from_stage0(b, plus) - logit_from_stage0(b, minus)) / (2 * eps)
                alpha.append(total / 64)
            low = torch.tensor([[max(0.0, sum(alpha[k] * s0[b, k, i, j].item() for k in range(4))) for j in range(8)]
                                for i in range(8)], dtype=torch.float64)
            want = (low - low.min()) / (low.max() - low.min())  # 8 x 8 already: the upsampling is the identity
            assert torch.allclose(cams[b], want, atol=1e-6), b
    with torch.device("meta"):  # Swin: each stage reads the map returned for the one before, so gradients reach it
        out = models.build_model("swin_t", 5, image_size=64).eval()(torch.randn(1, 3, 64, 64))
        assert all(torch.autograd.grad(out["logits"].sum(), s, retain_graph=True, allow_unused=True)[0] is not None
                   for s in out["stages"])


def test_save_overlays_writes_blended_pngs():
    torch.manual_seed(7)
    images = torch.randint(0, 256, (2, 3, 6, 5), dtype=torch.uint8)
    cams = torch.zeros(2, 6, 5)
    cams[1] = 1.0
    cams[1, 0, 0] = 0.5
    with tmpdir() as d:
        paths = evaluate.save_overlays(images, cams, os.path.join(d, "sub", "cam"))
        assert len(paths) == 2 and all(os.path.isfile(p) for p in paths)
        pixels = []
        for p in paths:
            with Image.open(p) as image:
                assert image.size == (5, 6) and image.mode == "RGB"
                pixels.append(image.load())
        # jet: 0 -> (0, 0, 0.5) dark blue, 0.5 -> (0.5, 1, 0.5), 1 -> (0.5, 0, 0) dark red.
        for b, (i, j), colour in ((0, (2, 3), (0, 0, 0.5)), (1, (4, 1), (0.5, 0, 0)), (1, (0, 0), (0.5, 1, 0.5))):
            want = tuple(round(0.5 * images[b, ch, i, j].item() + 0.5 * 255 * colour[ch]) for ch in range(3))
            got = pixels[b][j, i]
            assert all(abs(g - w) <= 1 for g, w in zip(got, want)), (b, got, want)


def test_complexity_counts_conv_and_linear_by_hand():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False).train()
    result = evaluate.complexity(conv, 8)
    # 2 FLOPs per multiply-add, one per (output element, input channel, kernel tap).
    assert result == {"params": 8 * 3 * 3 * 3, "flops": 2 * (8 * 8 * 8) * (3 * 3 * 3)}
    assert conv.training
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    assert evaluate.complexity(linear, 4) == {"params": 48 * 5 + 5, "flops": 2 * 48 * 5}
    assert evaluate.complexity(TwoHeadNet(), 16)["flops"] > 0


# ----------------------------------------------------------------------------------
# Hybrid network (seed 003): SC / PSC / MPSC, long-tailed data, class-balanced sampling
# ----------------------------------------------------------------------------------
def _views(B, V, d, seed):
    torch.manual_seed(seed)
    return torch.nn.functional.normalize(torch.randn(B, V, d, dtype=torch.float64), dim=2)


def test_supcon_matches_naive_loop_one_and_two_views():
    labels = torch.tensor([0, 1, 1, 2, 0, 3])  # classes 2 and 3 appear once: singletons
    for V in (1, 2):
        for tau in (0.1, 0.5):
            feats = _views(6, V, 5, seed=V)
            z = feats.reshape(6 * V, 5).tolist()
            y = labels.repeat_interleave(V).tolist()
            got = losses.SupConLoss(tau)(feats, labels).item()
            assert abs(got - losses.naive_supcon(z, y, tau)) < 1e-10, (V, tau, got)
    # SupContrast's rescaling only when asked for
    feats = _views(6, 2, 5, seed=3)
    plain = losses.SupConLoss(0.1)(feats, labels)
    assert abs(losses.SupConLoss(0.1, base_temperature=0.07)(feats, labels).item() - plain.item() * 0.1 / 0.07) < 1e-10


def test_supcon_anchors_without_positive_and_gradcheck():
    # no positive anywhere: 0, finite gradient; a single sample with a single view as well
    for feats, labels in ((_views(3, 1, 4, 0), torch.tensor([0, 1, 2])), (_views(1, 1, 4, 1), torch.tensor([5]))):
        feats.requires_grad_(True)
        loss = losses.SupConLoss(0.1)(feats, labels)
        loss.backward()
        assert loss.item() == 0.0 and torch.isfinite(feats.grad).all()
    # a singleton class with one view: only the others are anchors, gradients finite
    feats = _views(4, 1, 4, 2).requires_grad_(True)
    labels = torch.tensor([0, 0, 1, 2])
    loss = losses.SupConLoss(0.1)(feats, labels)
    loss.backward()
    assert torch.isfinite(feats.grad).all() and feats.grad[2:].abs().sum() > 0  # negatives still get gradient
    raw = torch.randn(4, 2, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(
        lambda x: losses.SupConLoss(0.2)(torch.nn.functional.normalize(x, dim=2), torch.tensor([0, 1, 1, 2])), (raw,))


def test_psc_and_mpsc_match_naive_loop():
    labels = torch.tensor([0, 2, 2, 1, 0])  # class 3 absent from the batch
    for V in (1, 2):
        feats = _views(5, V, 6, seed=10 + V)
        z, y = feats.reshape(5 * V, 6).tolist(), labels.repeat_interleave(V).tolist()
        for M, include, weights, tau in ((1, False, "uniform", 1.0), (1, True, "uniform", 0.1),
                                         (3, False, "uniform", 0.1), (3, False, "softmax", 0.5)):
            torch.manual_seed(M)
            loss = losses.PSCLoss(4, 6, tau, M, include, weights).double()
            want = losses.naive_psc(z, y, loss.prototypes.tolist(), 4, M, tau, include, weights)
            assert abs(loss(feats, labels).item() - want) < 1e-10, (V, M, include, weights)
    # one sample; float64 gradcheck through features and prototypes
    loss = losses.PSCLoss(3, 4, 0.5, 2).double()
    x = torch.randn(1, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda f, p: torch.func.functional_call(
        loss, {"prototypes": p}, (torch.nn.functional.normalize(f, dim=1), torch.tensor([1]))),
        (x, loss.prototypes.detach().clone().requires_grad_(True)))
    try:
        losses.PSCLoss(1, 4)
    except ValueError:
        pass
    else:
        raise AssertionError("PSC with one class has an empty denominator and must be refused")


def test_hybrid_alpha_and_objective():
    assert [losses.hybrid_alpha(t, 4) for t in range(4)] == [1.0, 1 - 1 / 16, 0.75, 1 - 9 / 16]
    assert [losses.hybrid_alpha(t, 4, "linear") for t in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert losses.hybrid_alpha(3, 4, "const", 0.3) == 0.3
    torch.manual_seed(0)
    feats, con_labels = _views(4, 2, 5, 1), torch.tensor([0, 1, 1, 0])
    logits, ce_labels = torch.randn(3, 2, dtype=torch.float64), torch.tensor([0, 1, 1])
    con = losses.SupConLoss(0.1)
    total, parts = losses.HybridLoss(con)(feats, con_labels, logits, ce_labels, 0.25)
    ce = -sum(math.log(math.exp(logits[i, ce_labels[i]].item()) / sum(math.exp(v) for v in logits[i].tolist()))
              for i in range(3)) / 3
    want = 0.25 * losses.naive_supcon(feats.reshape(8, 5).tolist(), con_labels.repeat_interleave(2).tolist(), 0.1) + 0.75 * ce
    assert abs(total.item() - want) < 1e-10 and set(parts) == {"con", "ce"}


def test_hybrid_step_normalises_each_branch_by_its_own_batch():
    """One forward pass per branch (as BBN's code): the CE term is the classifier batch's CE
    alone, whatever the views hold (one shared pass would mix their BN statistics), and the
    running statistics take the views' batch, then the CE batch's."""
    class Tiny(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.bn = torch.nn.Linear(12, 4), torch.nn.BatchNorm1d(4)
            self.proj, self.cls = torch.nn.Linear(4, 3), torch.nn.Linear(4, 2)

        def forward(self, x):
            h = self.bn(self.fc(x.flatten(1)))
            return {"projection": F.normalize(self.proj(h), dim=1), "logits": self.cls(h)}

    torch.manual_seed(0)
    views, ce_images = torch.randn(4, 2, 3, 2, 2), torch.randn(6, 3, 2, 2)
    con_labels, ce_labels = torch.tensor([0, 1, 1, 0]), torch.tensor([0, 1, 0, 1, 1, 0])
    criterion, ce_parts = losses.HybridLoss(losses.SupConLoss(0.1)), []
    for shift in (0.0, 3.0):
        torch.manual_seed(1)
        model = Tiny()
        alone = copy.deepcopy(model)
        sgd = torch.optim.SGD(model.parameters(), lr=0.0)
        _, parts, _ = train.hybrid_step(((views * (1 + shift) + shift, con_labels), (ce_images, ce_labels)), model,
                                        criterion, sgd, lambda t: t, contextlib.nullcontext, 0.5)
        ce_parts.append(parts["ce"].item())
        shifted = views * (1 + shift) + shift
        torch.testing.assert_close(parts["ce"], F.cross_entropy(alone(ce_images)["logits"], ce_labels))
        torch.testing.assert_close(parts["con"], losses.SupConLoss(0.1)(
            alone(shifted.flatten(0, 1))["projection"].view(4, 2, 3), con_labels))       # (B, 2 views, d)
        with torch.no_grad():  # PyTorch's BN: momentum 0.1, running_var from the unbiased batch variance
            h_views, h_ce = alone.fc(shifted.flatten(0, 1).flatten(1)), alone.fc(ce_images.flatten(1))
        want_mean = 0.9 * (0.1 * h_views.mean(0)) + 0.1 * h_ce.mean(0)
        want_var = 0.9 * (0.9 + 0.1 * h_views.var(0)) + 0.1 * h_ce.var(0)
        torch.testing.assert_close(model.bn.running_mean, want_mean)
        torch.testing.assert_close(model.bn.running_var, want_var)
    assert math.isclose(ce_parts[0], ce_parts[1], rel_tol=1e-6)


def test_hybrid_step_puts_deep_supervision_on_the_ce_batch():
    """With an auxiliary head (--deep-sup) the hybrid step adds alpha_t * CE(aux head) of the
    class-balanced CE batch, from that batch's own pass."""
    torch.manual_seed(0)
    model = models.build_model("resnet20", 3, deep_sup=[1], projection_dim=8)
    alone = copy.deepcopy(model)
    views, ce_images = torch.randn(4, 2, 3, 16, 16), torch.randn(5, 3, 16, 16)
    con_labels, ce_labels = torch.tensor([0, 1, 1, 2]), torch.tensor([0, 1, 2, 2, 0])
    sgd = torch.optim.SGD(model.parameters(), lr=0.0)
    torch.manual_seed(1)  # the aux head's dropout: the same draws here and below
    loss, parts, _ = train.hybrid_step(((views, con_labels), (ce_images, ce_labels)), model,
                                       losses.HybridLoss(losses.SupConLoss(0.1)), sgd, lambda t: t,
                                       contextlib.nullcontext, 0.25, aux_weight=0.5)
    torch.manual_seed(1)
    alone(views.flatten(0, 1))                      # the views' pass first: same BN state and draws as in the step
    out = alone(ce_images)
    aux = F.cross_entropy(out["aux_logits"][0], ce_labels)                        # (5, 3) logits
    torch.testing.assert_close(parts["aux"], aux)
    torch.testing.assert_close(loss, 0.25 * parts["con"] + 0.75 * parts["ce"] + 0.5 * aux)


def test_long_tailed_sizes_and_subset():
    for K, n_max, sizes in ((10, 5000, (12406, 13996, 20431)), (100, 500, (10847, 12608, 19573))):
        assert tuple(sum(data.long_tailed_counts(n_max, K, beta)) for beta in (100, 50, 10)) == sizes
    assert data.long_tailed_counts(1000, 10, 100) == [1000, 599, 359, 215, 129, 77, 46, 27, 16, 10]
    labels = np.repeat(np.arange(4), 50)
    base = data.ArrayDataset(np.zeros((200, 4, 4, 3), np.uint8), labels, ["a", "b", "c", "d"])
    lt = data.long_tailed_subset(base, 10, seed=1)
    assert np.bincount(lt.targets).tolist() == [50, 23, 10, 5] and lt.classes == base.classes
    assert lt.indices == data.long_tailed_subset(base, 10, seed=1).indices
    assert lt.indices != data.long_tailed_subset(base, 10, seed=2).indices  # the shuffle is seeded
    assert all(base.targets[i] == t for i, t in zip(lt.indices, lt.targets))
    # a cut that empties a class is refused: n_max 50 at beta 100 gives the last class int(0.5) = 0
    assert_data_error(lambda: data.long_tailed_subset(base, 100), "leaves 1 of 4 classes empty")
    missing = data.ArrayDataset(np.zeros((150, 4, 4, 3), np.uint8), labels[:150], ["a", "b", "c", "d"])  # no "d"
    assert_data_error(lambda: data.long_tailed_subset(missing, 2), "leaves 4 of 4 classes empty")


def test_sampler_class_balanced_balances_the_training_batches_of_a_long_tailed_set():
    """--sampler class-balanced with CE: the batches' labels come out near uniform on a
    9:1 set (instance sampling keeps 9:1), with both loaders; so do the hybrid network's CE
    batches, while its contrastive stream keeps 9:1."""
    with tmpdir() as d:
        y = np.array([0] * 180 + [1] * 20)
        npz = _write_npz(os.path.join(d, "lt.npz"), n_train=200, y_train=y)
        for loader in ("tensor", "torch"):
            share = {}
            for sampler in ("instance", "class-balanced"):
                args = train.parse_args(["--dataset", "npz", "--data-path", npz, "--batch-size", "50", "--workers",
                                         "0", "--loader", loader, "--sampler", sampler, "--device", "cpu"])
                train_set = utils.build_datasets_from_args(args)[0]
                batches, order = _train_loader(args, train_set)
                labels = []
                for epoch in range(4):
                    order.set_epoch(epoch)
                    labels += [t for _, targets in batches for t in targets.tolist()]
                assert len(labels) == 4 * 200
                share[sampler] = labels.count(1) / len(labels)
            assert share["instance"] == 0.1, share                  # every image once per epoch
            assert abs(share["class-balanced"] - 0.5) < 0.06, share  # 800 draws: std 0.018
            # the hybrid network: its contrastive stream instance-sampled, its CE stream class-balanced
            args = train.parse_args(["--dataset", "npz", "--data-path", npz, "--batch-size", "50", "--workers", "0",
                                     "--loader", loader, "--loss", "hybrid-sc", "--device", "cpu"])
            batches, order = _train_loader(args, utils.build_datasets_from_args(args)[0])
            con, ce = [], []
            for epoch in range(4):
                order.set_epoch(epoch)
                for (_, con_labels), (_, ce_labels) in batches:
                    con, ce = con + con_labels.tolist(), ce + ce_labels.tolist()
            assert con.count(1) / len(con) == 0.1 and abs(ce.count(1) / len(ce) - 0.5) < 0.06, (loader, con, ce)
    assert _try_parse(["--loss", "hybrid-sc", "--sampler", "class-balanced"])[1].startswith(
        "error: --sampler applies only with")


def test_class_balanced_sampler_balances_classes_and_resumes():
    targets = [0] * 600 + [1] * 60 + [2] * 6 + [4] * 1  # class 3 absent
    sampler = data.ClassBalancedSampler(targets, seed=3, num_samples=20000)
    drawn = [index for index, _ in sampler]
    classes = np.bincount([targets[i] for i in drawn], minlength=5)
    assert classes[3] == 0
    expected = 20000 / 4
    chi2 = sum((classes[c] - expected) ** 2 / expected for c in (0, 1, 2, 4))
    assert chi2 < 16.3, classes  # 3 degrees of freedom, p = 0.001
    within = np.bincount([i - 660 for i in drawn if targets[i] == 2], minlength=6)
    assert within.min() > 0.7 * within.mean()  # every image of the 6-image class is drawn about equally
    # an instance sampler on the same data is dominated by the head class
    instance = data.ResumableSampler(len(targets), seed=3)
    assert np.bincount([targets[i] for i, _ in instance], minlength=5)[0] > 0.85 * len(targets)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, 123)
    assert list(sampler) == full[123:]
    ranks = [data.ClassBalancedSampler(targets, 3, 20000, num_replicas=2, rank=r) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(2)
    merged = [pair for pairs in zip(*ranks) for pair in pairs]
    assert [i for i, _ in merged] == [i for i, _ in full] and len(ranks[0]) == 10000
    assert len({s for _, s in full}) == len(full)


# long-tailed labels: class 3 absent, class 4 two images, class 5 a single image
_LT_TARGETS = [0] * 400 + [1] * 150 + [2] * 40 + [4] * 2 + [5] * 1 + [6] * 7


def test_positives_sampler_groups_same_class_images_in_instance_proportion():
    """data.PositivesSampler: every global batch is groups of m images of one class (all of a
    smaller class), anchors in proportion to the class frequencies (class-balanced draws are
    far from them), len() and one-line errors."""
    targets, freq = _LT_TARGETS, np.bincount(_LT_TARGETS, minlength=7) / len(_LT_TARGETS)
    for m in (2, 4):
        B, G = 8 * m, 8
        sampler = data.PositivesSampler(targets, m, B, seed=5)
        drawn = []
        for epoch in range(3):
            sampler.set_epoch(epoch)
            items = list(sampler)
            assert len(items) == len(sampler) == (len(targets) // B) * B
            drawn += [i for i, _ in items]
            for k in range(0, len(items), B):
                batch = [i for i, _ in items[k:k + B]]
                for g in range(G):  # member j of group g at position g + G * j
                    group = [batch[g + G * j] for j in range(m)]
                    members = {i for i, y in enumerate(targets) if y == targets[group[0]]}
                    assert {targets[i] for i in group} == {targets[group[0]]}, group
                    assert len(set(group)) == m if len(members) >= m else set(group) == members, group
        share = np.bincount([targets[i] for i in drawn], minlength=7) / len(drawn)
        assert 0.5 * np.abs(share - freq).sum() < 0.06, share
    balanced = [i for i, _ in data.ClassBalancedSampler(targets, seed=2, num_samples=len(drawn))]
    assert 0.5 * np.abs(np.bincount([targets[i] for i in balanced], minlength=7) / len(balanced) - freq).sum() > 0.3
    for bad in (dict(m=3, batch_size=10), dict(m=0, batch_size=10), dict(m=2, batch_size=1000)):
        with pytest_raises(ValueError) as e:
            data.PositivesSampler(targets, **bad)
        assert "\n" not in str(e[0])


def test_positives_sampler_resumes_and_shards_into_the_global_batch():
    """Draws depend only on (seed, epoch); set_epoch(e, start) gives the epoch's tail; the
    k-th batches of 2 ranks interleave into global batch k; seeds unique and disjoint from
    the other two samplers'."""
    targets = _LT_TARGETS
    a, b = data.PositivesSampler(targets, 2, 16, seed=3), data.PositivesSampler(targets, 2, 16, seed=3)
    b.set_epoch(5)
    list(b)
    a.set_epoch(2)
    b.set_epoch(2)
    full = list(a)
    assert list(b) == full
    for start in (1, 37, len(full)):
        a.set_epoch(2, start)
        assert list(a) == full[start:] and len(a) == len(full) - start
    ranks = [data.PositivesSampler(targets, 2, 16, seed=3, num_replicas=2, rank=r) for r in (0, 1)]
    for r in ranks:
        r.set_epoch(2)
    shares = [list(r) for r in ranks]
    for k in range(0, len(full), 16):
        interleaved = [p for pair in zip(shares[0][k // 2:k // 2 + 8], shares[1][k // 2:k // 2 + 8]) for p in pair]
        assert interleaved == full[k:k + 16]
    seeds = {}
    for name, sampler in (("positives", data.PositivesSampler(targets, 2, 16, 0)),
                          ("instance", data.ResumableSampler(len(targets), 0)),
                          ("balanced", data.ClassBalancedSampler(targets, 0))):
        seeds[name] = set()
        for epoch in range(3):
            sampler.set_epoch(epoch)
            s = [seed for _, seed in sampler]
            assert len(set(s)) == len(s) and not seeds[name] & set(s)
            seeds[name] |= set(s)
    assert not (seeds["positives"] & seeds["instance"] or seeds["positives"] & seeds["balanced"]
                or seeds["instance"] & seeds["balanced"])
    with tmpdir() as d:  # --positives M: the hybrid network's contrastive stream comes in same-class groups
        npz = _write_npz(os.path.join(d, "t.npz"), n_train=48, classes=12)
        for m, grouped in ((2, True), (0, False)):
            args = train.parse_args(["--dataset", "npz", "--data-path", npz, "--loss", "hybrid-sc", "--recipe", "none",
                                     "--batch-size", "12", "--positives", str(m)])
            loader, sampler = _train_loader(args, utils.build_datasets_from_args(args)[0])
            sampler.set_epoch(0)
            batches = [labels.tolist() for (_, labels), _ in loader]
            assert all(all(b.count(c) >= 2 for c in b) for b in batches) == grouped, (m, batches)
            contrastive, balanced = loader.loaders                  # two streams, one copy of the images
            assert contrastive.images.data_ptr() == balanced.images.data_ptr()


def test_probe_features_reads_a_checkpoint_every_way():
    """results/hybrid-cifar10lt-full/probe_features.py: nearest class mean against a loop over
    images and classes (a class with one image included); the "classifier" row of a tiny hybrid
    run, its fc set from class means so that predictions vary, is evaluate.py's top-1 and
    class-balanced top-1 (train.evaluate, other code); on a balanced training set the log prior is flat, so
    subtracting it changes no prediction; BatchNorm statistics re-estimated as the plain average of
    the batches'; the SC loss floor of a batch whose make-up is fixed."""
    path = os.path.join(HERE, "results", "hybrid-cifar10lt-full", "probe_features.py")
    spec = importlib.util.spec_from_file_location("probe_features", path)
    probe = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(probe)
    g = torch.Generator().manual_seed(0)
    train_feat, test_feat = torch.randn(30, 5, generator=g), torch.randn(12, 5, generator=g)
    train_labels = torch.tensor([0] * 20 + [1] * 9 + [2])
    expected = []
    for x in test_feat.tolist():
        cosines = []
        for c in range(3):
            members = [[v / math.sqrt(sum(u * u for u in f)) for v in f]
                       for f, y in zip(train_feat.tolist(), train_labels.tolist()) if y == c]
            mean = [sum(col) / len(members) for col in zip(*members)]
            cosines.append(sum(a * b for a, b in zip(x, mean)) / math.sqrt(sum(a * a for a in x) * sum(b * b for b in mean)))
        expected.append(cosines.index(max(cosines)))
    assert probe.ncm(train_feat, train_labels, test_feat, 3).tolist() == expected
    # BN re-estimation: the running mean is the mean of the batches' means, the running var of their unbiased vars
    batches = [torch.randn(4, 3, 2, 2, generator=g) * (i + 1) + i for i in range(3)]
    bn = probe.reestimate_bn(nn.Sequential(nn.BatchNorm2d(3)), batches)[0]
    assert not bn.training and torch.allclose(bn.running_mean, torch.stack([b.mean((0, 2, 3)) for b in batches]).mean(0))
    assert torch.allclose(bn.running_var, torch.stack([b.transpose(0, 1).flatten(1).var(1) for b in batches]).mean(0))
    # the SC floor: a batch of the whole set always holds 3 + 1 images, 6 + 2 views: (6 log 5 + 2 log 1) / 8; the
    # loss reaches it when every view of a class is one unit vector and the classes are orthogonal (tau small)
    assert math.isclose(probe.sc_floor([0, 0, 0, 1], 4, draws=3), 6 * math.log(5) / 8)
    at_floor = F.one_hot(torch.tensor([0, 0, 0, 1]), 3).float()[:, None].expand(4, 2, 3)   # (B, 2 views, d)
    assert math.isclose(losses.SupConLoss(0.01)(at_floor, torch.tensor([0, 0, 0, 1])).item(),
                        probe.sc_floor([0, 0, 0, 1], 4, draws=3), rel_tol=1e-5)
    with tmpdir() as d:
        rng = np.random.default_rng(0)
        brightness = lambda n: np.clip((np.arange(n) % 4)[:, None, None, None] * 70  # noqa: E731 (class c: 70 c + noise)
                                       + rng.integers(0, 60, (n, 32, 32, 3)), 0, 255).astype(np.uint8)
        npz = _write_npz(os.path.join(d, "t.npz"), n_train=40, n_test=20, classes=4,
                         x_train=brightness(40), x_test=brightness(20))
        out = os.path.join(d, "r")
        assert train.main(train.parse_args(["--dataset", "npz", "--data-path", npz, "--model", "resnet20",
                                            "--loss", "hybrid-sc", "--batch-size", "8", "--workers", "0",
                                            "--iters", "3", "--output-dir", out])) == 0
        checkpoint = os.path.join(out, "checkpoint.pth")
        state = torch.load(checkpoint, weights_only=True)  # 3 steps teach the fc nothing: one from class means of r
        model = train.build_model_from_args(argparse.Namespace(**state["args"]), 4, load_weights=False)
        model.load_state_dict(state["model"])
        train_set = utils.build_datasets_from_args(argparse.Namespace(**state["args"]))[0]
        r = probe.outputs(model.eval(), train_set, "cifar")[0]["embedding"]                 # (40, 64)
        means = torch.stack([r[c::4].mean(0) for c in range(4)])                          # (4, 64)
        state["model"]["backbone.fc.weight"] = means                                      # nearest mean, Euclidean
        state["model"]["backbone.fc.bias"] = -0.5 * (means ** 2).sum(1)
        torch.save(state, checkpoint)
        _, args, table = probe.probe(checkpoint)
        views = next(probe.training_stream(args, train_set))
        assert views.shape == (16, 3, 32, 32) and next(probe.training_stream(args, train_set, both=True)).shape[0] == 24
        separate = probe.training_stream(args, train_set, both=True, shared=False)   # a pass per branch
        assert [len(next(separate)) for _ in range(4)] == [16, 8, 16, 8] and not probe.shared_pass(checkpoint)
        old = subprocess.run(["git", "-C", HERE, "rev-parse", "--verify", "-q", "0e5ddf8^{commit}"], capture_output=True,
                             text=True).stdout  # a commit of the shared-pass code, where history is at hand
        if old:
            with open(os.path.join(out, "pinned_commit"), "w") as f:
                f.write(old)
            assert probe.shared_pass(checkpoint)
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert evaluate.main(evaluate.get_args_parser().parse_args(
                ["--checkpoint", checkpoint, "--json", "--workers", "0", "--device", "cpu"])) == 0
        result = json.loads(printed.getvalue().splitlines()[-1])
    top1, _, _, few = table["classifier"]  # 10 training images a class: every class is few-shot
    assert 0 < min(result["per_class"].values()) and math.isclose(top1, result["top1"]), (table, result)
    assert math.isclose(few, result["balanced_top1"])
    reads = ["classifier", "classifier - log prior", "NCM on r", "NCM on z"]
    assert list(table) == reads + ["BN re-estimated: " + r for r in reads] + [
        "(training images)", "BN re-estimated over both streams: classifier", "SC loss floor"]
    assert table["classifier - log prior"] == table["classifier"]


@contextlib.contextmanager
def pytest_raises(kind):
    """A tiny pytest.raises: yields a list that receives the exception."""
    caught = []
    try:
        yield caught
    except kind as e:
        caught.append(e)
    assert caught, f"{kind.__name__} not raised"


def test_copyable_modules_name_the_write_ups_not_seed_numbers():
    for name in ("models.py", "losses.py", "data.py"):
        text = open(os.path.join(HERE, name), encoding="utf-8").read()
        assert not re.search(r"\b[Ss]eeds? 00[0-4]\b", text), name
    assert "(Eq. 3)" in losses.SupConLoss.__doc__ and "(Eq. 4)" in losses.PSCLoss.__doc__
    assert "Tong" in losses.ContrastiveCenterLoss.__doc__ and "Tong" in losses.JointSupervisionLoss.__doc__


def test_hybrid_views_and_inat_fixture():
    plain, two = data.hybrid_transforms("cifar", 32)
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (32, 32, 3), dtype=np.uint8))
    assert plain(image).shape == (3, 32, 32) and two(image).shape == (2, 3, 32, 32)
    with tmpdir() as d:
        files = []
        for k, (split, cat) in enumerate((("train", 7), ("train", 3), ("train", 7), ("val", 3), ("val", 7))):
            path = os.path.join("train_val2018", str(cat), f"{k}.jpg")
            os.makedirs(os.path.join(d, os.path.dirname(path)), exist_ok=True)
            Image.new("RGB", (8, 8), (k * 40, 0, 0)).save(os.path.join(d, path))
            files.append((split, k, path, cat))
        for split in ("train", "val"):
            rows = [f for f in files if f[0] == split]
            with open(os.path.join(d, f"{split}2018.json"), "w") as f:
                json.dump({"images": [{"id": k, "file_name": p} for _, k, p, _ in rows],
                           "annotations": [{"image_id": k, "category_id": c} for _, k, _, c in rows],
                           "categories": [{"id": 3, "name": "three"}, {"id": 7, "name": "seven"}]}, f)
        train_set, test_set, K = data.build_datasets("inat", d, image_size=8)
        assert K == 2 and train_set.classes == ["three", "seven"]
        assert train_set.targets == [1, 0, 1] and test_set.targets == [0, 1]
        assert train_set[0][0].shape == (3, 8, 8)
        os.remove(os.path.join(d, "val2018.json"))
        try:
            data.build_datasets("inat", d)
        except data.DataError as e:
            assert "val2018.json" in str(e) and "\n" not in str(e)
        else:
            raise AssertionError("missing val2018.json must raise DataError")


def test_hybrid_training_many_medium_few_and_resume():
    with tmpdir() as d:
        npz = _write_npz(os.path.join(d, "t.npz"), n_train=48, n_test=12)
        common = ["--dataset", "npz", "--data-path", npz, "--imbalance-ratio", "4", "--model", "resnet20",
                  "--batch-size", "8", "--workers", "0", "--epochs", "2", "--milestones", "--lr", "0.05",
                  "--many-threshold", "8", "--few-threshold", "5", "--print-freq", "1"]
        for loss in ("hybrid-sc", "hybrid-mpsc"):
            out = os.path.join(d, loss)
            assert train.main(train.parse_args(common + ["--loss", loss, "--output-dir", out])) == 0
            rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
            assert [r["alpha"] for r in rows] == [1.0, 0.75]
            assert all(k in rows[-1] for k in ("test_many_top1", "test_medium_top1", "test_few_top1"))
            assert rows[-1]["train_con"] > 0 and "train_ce" in rows[-1]
        ckpt = torch.load(os.path.join(d, "hybrid-mpsc", "checkpoint.pth"), weights_only=True)
        assert ckpt["criterion"]["contrastive.prototypes"].shape == (4 * 4, 128)
        # evaluate.py regroups the same checkpoint under other thresholds; the groups follow the train counts
        for many, few in ((8, 5), (3, 2)):
            out = io.StringIO()
            with contextlib.redirect_stdout(out):
                assert evaluate.main(evaluate.get_args_parser().parse_args(
                    ["--checkpoint", os.path.join(d, "hybrid-mpsc", "checkpoint.pth"), "--json", "--workers", "0",
                     "--device", "cpu", "--many-threshold", str(many), "--few-threshold", str(few)])) == 0
            result = json.loads(out.getvalue())
            counts, acc = list(result["train_counts"].values()), list(result["per_class"].values())
            assert counts == [12, 7, 4, 3], counts  # 12 per class cut at ratio 4: 12 * 4^(-i/3)
            for group, keep in (("many", lambda n: n > many), ("few", lambda n: n < few)):
                members = [a for n, a in zip(counts, acc) if keep(n)]
                expected = sum(members) / len(members) if members else None
                assert result[f"{group}_top1"] == expected or abs(result[f"{group}_top1"] - expected) < 1e-9
        # interrupted after iteration 3 and resumed: the same final weights as the uninterrupted run
        cut = os.path.join(d, "cut")
        args = common + ["--loss", "hybrid-sc", "--output-dir", cut]
        epochs_at = args.index("--epochs")  # --iters replaces --epochs (passing both is an error)
        assert train.main(train.parse_args(args[:epochs_at] + args[epochs_at + 2:] + ["--iters", "3"])) == 0
        resumed = train.parse_args(args + ["--resume", "auto"])
        assert train.main(resumed) == 0
        a = torch.load(os.path.join(cut, "checkpoint.pth"), weights_only=True)["model"]
        b = torch.load(os.path.join(d, "hybrid-sc", "checkpoint.pth"), weights_only=True)["model"]
        assert all(torch.equal(a[k], b[k]) for k in a)


def _parse_error(argv):
    buffer = io.StringIO()
    with contextlib.redirect_stderr(buffer):
        try:
            train.parse_args(argv)
        except SystemExit as e:
            assert e.code == 2
            return buffer.getvalue()
    raise AssertionError(f"{argv} parsed without error")


# Contexts for the flag table: argv prefixes (and environment) that switch WHEN conditions on and off.
_FLAG_CONTEXTS = [[], ["--recipe", "none"], ["--dataset", "npz"], ["--loss", "joint"], ["--loss", "center"],
                  ["--loss", "hybrid-sc"], ["--loss", "hybrid-mpsc"], ["--loss", "hybrid-sc", "--alpha-schedule", "const"],
                  ["--loss", "mksmt"], ["--deep-sup", "1"], ["--deep-sup", "1", "--aux-decay", "step"],
                  ["--probe-gradients", "2"], ["--model", "plain20"], ["--dataset", "lfw"], ["--dataset", "cub"],
                  ["--warmup-iters", "5"], ["--recipe", "none", "--iters", "10"], ["--recipe", "none", "--milestones"],
                  ["--val-split", "0.1"], ["WORLD_SIZE=2"]]
# Out-of-range and in-range values per range (the words of train.py's ranged types), from the range's meaning.
_RANGE_VALUES = {"> 0": (["0", "-1"], "0.5"), ">= 0": (["-1"], "2"), ">= 1": (["0"], "2"), ">= 2": (["1"], "2"),
                 "in [0, 1]": (["-0.1", "1.5"], "0.5"), "in [0, 1)": (["-0.1", "1"], "0.5"),
                 "in (0, 1]": (["0", "1.5"], "0.5"), "in [0, 2**32)": (["-1", str(2 ** 32)], "1"),
                 ">= 16": (["8"], "32"), "stage indices >= 0 in increasing order": (["2,1", "-1"], "1"),
                 "numbers >= 0 in increasing order": ([["3", "2"], ["-1"]], ["2", "3"])}
_GOOD_VALUE = {"many_threshold": "200", "heads": "1,2", "data_path": "x", "weights": "x.pth", "output_dir": "o",
               "resume": "auto", "device": "cpu", "multistep": "2"}


def _try_parse(argv):
    """(parsed args or None, stderr)."""
    env = [a for a in argv if a.startswith("WORLD_SIZE=")]
    argv = [a for a in argv if not a.startswith("WORLD_SIZE=")]
    buffer, saved = io.StringIO(), os.environ.get("WORLD_SIZE")
    if env:
        os.environ["WORLD_SIZE"] = env[0].split("=")[1]
    try:
        with contextlib.redirect_stderr(buffer):
            return train.parse_args(argv), ""
    except SystemExit as e:
        assert e.code == 2
        return None, buffer.getvalue()
    finally:
        if env:
            os.environ.pop("WORLD_SIZE") if saved is None else os.environ.update(WORLD_SIZE=saved)


def test_readme_commands_parse():
    """Every train.py / evaluate.py command in README's code blocks is accepted by its
    parser (recipes, flag groups and ranges included), so the front page cannot drift
    from the flags. "..." stands for the reader's own flags and is dropped."""
    parsers = {"train.py": train.parse_args, "evaluate.py": lambda argv: evaluate.get_args_parser().parse_args(argv)}
    seen = {name: 0 for name in parsers}
    with open(os.path.join(HERE, "README.md")) as f:
        text = f.read().replace("\\\n", " ")  # a command continued with a backslash is one line
    lines = [line for line in text.splitlines() if line.startswith("    ")]  # indented code blocks
    for line in lines:
        words = [w for w in shlex.split(line, comments=True) if w != "..."]
        script = next((w for w in words if w in parsers), None)
        if script is None:
            continue
        stderr, saved = io.StringIO(), os.environ.get("WORLD_SIZE")
        if words[0] == "torchrun":
            os.environ["WORLD_SIZE"] = "2"  # what torchrun sets; flags such as --sync-bn check it
        try:
            with contextlib.redirect_stderr(stderr):
                parsers[script](words[words.index(script) + 1:])
        except SystemExit:
            raise AssertionError(f"README: {line.strip()}: {stderr.getvalue().strip()}") from None
        finally:
            os.environ.pop("WORLD_SIZE", None) if saved is None else os.environ.update(WORLD_SIZE=saved)
        seen[script] += 1
    assert seen["train.py"] >= 10 and seen["evaluate.py"] >= 2, seen


def test_every_flag_is_used_or_rejected_and_range_checked():
    """From train.get_args_parser(): a flag of a conditional argument group is accepted
    in some context and rejected in another with one line naming it; a flag outside
    them is never called unused; each ranged type rejects values just outside its
    range (one line naming the flag) and accepts one inside."""
    parser = train.get_args_parser()
    conditions = utils.flag_conditions(parser)
    actions = {a.dest: a for a in parser._actions if a.option_strings and a.dest != "help"}
    assert set(conditions) < set(actions) and len(conditions) > 20
    for dest, action in actions.items():
        flag, words = action.option_strings[-1], getattr(action.type, "words", None)

        def typed(value):
            if action.nargs == 0:
                return [flag]
            return [flag, *value] if isinstance(value, list) else [flag, value]

        if dest in _GOOD_VALUE:
            good = _GOOD_VALUE[dest]
        elif words is not None:
            good = _RANGE_VALUES[words][1]
        elif action.choices:
            good = next((c for c in action.choices if c != action.default), action.default)
        else:
            good = str(action.default)
        accepted, unused = None, None
        for context in _FLAG_CONTEXTS:
            args, err = _try_parse(context + typed(good))
            if args is not None and accepted is None:
                accepted = context
            if err.startswith(f"error: {flag} applies only with"):  # (a context's own flag may clash too)
                assert err.count("\n") == 1, err
                unused = context
        assert accepted is not None, (flag, good)
        assert (unused is None) == (dest not in conditions), (flag, unused)
        if words is not None:
            for bad in _RANGE_VALUES[words][0]:
                args, err = _try_parse(accepted + typed(bad))
                assert args is None and err.startswith(f"error: {flag} must be {words}") \
                    and err.count("\n") == 1, (flag, bad, err)
    for argv, flag in ((["--loss", "ce", "--multistep", "2", "--kd", "decision"], "--multistep"),
                       (["--lr", "-1"], "--lr"), (["--recipe", "none", "--tau", "0.2"], "--tau"),
                       (["--recipe", "none", "--lambda", "0.1"], "--lambda"), (["--aux-weight", "0.1"], "--aux-weight"),
                       (["--dataset", "npz", "--download"], "--download"), (["--temperature", "4"], "--temperature"),
                       (["--recipe", "hybrid-sc-cifar10lt", "--loss", "ce", "--tau", "0.2"], "--tau")):
        args, err = _try_parse(argv)
        assert args is None and err.startswith(f"error: {flag} ") and err.count("\n") == 1, (argv, err)


def test_recipes_and_flag_combinations():
    args = train.parse_args(["--recipe", "hybrid-psc-cifar10lt"])
    assert (args.loss, args.tau, args.batch_size, args.lr, args.epochs, args.milestones, args.imbalance_ratio) == \
        ("hybrid-psc", 1.0, 512, 0.5, 200, [120, 160], 100.0)
    assert train.parse_args(["--recipe", "hybrid-inat"]).alpha_schedule == "linear"
    args = train.parse_args(["--recipe", "mksmt-cub"])
    assert (args.model, args.heads, args.multistep, args.temperature) == ("swin_l", [2, 3], 2, 1.0)
    # MKSMT's baseline: plain Swin-L trained alike, differing only in the method (and the default for a Swin on CUB)
    plain = train.parse_args(["--dataset", "cub", "--loss", "ce", "--model", "swin_l"])
    method_flags = {"loss", "heads", "head_width", "multistep", "kd", "temperature", "lambda1", "lambda2"}
    assert plain.recipe == "mksmt-cub-baseline" and plain.loss == "ce"
    assert {k: v for k, v in vars(plain).items() if k not in method_flags | {"recipe", "recipe_matched"}} == \
        {k: v for k, v in vars(args).items() if k not in method_flags | {"recipe", "recipe_matched"}}
    assert train.parse_args(["--dataset", "cub", "--loss", "ce"]).recipe == "cub-joint"  # a CNN: Tong's protocol
    assert train.parse_args(["--loss", "mksmt", "--multistep", "3"]).heads == [0, 1, 2]  # resnet32: 3 stages
    for argv, fragment in ((["--loss", "mksmt", "--multistep", "3", "--heads", "1,2"], "needs 3 --heads"),
                           (["--heads", "1,2"], "--heads applies only with --loss mksmt"),
                           (["--loss", "hybrid-psc", "--num-prototypes", "3"], "hybrid-mpsc"),
                           (["--imbalance-ratio", "0.5"], ">= 1"),
                           (["--loss", "center", "--amp", "fp16"], "shrink Wen's center step"),
                           (["--few-threshold", "200"], "above --many-threshold")):
        message = _parse_error(argv)
        assert fragment in message and message.count("\n") == 1, message
    args, err = _try_parse(["--probe-gradients", "2", "WORLD_SIZE=2"])  # torchrun's environment
    assert args is None and "in one process" in err and err.count("\n") == 1, err


def test_losses_ignore_autocast_and_compute_in_float32():
    torch.manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(16, 2, 32), dim=2)
    y = torch.randint(0, 4, (16,))
    for loss, inputs in ((losses.SupConLoss(0.1), (z, y)), (losses.PSCLoss(4, 32, 0.1, 2), (z, y)),
                         (losses.ContrastiveCenterLoss(4, 32), (z[:, 0] * 3, y))):
        want = loss(*inputs)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = loss(*(x.bfloat16() if x.is_floating_point() else x for x in inputs))
        exact = loss(*(x.bfloat16().float() if x.is_floating_point() else x for x in inputs))
        assert got.dtype == torch.float32 and abs(got.item() - exact.item()) < 1e-5, (type(loss).__name__, got, exact)
        assert abs(got.item() - want.item()) < 0.05


def _opm_params_by_hand(C, m, f, K):
    """OPM parameters from its layer list, not from the code: conv1x1 C->m (no bias) + BN(m);
    conv3x3 m->2m (no bias) + BN(2m); BN1d(2m); Linear 2m->f; BN1d(f); Linear f->K."""
    return (C * m + 2 * m) + (9 * m * 2 * m + 2 * 2 * m) + 2 * 2 * m + (2 * m * f + f) + 2 * f + (f * K + K)


def test_swin_l_heads_add_about_1_1_percent_at_the_default_width():
    """Yu et al.: the output heads add 1.1% parameters to Swin-L. Counted on the meta device
    (no memory) at K = 200 (CUB) with heads on S3 and S4; PMG's width 512 stays available
    and gives the old model (206,879,396 parameters, +5.93%)."""
    def count(**kw):
        with torch.device("meta"):
            return models.count_parameters(models.build_model("swin_l", 200, image_size=224, **kw))
    backbone, own_fc = count(), 1536 * 200 + 200
    assert backbone == 195_302_876
    overhead = 100 * (count(heads=[2, 3]) / backbone - 1)
    assert 0.9 <= overhead <= 1.3 and models.default_head_width("swin_l") == models.SWIN_HEAD_WIDTH, overhead
    assert count(heads=[2, 3], head_width=512) == 206_879_396
    for width in (models.SWIN_HEAD_WIDTH, 512):
        hand = sum(_opm_params_by_hand(C, width, width, 200) for C in (768, 1536))
        assert count(heads=[2, 3], head_width=width) - backbone + own_fc == hand, width
    assert models.default_head_width("resnet32") == 64 and models.default_head_width("resnet50") == 512
    # an old MKSMT checkpoint of a Swin (head_width None, then 512) is rebuilt at 512
    old = argparse.Namespace(**{**vars(train.parse_args(["--recipe", "mksmt-cub"])), "head_width": None})
    with torch.device("meta"):
        model = train.build_model_from_args(old, 200, load_weights=False)
    assert model.heads[0].conv[0][0].out_channels == 512


# ----------------------------------------------------------------------------------
# MKSMT training (seed 002, Algorithm 2)
# ----------------------------------------------------------------------------------
def _mksmt_args(*extra):
    return train.parse_args(["--loss", "mksmt", "--model", "resnet20", "--head-width", "8", *extra])


def test_run_stages_stops_early_and_heads_read_the_stages():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    for name in ("resnet20", "mobilenet_v2"):
        model = models.build_model(name, 5, image_size=32).eval()
        full = model(x)["stages"]
        for upto in range(len(full)):
            part = model.run_stages(x, upto)
            assert len(part) == upto + 1 and all(torch.equal(p, f) for p, f in zip(part, full))
    heads = models.build_model("resnet20", 5, heads=[1, 2], head_width=8).eval()
    out, early = heads(x), heads(x, upto=1)
    assert out["head_stages"] == [1, 2] and early["head_stages"] == [1]
    assert torch.equal(out["logits"], out["head_logits"][1]) and torch.equal(early["logits"], out["head_logits"][0])
    assert not any(k.startswith("backbone.fc.") for k in heads.state_dict())  # the OPM replaces the classifier


def test_step_one_leaves_the_last_stage_and_its_head_bit_identical():
    torch.manual_seed(0)
    args = _mksmt_args("--wd", "0.1", "--momentum", "0.9")
    model = models.build_model("resnet20", 4, heads=[1, 2], head_width=8)
    optimizer = train.build_optimizer(args, model, None)
    images, labels = torch.randn(6, 3, 32, 32), torch.tensor([0, 1, 2, 3, 0, 1])
    _mksmt_step(model, optimizer, images, labels, args)  # momentum buffers now exist everywhere
    deep = {n: p.detach().clone() for n, p in model.named_parameters()
            if n.startswith(("backbone.groups.2.", "heads.1."))}
    shallow = {n: p.detach().clone() for n, p in model.named_parameters() if n.startswith("backbone.groups.1.")}
    out = model(images, upto=1)
    assert utils.backward_and_step(optimizer, F.cross_entropy(out["logits"], labels))  # step (a)
    for n, p in model.named_parameters():
        if n in deep:
            assert torch.equal(p, deep[n]), f"step (a) moved {n}"
        if n in shallow:
            assert not torch.equal(p, shallow[n]), f"step (a) left {n}"
    # with zero gradients instead of None, weight decay and momentum would move them
    optimizer.zero_grad(set_to_none=False)
    model(images, upto=1)["logits"].sum().backward()
    for p in model.parameters():
        if p.grad is None:
            p.grad = torch.zeros_like(p)
    optimizer.step()
    assert any(not torch.equal(p, deep[n]) for n, p in model.named_parameters() if n in deep)


def _mksmt_step(model, optimizer, images, labels, args):
    """train.py's MKSMT step with the settings of ``args``, on the CPU."""
    return train.bind_step(args, model, None, optimizer, None, torch.device("cpu"))((images, labels))


def test_multistep_counts_updates_and_kd_variants():
    images, labels = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 1])
    for extra, steps, heads in ((["--multistep", "2"], 2, [1, 2]), (["--multistep", "2", "--kd-exec", "async"], 3, [1, 2]),
                                (["--multistep", "1"], 1, [1, 2]), (["--multistep", "3"], 3, [0, 1, 2]),
                                (["--multistep", "2", "--kd", "feature"], 2, [1, 2]),
                                (["--multistep", "2", "--kd", "none"], 2, [1, 2])):
        torch.manual_seed(0)
        args = _mksmt_args(*extra)
        assert args.heads == heads
        model = models.build_model("resnet20", 3, heads=heads, head_width=8)
        optimizer = train.build_optimizer(args, model, None)
        calls = []
        step = optimizer.step
        optimizer.step = lambda *a, **k: (calls.append(1), step(*a, **k))[1]
        loss, parts, finite = _mksmt_step(model, optimizer, images, labels, args)
        assert finite and len(calls) == steps, (extra, len(calls))
        assert set(parts) == {f"ce_s{s}" for s in heads} | {"kd", "top1"}   # top1: the deepest head's
        assert (parts["kd"].item() == 0) == ("none" in extra)
        logged = sum(parts[f"ce_s{s}"] for s in (heads if "1" in extra else heads[-1:])) + parts["kd"]
        assert math.isclose(loss.item(), logged.item(), rel_tol=1e-6), extra   # L_total (async: both updates)


def _write_cifar10_batches(root, arrays):
    """torchvision's cifar-10-batches-py layout (pickled dicts, CHW rows) holding ``arrays``' images."""
    folder = os.path.join(root, "cifar-10-batches-py")
    os.makedirs(folder)
    rows = {k: np.ascontiguousarray(v.transpose(0, 3, 1, 2)).reshape(len(v), -1) for k, v in arrays.items()
            if k.startswith("x_")}
    parts = np.array_split(np.arange(len(rows["x_train"])), 5)
    batches = {f"data_batch_{i + 1}": (rows["x_train"][p], arrays["y_train"][p]) for i, p in enumerate(parts)}
    batches["test_batch"] = rows["x_test"], arrays["y_test"]
    for name, (x, y) in batches.items():
        with open(os.path.join(folder, name), "wb") as f:
            pickle.dump({"data": x, "labels": [int(v) for v in y]}, f)
    with open(os.path.join(folder, "batches.meta"), "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)


def test_evaluate_on_another_copy_of_the_data():
    """A model trained on an npz copy of CIFAR-10 tested on torchvision's CIFAR-10 (--dataset
    cifar10 --data-path DIR) holding the same test pixels: the same numbers, at the training's
    normalisation (Wu's x*2/255-1 here, not CIFAR-10's default mean / std), grouped by the
    training counts the checkpoint holds (not the copy's). Other classes, or a copy from the
    other family of datasets, are one-line errors."""
    names = np.array([f"c{i}" for i in range(10)])
    with tmpdir() as d:
        npz = _write_npz(os.path.join(d, "t.npz"), n_train=20, n_test=10, classes=10)
        arrays = dict(np.load(npz), classes=names)
        np.savez(npz, **arrays)
        lt = dict(arrays, x_train=arrays["x_train"][:12], y_train=arrays["y_train"][:12])  # other training counts
        _write_cifar10_batches(d, lt)
        out = os.path.join(d, "r")
        assert train.main(train.parse_args(["--dataset", "npz", "--data-path", npz, "--model", "resnet20",
                                            "--normalize", "seed001", "--batch-size", "10", "--workers", "0",
                                            "--iters", "2", "--output-dir", out])) == 0
        checkpoint = os.path.join(out, "checkpoint.pth")
        assert torch.load(checkpoint, weights_only=True)["classes"] == list(names)

        def evaluated(*flags):
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                assert evaluate.main(evaluate.get_args_parser().parse_args(
                    ["--checkpoint", checkpoint, "--json", "--workers", "0", "--device", "cpu", *flags])) == 0
            return json.loads(printed.getvalue().splitlines()[-1])

        cifar = torchvision.datasets.cifar
        integrity, cifar.check_integrity = cifar.check_integrity, lambda *_: True  # not the real files' md5
        try:
            results = [evaluated(), evaluated("--dataset", "cifar10", "--data-path", d), evaluated("--dataset", "npz")]
            with open(os.path.join(d, "cifar-10-batches-py", "batches.meta"), "wb") as f:
                pickle.dump({"label_names": [f"other{i}" for i in range(10)]}, f)
            assert_data_error(lambda: evaluated("--dataset", "cifar10", "--data-path", d),
                              "has 10 classes (other0, other1, other2, ...); the model learned 10 (c0, c1, c2, ...)")
        finally:
            cifar.check_integrity = integrity
        assert_data_error(lambda: evaluated("--dataset", "lfw", "--data-path", d), "not a copy of what the model")
        logged = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
        assert [r["dataset"] for r in results] == ["npz", "cifar10", "npz"] and results[1]["data_path"] == d
        assert math.isclose(results[0]["loss"], logged["test_loss"], rel_tol=1e-6) and results[1]["n"] == 10
        for r in results[1:]:
            assert math.isclose(r["loss"], results[0]["loss"], rel_tol=1e-6), results
            assert r["per_class"] == results[0]["per_class"] and list(r["per_class"]) == list(names)
            assert r["train_counts"] == dict(zip(names, [2] * 10))  # the npz's 20, not the copy's 12


def test_evaluate_reports_every_head_and_flips():
    class LeftRight(torch.nn.Module):  # predicts class 1 when the left half is brighter
        head_stages = [0, 1]

        def forward(self, x):
            left, right = x[..., :2].mean((1, 2, 3)), x[..., 2:].mean((1, 2, 3))
            logits = torch.stack([right - left, left - right], 1)
            return {"logits": logits, "head_logits": [torch.zeros_like(logits), logits]}

    images = torch.zeros(4, 3, 4, 4)
    images[..., :2] = 1
    loader = [(images, torch.ones(4, dtype=torch.long))]
    plain = train.evaluate(LeftRight(), loader, torch.device("cpu"), 2)
    assert plain["top1"] == 100 and plain["head_top1_stage1"] == 100 and plain["head_top1_stage0"] == 0
    assert train.evaluate(LeftRight(), loader, torch.device("cpu"), 2, flip="h")["top1"] == 0
    assert train.evaluate(LeftRight(), loader, torch.device("cpu"), 2, flip="v")["top1"] == 100


def test_mksmt_train_and_evaluate_extras_end_to_end():
    with tmpdir() as d:
        npz = _write_npz(os.path.join(d, "t.npz"), n_train=16, n_test=8)
        out = os.path.join(d, "r")
        assert train.main(train.parse_args(["--dataset", "npz", "--data-path", npz, "--loss", "mksmt", "--model",
                                            "resnet20", "--head-width", "8", "--batch-size", "8", "--workers", "0",
                                            "--iters", "2", "--output-dir", out])) == 0
        row = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
        assert "test_head_top1_stage1" in row and "test_head_top1_stage2" in row
        r = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", os.path.join(out, "checkpoint.pth"),
                            "--json", "--flip", "v", "--complexity", "--gradcam", "2", "--gradcam-dir",
                            os.path.join(d, "cams"), "--workers", "0"], cwd=HERE, capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        result = json.loads(r.stdout.strip().splitlines()[-1])
        assert result["flip"] == "v" and result["complexity"]["params_overhead_percent"] > 0
        err = io.StringIO()
        with contextlib.redirect_stderr(err):                           # evaluate.py's command line, in-process
            code = utils.run_with_one_line_errors(evaluate.main, evaluate.get_args_parser().parse_args(
                ["--checkpoint", os.path.join(out, "checkpoint.pth"), "--gradcam-stages", "1"]))
        assert code == 2 and err.getvalue().startswith("error: --gradcam-stages needs --gradcam N") \
            and err.getvalue().count("\n") == 1, err.getvalue()
        assert_data_error(lambda: evaluate.write_gradcams(models.build_model("resnet20", 4), [(torch.zeros(3, 16, 16), 0)],
                                                          1, os.path.join(d, "none"), "cifar", torch.device("cpu"),
                                                          [0, 9]), "--gradcam-stages 9: this model has stages 0..2")
        assert not os.path.exists(os.path.join(d, "none"))                  # checked before the first PNG
        no_stage = evaluate.get_args_parser().parse_args(["--checkpoint", os.path.join(out, "checkpoint.pth"),
                                                         "--gradcam", "1", "--gradcam-stages", ""])
        assert_data_error(lambda: evaluate.main(no_stage), "at least one stage")
        for flag, value in (("--batch-size", "0"), ("--gradcam", "-1"), ("--workers", "-1")):
            err = io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.suppress(SystemExit):
                evaluate.get_args_parser().parse_args([flag, value])
            assert err.getvalue().startswith(f"error: {flag} must be") and err.getvalue().count("\n") == 1, err.getvalue()
        backbone = models.count_parameters(models.build_model("resnet20", 4))
        assert result["complexity"]["backbone"]["params"] == backbone
        assert sorted(os.listdir(os.path.join(d, "cams"))) == [f"stage{s}_{i:03d}.png" for s in (0, 1, 2) for i in (0, 1)]


# ----------------------------------------------------------------------------------
# Speed: tensor-resident loader, batched augmentation, benchmark.py, torchrun
# ----------------------------------------------------------------------------------
def _position_images(n, size=16):
    """n copies of a (3, size, size) uint8 image whose pixel (r, c) holds
    (r + 1, c + 1, 255), so a crop's offsets and flip can be read back."""
    r = torch.arange(1, size + 1, dtype=torch.uint8)
    image = torch.stack([r[:, None].expand(size, size), r[None, :].expand(size, size),
                         torch.full((size, size), 255, dtype=torch.uint8)])
    return image.expand(n, 3, size, size).contiguous()


def test_crop_offsets_uniform_and_flip_rate():
    n, size, pad = 20000, 16, 4
    out = data.batched_crop_flip(_position_images(n, size), pad, torch.Generator().manual_seed(0))
    assert out.shape == (n, 3, size, size) and out.dtype == torch.uint8
    mid = size // 2  # always inside the image, for any offset in 0..2*pad
    oy = out[:, 0, mid, mid].long() - 1 - mid + pad                   # padded row = output row + oy
    step = out[:, 1, mid, mid + 1].long() - out[:, 1, mid, mid].long()
    flipped = step == -1
    assert bool(((step == 1) | flipped).all())
    col = torch.where(flipped, torch.full_like(oy, size - 1 - mid), torch.full_like(oy, mid))
    ox = out[:, 1, mid, mid].long() - 1 - col + pad
    k = 2 * pad + 1
    for name, counts, bins, limit in (("y", torch.bincount(oy, minlength=k), k, 30.0),
                                      ("x", torch.bincount(ox, minlength=k), k, 30.0),
                                      ("joint", torch.bincount(oy * k + ox, minlength=k * k), k * k, 130.0)):
        assert len(counts) == bins, (name, counts)          # no offset outside 0..2*pad
        expected = n / bins
        chi2 = float(((counts - expected) ** 2 / expected).sum())
        assert chi2 < limit, (name, chi2, counts.tolist())  # p ~ 0.001 thresholds (8 / 80 dof)
    rate = flipped.float().mean().item()
    assert abs(rate - 0.5) < 0.015, rate
    # the zero padding shows where the crop leaves the image
    assert bool((out[oy == 0][:, :, :pad] == 0).all()) and bool((out[oy == 2 * pad][:, :, -pad:] == 0).all())


def test_crop_flip_matches_torchvision_functional():
    rng = np.random.default_rng(0)
    arrays = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    images = torch.from_numpy(arrays).permute(0, 3, 1, 2).contiguous()    # (6, 3, 32, 32)
    oy, ox = torch.tensor([0, 8, 3, 4, 8, 0]), torch.tensor([0, 8, 5, 4, 0, 8])
    flips = torch.tensor([False, True, True, False, False, True])
    out = data.crop_flip_with_params(images, oy, ox, flips, padding=4)
    for b in range(6):
        for image in (Image.fromarray(arrays[b]), images[b]):  # PIL path and tensor path
            want = TF.crop(TF.pad(image, 4, fill=0), int(oy[b]), int(ox[b]), 32, 32)
            want = TF.hflip(want) if flips[b] else want
            want = TF.pil_to_tensor(want) if isinstance(want, Image.Image) else want
            assert torch.equal(out[b], want), b
    # and batched_crop_flip = crop_flip_with_params with the parameters drawn from the same generator
    params = data.crop_flip_params(6, 4, torch.Generator().manual_seed(3))
    assert torch.equal(data.batched_crop_flip(images, 4, torch.Generator().manual_seed(3)),
                       data.crop_flip_with_params(images, *params, padding=4))


def _color_images():
    g = torch.Generator().manual_seed(0)
    x = torch.rand(6, 3, 8, 8, generator=g)
    x[0] = 0.5                                      # gray: hue undefined
    x[1, :, :4] = torch.tensor([1.0, 0.0, 0.0])[:, None, None]  # pure red / ties between channels
    x[2, 1] = x[2, 0]                               # r == g everywhere
    x[3, 2] = x[3, 1]                               # g == b everywhere
    return x


def test_color_ops_match_torchvision_functional():
    x = _color_images()
    factors = torch.tensor([0.6, 0.9, 1.0, 1.2, 1.4, 0.0])
    shifts = torch.tensor([-0.5, -0.1, 0.0, 0.05, 0.1, 0.5])
    for ours, theirs, f in ((data.batched_brightness, TF.adjust_brightness, factors),
                            (data.batched_contrast, TF.adjust_contrast, factors),
                            (data.batched_saturation, TF.adjust_saturation, factors),
                            (data.batched_hue, TF.adjust_hue, shifts)):
        out = ours(x, f)
        for b in range(len(x)):
            err = (out[b] - theirs(x[b], float(f[b]))).abs().max().item()
            assert err < 1e-5, (ours.__name__, b, err)
    gray = data.batched_rgb_to_gray(x)
    for b in range(len(x)):
        assert (gray[b] - TF.rgb_to_grayscale(x[b])).abs().max() < 1e-6
    # a whole jitter in a given order = torchvision's ops one after another
    order = [3, 0, 2, 1]
    fs = [torch.full((6,), 1.3), torch.full((6,), 0.7), torch.full((6,), 1.2), torch.full((6,), -0.08)]
    out = data.color_jitter_with_params(x, fs, order)
    ops = (TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue)
    for b in range(len(x)):
        want = x[b]
        for i in order:
            want = ops[i](want, float(fs[i][b]))
        assert (out[b] - want).abs().max() < 1e-5, b


def test_color_jitter_and_grayscale_probabilities_and_ranges():
    g = torch.Generator().manual_seed(0)
    n = 4000
    x = torch.rand(n, 3, 2, 2, generator=g) * 0.5 + 0.25
    factors = data.color_jitter_params(n, 0.4, 0.3, 0.2, 0.1, g)
    for f, (lo, hi) in zip(factors, ((0.6, 1.4), (0.7, 1.3), (0.8, 1.2), (-0.1, 0.1))):
        assert lo <= f.min() and f.max() <= hi and f.min() < lo + 0.01 and f.max() > hi - 0.01
        assert abs(f.mean().item() - (lo + hi) / 2) < 0.01
    assert data.color_jitter_params(4, 0.4, 0.0, 0.4, 0.0)[1] is None  # strength 0: op skipped
    kept = (data.batched_color_jitter(x, generator=g) == x).flatten(1).all(1).float().mean().item()
    assert abs(kept - 0.2) < 0.03, kept                 # RandomApply p=0.8
    out = data.batched_grayscale(x, p=0.2, generator=g)
    gray = ((out[:, 0] == out[:, 1]) & (out[:, 1] == out[:, 2])).flatten(1).all(1)
    assert abs(gray.float().mean().item() - 0.2) < 0.03
    assert torch.equal(out[~gray], x[~gray])


def _constant_dataset(n=40, size=12):
    """Image i is the constant colour (i, 2i, 255 - i); label i % 10."""
    arrays = np.zeros((n, size, size, 3), dtype=np.uint8)
    for i in range(n):
        arrays[i] = (i, 2 * i, 255 - i)
    return data.ArrayDataset(arrays, [i % 10 for i in range(n)], [str(k) for k in range(10)])


def test_normalize_uint8_matches_to_tensor_normalize():
    arrays = np.random.default_rng(0).integers(0, 256, (3, 5, 5, 3), dtype=np.uint8)
    batch = torch.from_numpy(arrays).permute(0, 3, 1, 2)
    out = data.normalize_uint8(batch, data.CIFAR_MEAN, data.CIFAR_STD)
    reference = T.Compose([T.ToTensor(), T.Normalize(data.CIFAR_MEAN, data.CIFAR_STD)])
    for b in range(3):
        assert (out[b] - reference(Image.fromarray(arrays[b]))).abs().max() < 1e-6


def test_resized_crop_equals_torchvision_functional_and_shards():
    """resized_crop_with_params is F.resized_crop (bilinear, no antialias) + hflip per
    sample, up- and downscaling; batched_resized_crop on rank r of N processes gives rank
    r's share of the one-process batch."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(8, 3, 50, 40, generator=g)
    top, left, h, w, flips = data.resized_crop_params(8, 50, 40, generator=g)
    top[0], left[0], h[0], w[0] = 0, 0, 50, 40                              # the whole image, shrunk
    top[1], left[1], h[1], w[1] = 49, 39, 1, 1                              # one pixel, blown up
    out = data.resized_crop_with_params(images, top, left, h, w, flips, 32)
    assert flips.any() and not flips.all()
    for b in range(8):
        want = TF.resized_crop(images[b], int(top[b]), int(left[b]), int(h[b]), int(w[b]), [32, 32],
                               T.InterpolationMode.BILINEAR, antialias=False)
        torch.testing.assert_close(out[b], TF.hflip(want) if flips[b] else want, rtol=0, atol=1e-5)
    whole = data.batched_resized_crop(images, 24, generator=torch.Generator().manual_seed(5))
    parts = [data.batched_resized_crop(images[r::2], 24, generator=torch.Generator().manual_seed(5), shard=(r, 2))
             for r in range(2)]
    assert torch.equal(whole[0::2], parts[0]) and torch.equal(whole[1::2], parts[1])


def test_resized_crop_params_follow_torchvision_get_params():
    """The boxes' distribution against T.RandomResizedCrop.get_params itself (20,000 draws
    each, on a square and a wide image: means within 2%), and the fallback when no try fits
    (scale above 1): torchvision's own centred box, exactly."""
    for height, width in ((250, 250), (60, 200)):
        g = torch.Generator().manual_seed(1)
        ours = torch.stack(data.resized_crop_params(20000, height, width, generator=g)[:4], 1).double()  # top, left, h, w
        torch.manual_seed(1)
        image = torch.zeros(1, height, width)
        theirs = torch.tensor([T.RandomResizedCrop.get_params(image, (0.08, 1.0), (3 / 4, 4 / 3))
                               for _ in range(20000)], dtype=torch.float64)   # i, j, h, w
        assert ((ours.mean(0) - theirs.mean(0)).abs() <= 0.02 * theirs.mean(0) + 0.5).all(), (ours.mean(0), theirs.mean(0))
        assert ((ours.std(0) - theirs.std(0)).abs() <= 0.03 * theirs.std(0) + 0.5).all(), (ours.std(0), theirs.std(0))
        q = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
        for stat in (lambda b: b[:, 3] / b[:, 2], lambda b: b[:, 2] * b[:, 3] / (height * width)):  # aspect, area
            assert (stat(ours).quantile(q) - stat(theirs).quantile(q)).abs().max() < 0.02, stat(ours).quantile(q)
        last = lambda b: ((b[:, 0] == height - b[:, 2]).double().mean(), (b[:, 1] == width - b[:, 3]).double().mean())
        assert all(abs(a - b) < 0.006 and b > 0.005 for a, b in zip(last(ours), last(theirs))), (last(ours), last(theirs))
        assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all()
        fallback = data.resized_crop_params(4, height, width, scale=(1.5, 2.0), generator=g)[:4]
        want = T.RandomResizedCrop.get_params(image, (1.5, 2.0), (3 / 4, 4 / 3))
        assert all(p.tolist() == [v] * 4 for p, v in zip(fallback, want)), (fallback, want)


def test_tensor_loader_on_an_lfw_folder():
    """--loader tensor on a file dataset: the images decoded once onto the device, each
    batch RandomResizedCrop-ped there (LFW's training transform), normalised; --loader auto
    keeps the DataLoader for files; a folder of mixed sizes is one DataError."""
    with tmpdir() as d:
        for name, n in (("Ann_A", 6), ("Bob_B", 6)):
            for i in range(1, n + 1):
                _jpeg(os.path.join(d, name, f"{name}_{i:04d}.jpg"))          # 40 x 40 grayscale
        flags = ["--dataset", "lfw", "--data-path", d, "--model", "resnet18", "--image-size", "24",
                 "--batch-size", "4", "--workers", "0", "--device", "cpu"]
        args = train.parse_args(flags + ["--loader", "tensor"])
        train_set = utils.build_datasets_from_args(args)[0]
        loader, sampler = _train_loader(args, train_set)
        assert isinstance(loader, data.TensorLoader) and loader.resized == (24, (0.08, 1.0), (3 / 4, 4 / 3))
        assert loader.images.shape == (10, 3, 40, 40) and loader.images.dtype == torch.uint8
        sampler.set_epoch(0)
        images, labels = next(iter(loader))
        assert images.shape == (4, 3, 24, 24) and labels.shape == (4,)
        m, s = (torch.tensor(v)[:, None, None] for v in data.NORMALIZATIONS["imagenet"])
        pixels = images * s + m
        assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5 and (pixels[:, 0] - pixels[:, 2]).abs().max() < 1e-5
        auto = train.parse_args(flags)
        assert not isinstance(_train_loader(auto, utils.build_datasets_from_args(auto)[0])[0], data.TensorLoader)
        assert train.main(train.parse_args(flags + ["--loader", "tensor", "--iters", "2",
                                                    "--output-dir", os.path.join(d, "run")])) == 0
        _jpeg(os.path.join(d, "Ann_A", "Ann_A_0007.jpg"), side=32)
        odd = utils.build_datasets_from_args(args)[0]
        assert_data_error(lambda: _train_loader(args, odd), "--loader tensor needs images of one size")


def test_tensor_loader_batches_shapes_and_normalisation():
    ds = _constant_dataset()
    mean, std = data.CIFAR_MEAN, data.CIFAR_STD
    sampler = data.ResumableSampler(len(ds), seed=1)
    loader = data.TensorLoader(ds, 8, "cpu", mean, std, sampler, seed=1)
    batches = list(loader)
    assert len(loader) == len(batches) == 5
    order = [i for i, _ in sampler]
    m, s = torch.tensor(mean)[:, None, None], torch.tensor(std)[:, None, None]
    for k, (images, labels) in enumerate(batches):
        assert images.shape == (8, 3, 12, 12) and images.dtype == torch.float32 and labels.dtype == torch.int64
        assert labels.tolist() == [ds.targets[i] for i in order[8 * k:8 * k + 8]]
        pixels = images * s + m                                  # back to [0, 1]
        for b, i in enumerate(order[8 * k:8 * k + 8]):
            colour = torch.tensor([i, 2 * i, 255 - i]) / 255
            centre = pixels[b, :, 6, 6]                          # inside the image for any crop
            assert (centre - colour).abs().max() < 1e-5, (k, b)
            is_pad = pixels[b].abs().amax(0) < 1e-5              # zero padding where the crop leaves the image
            is_img = (pixels[b] - colour[:, None, None]).abs().amax(0) < 1e-5
            assert bool((is_pad | is_img).all())
    assert sum(bool((images * s + m).abs().amax(1).lt(1e-5).any()) for images, _ in batches) > 0  # some padding
    # drop_last=False keeps the partial batch
    loose = data.TensorLoader(ds, 16, "cpu", mean, std, data.ResumableSampler(len(ds)), drop_last=False)
    assert len(loose) == 3 and [len(y) for _, y in loose] == [16, 16, 8]


def test_tensor_loader_resume_reproduces_batches():
    ds = _constant_dataset()
    mean, std = data.CIFAR_MEAN, data.CIFAR_STD
    sampler = data.ResumableSampler(len(ds), seed=2)
    loader = data.TensorLoader(ds, 8, "cpu", mean, std, sampler, seed=2, views=2, contrastive=True)
    sampler.set_epoch(3)
    full = list(loader)
    assert full[0][0].shape == (8, 2, 3, 12, 12)
    sampler.set_epoch(3, start=2 * 8)                   # resumed after 2 batches, new loader object
    resumed = list(data.TensorLoader(ds, 8, "cpu", mean, std, sampler, seed=2, views=2, contrastive=True))
    assert len(resumed) == 3
    for (a, y_a), (b, y_b) in zip(full[2:], resumed):
        assert torch.equal(a, b) and torch.equal(y_a, y_b)
    sampler.set_epoch(4)
    other = list(loader)
    assert not torch.equal(torch.cat([x for x, _ in other]), torch.cat([x for x, _ in full]))


def test_tensor_loader_views_differ_and_colour_only_on_view_one():
    n = 512
    arrays = np.random.default_rng(0).integers(0, 256, (n, 8, 8, 3), dtype=np.uint8)
    ds = data.ArrayDataset(arrays, [0] * n, ["0"])
    loader = data.TensorLoader(ds, n, "cpu", (0.0, 0.0, 0.0), (1.0, 1.0, 1.0), data.ResumableSampler(n),
                               views=2, contrastive=True)
    images, _ = next(iter(loader))                              # (n, 2, 3, 8, 8) in [0, 1]
    assert images.shape == (n, 2, 3, 8, 8) and not torch.equal(images[:, 0], images[:, 1])
    for view, jitter_rate in ((0, 0.8), (1, 0.0)):
        x = images[:, view]
        gray = ((x[:, 0] == x[:, 1]) & (x[:, 1] == x[:, 2])).flatten(1).all(1)   # (n,)
        off_grid = (x * 255 - (x * 255).round()).abs().amax(dim=(1, 2, 3)) > 1e-3  # crops keep uint8 values
        assert abs(gray.float().mean().item() - 0.2) < 0.06, (view, gray.float().mean())
        rate = off_grid[~gray].float().mean().item()             # jittered, among the non-gray images
        assert abs(rate - jitter_rate) < 0.08, (view, rate)


def test_hybrid_crop_pads_or_resizes_in_both_streams_and_both_loaders():
    """--hybrid-crop: pad (4 px of zeros, then a random 32-px crop) or SupContrast's
    RandomResizedCrop(32, scale 0.2-1), in the contrastive views and the CE batch, with the
    tensor loader and with the DataLoader. On all-white images only padding brings black."""
    n = 64
    ds = data.ArrayDataset(np.full((n, 32, 32, 3), 255, dtype=np.uint8), [i % 4 for i in range(n)], list("abcd"))
    for loader in ("tensor", "torch"):
        for crop in ("pad", "resized"):
            batches, _ = data.make_train_loader(ds, n, torch.device("cpu"), 0, loader=loader, workers=0,
                                                two_streams=True, hybrid_crop=crop, normalize="seed001")
            (views, _), (ce, _) = next(iter(batches))          # (n, 2, 3, 32, 32), (n, 3, 32, 32) in [-1, 1]
            plain_view_black, ce_black = (views[:, 1] < -0.99).any().item(), (ce < -0.99).any().item()
            assert plain_view_black == ce_black == (crop == "pad"), (loader, crop)
    ce_t, two = data.hybrid_transforms("cifar", 32, True, (32, 32), "resized")
    for pipeline in (ce_t, two.first, two.second):
        crop = next(t for t in pipeline.transforms if isinstance(t, (T.RandomCrop, T.RandomResizedCrop)))
        assert isinstance(crop, T.RandomResizedCrop) and tuple(crop.scale) == (0.2, 1.0)
    assert train.parse_args(["--recipe", "hybrid-sc-cifar10lt"]).hybrid_crop == "pad"   # the runs so far


def test_hybrid_ce_sampler_instance_draws_each_image_once_in_an_order_of_its_own():
    """--hybrid-ce-sampler instance: the CE batch visits every image once per epoch, in a
    shuffled order that is not the contrastive stream's, with sample seeds of its own;
    class-balanced (the default) draws with replacement."""
    n, b = 64, 16
    ds = data.ArrayDataset(np.zeros((n, 32, 32, 3), dtype=np.uint8), list(range(n)), [str(i) for i in range(n)])
    for loader in ("tensor", "torch"):
        for ce_sampler in ("instance", "class-balanced"):
            batches, sampler = data.make_train_loader(ds, b, torch.device("cpu"), 3, loader=loader, workers=0,
                                                      two_streams=True, ce_sampler=ce_sampler, normalize="seed001")
            sampler.set_epoch(1)
            pairs = [(con.tolist(), ce.tolist()) for (_, con), (_, ce) in batches]   # labels = image indices
            con_order, ce_order = sum((p[0] for p in pairs), []), sum((p[1] for p in pairs), [])
            assert sorted(con_order) == list(range(n)) and con_order != ce_order, (loader, ce_sampler)
            assert (sorted(ce_order) == list(range(n))) == (ce_sampler == "instance"), (loader, ce_sampler)
    first, second = data.ResumableSampler(n, 3), data.ResumableSampler(n, 3, stream=1)
    assert not {seed for _, seed in first} & {seed for _, seed in second}
    key = 3 * 1_000_003 + 0                                      # stream 0 draws as before the flag: (seed, epoch)
    before = torch.randperm(n, generator=torch.Generator().manual_seed(key)).tolist()
    assert list(first) == [(i, key * n + position) for position, i in enumerate(before)]


def test_tensor_loader_on_subsets_and_cifar():
    ds = _constant_dataset()
    assert data.can_use_tensor_loader(ds)
    subset = torch.utils.data.Subset(torch.utils.data.Subset(ds, list(range(10, 40))), [5, 0, 7, 29])
    images, labels = data.dataset_uint8(subset)
    assert images.shape == (4, 3, 12, 12) and images.dtype == torch.uint8
    assert images[:, 0, 0, 0].tolist() == [15, 10, 17, 39] and labels.tolist() == [5, 0, 7, 9]
    assert data.can_use_tensor_loader(subset)
    loader = data.TensorLoader(subset, 2, "cpu", (0, 0, 0), (1, 1, 1), data.ResumableSampler(4))
    assert sorted(y for _, labels in loader for y in labels.tolist()) == [0, 5, 7, 9]
    cifar = torchvision.datasets.CIFAR10.__new__(torchvision.datasets.CIFAR10)  # no files needed
    cifar.data, cifar.targets, cifar.transform = np.zeros((3, 32, 32, 3), np.uint8), [1, 2, 3], None
    assert data.can_use_tensor_loader(cifar) and data.dataset_uint8(cifar)[0].shape == (3, 3, 32, 32)
    resized = data.ArrayDataset(ds.images, ds.targets, ds.classes, data.cifar_transforms(image_size=64)[0])
    assert not data.can_use_tensor_loader(resized)
    assert not data.can_use_tensor_loader(data.FileListDataset([], ["a"]))


def test_benchmark_script_end_to_end():
    out = tempfile.mkdtemp(prefix="bench_")
    try:
        cmd = [sys.executable, os.path.join(HERE, "benchmark.py"), "--models", "resnet20", "--batch-size", "16",
               "--warmup", "1", "--windows", "2", "--steps-per-window", "1", "--no-losses", "--workers", "0",
               "--amp", "none,fp16", "--loaders", "torch,tensor,plain", "--image-size", "24", "--out", out]
        result = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "random uint8 24x24 images" in result.stdout
        files = os.listdir(out)
        assert len(files) == 1 and files[0].startswith("benchmark-") and files[0].endswith(".json"), files
        with open(os.path.join(out, files[0])) as f:
            report = json.load(f)
        cells = [c for c in report["cells"] if "median" in c]
        assert {c["loader"] for c in cells} == {"torch", "tensor", "plain"}
        for c in cells:
            assert len(c["img_per_s"]) == 2 and c["median"] > 0 and c["ratio"] > 0
            plain = [p for p in cells if p["loader"] == "plain" and p["amp"] == c["amp"]]
            assert ("vs_plain" in c) == (c["loader"] != "plain" and bool(plain)), c
            if "vs_plain" in c:
                assert math.isclose(c["vs_plain"], c["median"] / plain[0]["median"], abs_tol=1e-3)
        assert [c for c in cells if c["baseline"]][0]["ratio"] == 1.0
        if not torch.cuda.is_available():
            assert any("skipped" in c and c["amp"] == "fp16" for c in report["cells"])
        assert report["torch"] == torch.__version__ and report["losses"] == []
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_loss_benchmarks_run_and_agree():
    rows = benchmark.run_loss_benchmarks(batch_size=16, device=torch.device("cpu"), repeats=2)
    assert [r["name"] for r in rows] == [name for name, *_ in benchmark.LOSS_BENCHMARKS]
    for r in rows:
        assert r["rel_diff"] < 1e-4, r
        assert r["speedup"] > 0 and len(r["vectorised_s"]) == 2 and len(r["naive_s"]) >= 1


# ----------------------------------------------------------------------------------


# Every objective trained by 2 processes on batches of 4 and by 1 process on batches of 8, from the same
# data: the weights, centers and prototypes must agree after 3 steps (with momentum). Then, on the 2
# processes: a non-finite loss on one process only, and SIGTERM reaching the two at different steps.
_DDP_RUNS = {"ce": [], "ce-class-balanced": ["--sampler", "class-balanced"], "ce-torch-loader": ["--loader", "torch"],
             "joint": ["--loss", "joint"], "joint-mean": ["--loss", "joint", "--ctc-reduction", "mean"],
             "center-wen": ["--loss", "center", "--lr", "0.002"],  # BN held fixed: large features, so a small lr
             "center-autograd": ["--loss", "center", "--center-update", "autograd", "--lr", "0.002", "--center-lr", "0.05",
                                 "--ctc-reduction", "sum"],  # center-wen: the default mean
             "hybrid-sc": ["--loss", "hybrid-sc"], "hybrid-psc": ["--loss", "hybrid-psc", "--tau", "1"],
             "hybrid-mpsc": ["--loss", "hybrid-mpsc"],
             # two or three updates per batch without BN: at lr 0.05 rounding differences grow chaotically
             "mksmt": ["--loss", "mksmt", "--head-width", "8", "--lr", "0.005"],
             "mksmt-one-step": ["--loss", "mksmt", "--head-width", "8", "--multistep", "1", "--lr", "0.005"],
             "mksmt-three-step": ["--loss", "mksmt", "--head-width", "8", "--multistep", "3", "--lr", "0.005"],
             "mksmt-async": ["--loss", "mksmt", "--head-width", "8", "--kd-exec", "async", "--lr", "0.005"],
             "deep-sup": ["--deep-sup", "1", "--aux-dropout", "0"]}
_DDP_SCRIPT = """
import gc, json, os, signal, sys, torch, torch.distributed as dist
import train, utils
npz, out, runs = sys.argv[2], sys.argv[3], json.loads(sys.argv[4])
common = ["--dataset", "npz", "--data-path", npz, "--model", "resnet20", "--recipe", "none", "--workers", "0",
          "--lr", "0.05", "--milestones", "--print-freq", "1", "--device", "cpu", "--image-size", "16"]

hold_bn = [True]
def bn_held_in_eval_mode(self, mode=True):  # the OPM and auxiliary heads' BatchNorm: per-process batch
    torch.nn.Module.train(self, mode)         # statistics are DDP's documented behaviour, so hold BN fixed
    self.training = self.training and not hold_bn[0]
    return self
torch.nn.modules.batchnorm._BatchNorm.train = bn_held_in_eval_mode

build = train.build
def build_and_keep_initial(args, rank, world_size, device):  # one process: its starting weights, the scale of
    b = build(args, rank, world_size, device)                # the test's comparison (how far training moved them)
    if world_size == 1:
        os.makedirs(args.output_dir, exist_ok=True)
        torch.save({part: getattr(b, part).state_dict() if getattr(b, part) is not None else {}
                    for part in ("model", "criterion")},
                   os.path.join(args.output_dir, "initial.pth"))
    return b
train.build = build_and_keep_initial

def main(argv):
    return train.main(train.parse_args(common + argv))

def worker(rank, world, port):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(world), RANK=str(rank),
                      LOCAL_RANK=str(rank))
    if world > 1:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    batch = str(8 // world)
    codes = {name: main(extra + ["--iters", "3", "--batch-size", batch, "--output-dir", os.path.join(out, name)])
             for name, extra in runs.items()}
    if world > 1:
        # a NaN loss on rank 1 only, at its second step: every rank stops at the same line, exit code 3
        calls, step = [0], utils.backward_and_step
        def nan_on_rank_1(optimizer, loss, scaler=None):
            calls[0] += 1
            return step(optimizer, loss * float("nan") if rank == 1 and calls[0] == 2 else loss, scaler)
        utils.backward_and_step = nan_on_rank_1
        codes["nonfinite"] = main(["--iters", "3", "--batch-size", batch, "--output-dir", os.path.join(out, "nan")])
        utils.backward_and_step = step
        # SIGTERM reaches rank 0 after its first step, rank 1 after its second: both stop at iteration 2
        sigterm = ["--iters", "6", "--batch-size", batch, "--print-freq", "2", "--loss", "hybrid-sc"]
        codes["whole"] = main(sigterm + ["--output-dir", os.path.join(out, "whole")])
        end_step = utils.Run.end_step
        def signalled(self, meter, lr):
            if self.iteration == rank:
                os.kill(os.getpid(), signal.SIGTERM)
            return end_step(self, meter, lr)
        utils.Run.end_step = signalled
        codes["stopped"] = main(sigterm + ["--output-dir", os.path.join(out, "cut")])
        utils.Run.end_step = end_step
        codes["resumed"] = main(sigterm + ["--output-dir", os.path.join(out, "cut"), "--resume", "auto"])
        # BatchNorm training: each process ends with its own running statistics; the logged evaluation
        # must be the checkpoint's (rank 0's)
        hold_bn[0] = False
        codes["bn"] = main(["--iters", "3", "--batch-size", batch, "--output-dir", os.path.join(out, "bn")])
    json.dump(codes, open(os.path.join(out, f"codes{rank}.json"), "w"))
    if world > 1:  # gloo aborts at exit ("terminate called without an active exception") if the group lives on,
        gc.collect()  # also inside a DDP wrapper that a reference cycle keeps (the stopped runs' Run and save)
        dist.destroy_process_group()

if __name__ == "__main__":
    world, port = int(sys.argv[1]), 29400 + os.getpid() % 500
    if world == 1:
        worker(0, 1, port)
    else:
        torch.multiprocessing.spawn(worker, args=(world, port), nprocs=world)
"""


def _rows(t):
    """A tensor's rows (along dim 0) as (R, -1); a 0-d or 1-d tensor as one row."""
    return t.reshape(len(t) if t.dim() > 1 else 1, -1)


def test_distributed_training_equals_one_process_on_the_global_batch():
    """DistributedDataParallel with gloo on CPU, BN-free backbone (plain20), BN of the heads
    held fixed: 2 processes x batch 4 = 1 process x batch 8, for every objective, over 3
    steps with momentum (centers and prototypes included, the sum-reduced center terms,
    the contrastive losses over the gathered global batch, the class-balanced sampler and
    the two-view loader). A NaN on one process stops both with exit code 3, and SIGTERM
    arriving at different steps stops both at the same step; --resume auto then ends
    bit-identical to an uninterrupted run."""
    with tmpdir() as d:
        npz = _write_npz(os.path.join(d, "t.npz"), n_train=32, n_test=8, side=16)
        script = os.path.join(d, "ddp.py")
        with open(script, "w") as f:
            f.write(_DDP_SCRIPT)
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=HERE)
        jobs = [subprocess.Popen([sys.executable, script, str(world), npz, os.path.join(d, str(world)),
                                  json.dumps(_DDP_RUNS)], cwd=HERE, env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for world in (1, 2)]
        outputs = [job.communicate(timeout=400) for job in jobs]
        for job, (_, err) in zip(jobs, outputs):
            assert job.returncode == 0, (job.args[2], err[-3000:])
        codes = [json.load(open(os.path.join(d, "2", f"codes{r}.json"))) for r in (0, 1)]
        for name in _DDP_RUNS:
            assert codes[0][name] == codes[1][name] == 0, name
            one = torch.load(os.path.join(d, "1", name, "checkpoint.pth"), weights_only=True)
            two = torch.load(os.path.join(d, "2", name, "checkpoint.pth"), weights_only=True)
            initial = torch.load(os.path.join(d, "1", name, "initial.pth"), weights_only=True)
            # Measured against how far the 3 steps moved each row (a class's centre, prototype or fc row; a
            # conv's output channel; a 1-d tensor as a whole), not elementwise: rounding (another summation
            # order) moves no row by more than 0.02% of its update on our CPUs, but elementwise tolerances
            # failed on another CPU; a learning rate 1% off already moves some tensor by 1-18% of its update.
            for part in ("model", "criterion"):
                for k, w in one[part].items():
                    if w.is_floating_point():
                        moved = (_rows(w) - _rows(initial[part][k])).norm(dim=1)
                        assert ((_rows(two[part][k]) - _rows(w)).norm(dim=1) <= 3e-3 * moved + 1e-7).all(), (name, part, k)
                    else:
                        assert torch.equal(two[part][k], w), (name, part, k)
            rows = [json.loads(open(os.path.join(d, w, name, "metrics.jsonl")).readline()) for w in ("1", "2")]
            assert math.isclose(rows[0]["train_loss"], rows[1]["train_loss"], rel_tol=1e-4), (name, rows)
        assert codes[0]["nonfinite"] == codes[1]["nonfinite"] == 3
        assert outputs[1][1].count("error: non-finite loss") == 1  # rank 0 alone prints
        assert codes[0]["stopped"] == codes[1]["stopped"] == 128 + 15 and codes[0]["resumed"] == 0
        whole = torch.load(os.path.join(d, "2", "whole", "checkpoint.pth"), weights_only=True)
        cut = torch.load(os.path.join(d, "2", "cut", "checkpoint.pth"), weights_only=True)
        assert "stopped by signal 15 at iteration 2" in outputs[1][1] and cut["iteration"] == 6
        for part in ("model", "criterion", "optimizer"):
            assert all(torch.equal(a, b) for a, b in zip(_tensors(whole[part]), _tensors(cut[part]))), part
        # BN trained per process: the logged test loss is the saved model's (evaluated here in one process)
        assert codes[0]["bn"] == codes[1]["bn"] == 0
        bn = os.path.join(d, "2", "bn")
        logged = json.loads(open(os.path.join(bn, "metrics.jsonl")).readline())
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert evaluate.main(evaluate.get_args_parser().parse_args(
                ["--checkpoint", os.path.join(bn, "checkpoint.pth"), "--json", "--workers", "0", "--device", "cpu"])) == 0
        result = json.loads(printed.getvalue().splitlines()[-1])
        assert math.isclose(result["loss"], logged["test_loss"], rel_tol=1e-6), (result["loss"], logged["test_loss"])
        # the same global batch over one process continues (not bit-exact: rank 1's RNG is gone); another is refused
        resume = ["--dataset", "npz", "--data-path", npz, "--model", "resnet20", "--recipe", "none", "--workers", "0",
                  "--lr", "0.05", "--milestones", "--device", "cpu", "--loss", "hybrid-sc", "--iters", "7",
                  "--resume", os.path.join(d, "2", "whole", "checkpoint.pth"), "--output-dir", os.path.join(d, "one")]
        printed = io.StringIO()
        with contextlib.redirect_stdout(printed):
            assert train.main(train.parse_args(resume + ["--batch-size", "8"])) == 0
        assert "written by 2 process(es), this run has 1" in printed.getvalue()
        assert torch.load(os.path.join(d, "one", "checkpoint.pth"), weights_only=True)["iteration"] == 7
        assert_data_error(lambda: train.main(train.parse_args(resume + ["--batch-size", "4"])), "2 process(es) x 4")


def _tensors(state):
    """Every tensor of a (nested) state dict, in order."""
    if torch.is_tensor(state):
        return [state]
    if isinstance(state, dict):
        return [t for k in sorted(state, key=str) for t in _tensors(state[k])]
    if isinstance(state, (list, tuple)):
        return [t for v in state for t in _tensors(v)]
    return []


def test_sync_bn_on_cpu_is_one_line_before_anything_starts():
    """torchrun's environment for rank 0 of 2, on CPU: --sync-bn is one error line, exit code 2,
    before the process group starts or anything is written (torch's SyncBatchNorm would
    fail on every process with a traceback)."""
    with tmpdir() as d:
        npz = _write_npz(os.path.join(d, "t.npz"), n_train=16, n_test=4)
        saved = {k: os.environ.get(k) for k in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
        os.environ.update(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0")
        err = io.StringIO()
        try:
            with contextlib.redirect_stderr(err):
                code = train.cli(["--dataset", "npz", "--data-path", npz, "--sync-bn", "--device", "cpu",
                                  "--output-dir", os.path.join(d, "o")])
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.update({k: v})
        assert code == 2 and err.getvalue().startswith("error: --sync-bn needs CUDA devices")
        assert err.getvalue().count("\n") == 1 and not os.path.exists(os.path.join(d, "o"))
        assert not torch.distributed.is_initialized()


def test_amp_bf16_and_channels_last_train_and_evaluate():
    """Also: the model runs under bf16 autocast but the loss gets fp32 tensors (the
    hybrid SupCon matmul would otherwise run in bf16)."""
    seen = []

    def spy(self, projections, con_labels, logits, *rest):
        seen.extend([projections.dtype, logits.dtype])
        return forward(self, projections, con_labels, logits, *rest)

    forward = losses.HybridLoss.forward
    with tmpdir() as d:
        npz = _write_npz(os.path.join(d, "t.npz"), n_train=16, n_test=8)
        out = os.path.join(d, "r")
        losses.HybridLoss.forward = spy
        try:
            assert train.main(train.parse_args(["--dataset", "npz", "--data-path", npz, "--model", "resnet20",
                                                "--loss", "hybrid-sc", "--batch-size", "8", "--workers", "0",
                                                "--iters", "2", "--amp", "bf16", "--channels-last",
                                                "--output-dir", out])) == 0
        finally:
            losses.HybridLoss.forward = forward
        assert seen and set(seen) == {torch.float32}, seen
        row = json.loads(open(os.path.join(out, "metrics.jsonl")).readline())
        assert math.isfinite(row["train_loss"]) and math.isfinite(row["test_loss"])
        state = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)["model"]
        assert all(v.dtype in (torch.float32, torch.int64) for v in state.values())  # autocast leaves weights fp32


def test_momentum_buffers_take_the_channels_last_strides_and_values():
    """--channels-last: the optimizer is built after the weights turn channels-last, so each
    momentum buffer has its weight's strides (CUDA's fused SGD refuses a list whose strides
    differ: seen on an H200) and, after two steps, the numbers of a contiguous run (not the
    weight's memory order read as contiguous, which the CPU kernel produced before)."""
    with tmpdir() as d:
        npz = _write_npz(os.path.join(d, "t.npz"), n_train=16, n_test=8)
        buffers = {}
        for channels_last in (False, True):
            args = train.parse_args(["--dataset", "npz", "--data-path", npz, "--model", "resnet20", "--batch-size",
                                     "8", "--workers", "0", "--device", "cpu"] + ["--channels-last"] * channels_last)
            utils.seed_everything(0)
            b = train.build(args, 0, 1, torch.device("cpu"))
            step = train.bind_step(args, b.train_model, b.train_criterion, b.optimizer, None,
                                   torch.device("cpu"), 0.0)
            for _, batch in zip(range(2), b.train_loader):
                step(batch)
            params = b.optimizer.param_groups[0]["params"]
            buffers[channels_last] = [b.optimizer.state[p]["momentum_buffer"] for p in params]
            assert all(buf.stride() == p.stride() for buf, p in zip(buffers[channels_last], params))
        assert any(p.dim() == 4 and not p.is_contiguous() for p in params)  # the case under test happened
        for plain, nhwc in zip(buffers[False], buffers[True]):
            assert torch.allclose(plain, nhwc, rtol=1e-3, atol=1e-5), (plain - nhwc).abs().max()


def test_resume_with_other_channels_last_keeps_the_momentum():
    """A run saved with --channels-last and resumed without it (and the reverse) gets each
    momentum buffer back with its values and its weight's strides (utils.match_momentum_layouts),
    and ends near an uninterrupted run: within 2e-2 of its weights after 3 more steps, where the
    layouts' own rounding moves them 3e-3 and the unmatched buffers (the CPU's fused SGD walking
    them in the weight's memory order) 6e-2. A checkpoint from before the fix (channels-last
    run, buffers with contiguous strides holding NHWC memory) is read as NHWC."""
    with tmpdir() as d:
        npz = _write_npz(os.path.join(d, "t.npz"), n_train=16, n_test=8)
        common = ["--dataset", "npz", "--data-path", npz, "--model", "resnet20", "--batch-size", "8",
                  "--workers", "0", "--device", "cpu", "--milestones", "--lr", "0.05"]
        for first, second in ((["--channels-last"], []), ([], ["--channels-last"])):
            whole, cut = os.path.join(d, "whole"), os.path.join(d, "cut")
            assert train.main(train.parse_args(common + first + ["--iters", "6", "--output-dir", whole])) == 0
            assert train.main(train.parse_args(common + first + ["--iters", "3", "--output-dir", cut])) == 0
            saved = torch.load(os.path.join(cut, "checkpoint.pth"), weights_only=True)["optimizer"]["state"]
            args = train.parse_args(common + second + ["--iters", "6", "--output-dir", cut, "--resume", "auto"])
            b = train.build(args, 0, 1, torch.device("cpu"))
            utils.resume(args, b.model, b.criterion, b.optimizer, b.scheduler, b.scaler)
            params = b.optimizer.param_groups[0]["params"]
            for i, p in enumerate(params):
                buf = b.optimizer.state[p]["momentum_buffer"]
                assert torch.equal(buf, saved[i]["momentum_buffer"]) and buf.stride() == p.stride(), i
            assert train.main(args) == 0
            a, b = (torch.load(os.path.join(f, "checkpoint.pth"), weights_only=True)["model"] for f in (whole, cut))
            assert max((a[k].float() - b[k].float()).abs().max() for k in a) < 2e-2
            shutil.rmtree(whole), shutil.rmtree(cut)
    logical = torch.randn(4, 3, 5, 5)                                       # the values SGD meant
    old = logical.permute(0, 2, 3, 1).contiguous().reshape(4, 3, 5, 5)     # NHWC memory under NCHW strides
    for channels_last in (True, False):
        weight = torch.nn.Parameter(torch.zeros(4, 3, 5, 5))
        if channels_last:
            weight.data = weight.data.contiguous(memory_format=torch.channels_last)
        optimizer = torch.optim.SGD([weight], lr=0.1, momentum=0.9)
        optimizer.state[weight]["momentum_buffer"] = old.clone()
        utils.match_momentum_layouts(optimizer, saved_channels_last=True)
        buf = optimizer.state[weight]["momentum_buffer"]
        assert torch.equal(buf, logical) and buf.stride() == weight.stride()


# ----------------------------------------------------------------------------------
# reproduce.py (full-scale driver) and benchmark.py's record
# ----------------------------------------------------------------------------------
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _run_script(*argv, timeout=300):
    return subprocess.run([sys.executable, *argv], cwd=HERE, env=ENV, capture_output=True, text=True,
                          timeout=timeout)


def _write_run(out, setup, config, seed, rows, config_json):
    """A hand-made run folder: metrics.jsonl with ``rows`` and config.json."""
    run_dir = os.path.join(out, setup, f"{config}-seed{seed}")
    os.makedirs(run_dir)
    with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    with open(os.path.join(run_dir, "config.json"), "w") as f:
        json.dump(config_json, f)


def _table_rows(text, setup):
    """{first cell: [cells]} of the markdown table under '## <setup>:'."""
    section = text.split(f"## {setup}:", 1)[1].split("\n## ", 1)[0]
    rows = [line.strip("|").split("|") for line in section.splitlines() if line.startswith("| ")]
    return {cells[0].strip(): [c.strip() for c in cells[1:]] for cells in rows[1:]}


def test_reproduce_smoke_runs_every_setup_and_writes_summary():
    out = tempfile.mkdtemp(prefix="reproduce_smoke_")
    try:
        result = _run_script("reproduce.py", "--smoke", "--parallel", "2", "--out", out)  # CI: 2 cores
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        assert "estimate on cpu" in result.stdout
        for setup_name, setup in reproduce.SETUPS.items():
            for config in setup.configs:
                run_dir = os.path.join(out, setup_name, f"{config.name}-seed0")
                assert os.path.isfile(os.path.join(run_dir, "metrics.jsonl")), run_dir
                assert os.path.isfile(run_dir + ".log"), run_dir
        with open(os.path.join(out, "summary.md")) as f:
            text = f.read()
        for setup_name, setup in reproduce.SETUPS.items():
            rows = _table_rows(text, setup_name)
            assert set(rows) == {c.label for c in setup.configs}, rows
            assert all(cells[len(setup.metrics)] == "1" for cells in rows.values()), rows  # n seeds
        assert "many (%)" in text.split("## hybrid-lt:")[1].split("## ")[0]
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_reproduce_missing_data_is_one_line_exit_2():
    for setup, what in (("seed001", "CIFAR-10 .npz"), ("lfw", "LFW folder")):
        result = _run_script("reproduce.py", setup, timeout=60)
        assert result.returncode == 2, result.stderr
        assert result.stdout == ""
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith(f"error: {setup} needs --data PATH") and what in lines[0], lines
    for argv in (["bogus"], [], ["seed001", "--data", "/no/such/file.npz"]):
        result = _run_script("reproduce.py", *argv, timeout=60)
        assert result.returncode == 2 and len(result.stderr.strip().splitlines()) == 1, (argv, result.stderr)
        assert result.stderr.startswith("error: "), result.stderr


def test_reproduce_summary_mean_std_last_row_and_notes():
    out = tempfile.mkdtemp(prefix="reproduce_summary_")
    try:
        # seed001: three finished seeds; an earlier, better row must not be used (last row only)
        for seed, top1 in enumerate((90.0, 91.0, 93.0)):
            rows = [{"epoch": 0, "iteration": 40000, "test_top1": 99.0},
                    {"epoch": 1, "iteration": 80000, "test_top1": top1}]
            _write_run(out, "seed001", "resnet32", seed, rows, {"iters": 80000, "epochs": 200})
        # hybrid-lt CE: seed 0 finished (many group empty: null), seed 1 unfinished, seed 2 missing
        last = {"epoch": 199, "iteration": 4800, "test_top1": 70.5, "test_many_top1": None,
                "test_medium_top1": 60.25, "test_few_top1": 40.0}
        _write_run(out, "hybrid-lt", "ce", 0, [last], {"iters": 0, "epochs": 200})
        _write_run(out, "hybrid-lt", "ce", 1, [{**last, "epoch": 57, "test_top1": 50.0}], {"iters": 0, "epochs": 200})
        # hybrid-lt SC: two finished seeds; PSC: a malformed metrics file
        for seed, (top1, few) in enumerate(((80.0, 60.0), (82.0, 66.0))):
            _write_run(out, "hybrid-lt", "sc", seed, [{**last, "test_top1": top1, "test_many_top1": 90.0,
                                                       "test_few_top1": few}], {"iters": 0, "epochs": 200})
        os.makedirs(os.path.join(out, "hybrid-lt", "psc-seed0"))
        with open(os.path.join(out, "hybrid-lt", "psc-seed0", "metrics.jsonl"), "w") as f:
            f.write("{not json\n")
        result = _run_script("reproduce.py", "seed001", "hybrid-lt", "--summary-only", "--out", out, timeout=60)
        assert result.returncode == 0, result.stderr
        with open(os.path.join(out, "summary.md")) as f:
            text = f.read()
        # by hand: mean (90 + 91 + 93) / 3 = 91.333; squares 1.7778 + 0.1111 + 2.7778 = 4.6667,
        # / (n - 1 = 2) = 2.3333, sqrt = 1.5275
        mean = (90.0 + 91.0 + 93.0) / 3
        std = (((90.0 - mean) ** 2 + (91.0 - mean) ** 2 + (93.0 - mean) ** 2) / 2) ** 0.5
        assert f"{mean:.2f} ± {std:.2f}" == "91.33 ± 1.53"
        seed001 = _table_rows(text, "seed001")
        assert seed001["ResNet-32 (seed001-cifar10)"] == ["91.33 ± 1.53", "3", "91.1 (Wu); 92.49 (He et al. 2016)"]
        hybrid = _table_rows(text, "hybrid-lt")
        assert hybrid["CE (LDAM-DRW's recipe)"] == ["70.50", "-", "60.25", "40.00", "1", "70.36 (its best epoch)"], hybrid
        # SC: top-1 81 ± sqrt(2) = 1.41; many 90 ± 0; few 63 ± sqrt(18) = 4.24
        assert hybrid["Hybrid-SC"] == ["81.00 ± 1.41", "90.00 ± 0.00", "60.25 ± 0.00", "63.00 ± 4.24", "2", "81.40"]
        assert hybrid["Hybrid-PSC"] == ["-", "-", "-", "-", "0", "78.82"]
        assert "CE (LDAM-DRW's recipe), seed 1: unfinished (last evaluation after epoch 58 of 200)" in text
        assert "CE (LDAM-DRW's recipe), seed 2: missing (no run folder)" in text
        assert "Hybrid-PSC, seed 0: unreadable" in text
    finally:
        shutil.rmtree(out, ignore_errors=True)


def test_reproduce_commands_pass_only_flags_that_apply_and_smoke_only_appends():
    paths = {"npz": "/d/cifar10.npz", "lfw": "/d/lfw"}
    full = reproduce.plan_runs(list(reproduce.SETUPS), [0, 1], paths, "OUT", "auto", {})
    smoke = reproduce.plan_runs(list(reproduce.SETUPS), [0, 1], paths, "OUT", "auto", reproduce.SMOKE_OVERRIDES)
    assert len(full) == 2 * sum(len(s.configs) for s in reproduce.SETUPS.values())
    assert len({run.dir for run in full}) == len(full)
    for run, tiny in zip(full, smoke):
        kind = reproduce.SETUPS[run.setup].data
        assert tiny.args == run.args + reproduce.SMOKE_OVERRIDES["all"] + reproduce.SMOKE_OVERRIDES[kind]
        argv = reproduce.run_argv(run)
        assert argv[-4:] == ["--output-dir", os.path.join("OUT", run.setup, f"{run.config.name}-seed{run.seed}"),
                             "--resume", "auto"]
        assert argv[argv.index("--seed") + 1] == str(run.seed)
        assert argv[argv.index("--data-path") + 1] == paths[kind]
        assert "--tau" not in argv and "--lambda" not in argv
        assert ("--deep-sup" in argv) == run.config.name.endswith("-ds1")
        assert ("--aux-weight" in argv) == ("--aux-decay" in argv) == ("--deep-sup" in argv)
        assert ("--plain-init" in argv) == run.config.name.startswith("plain")
        assert ("--imbalance-ratio" in argv) == (run.setup == "hybrid-lt"), argv
    resolved = reproduce.resolve_commands(full)  # train.py's own parser accepts every command
    assert resolved[full[0].dir].iters == 80000 and resolved[full[0].dir].normalize == "seed001"
    ce = next(r for r in full if (r.setup, r.config.name) == ("hybrid-lt", "ce"))
    assert resolved[ce.dir].loss == "ce" and resolved[ce.dir].batch_size == 128 and resolved[ce.dir].lr == 0.1  # LDAM-DRW's
    assert resolved[ce.dir].imbalance_ratio == 100 and resolved[ce.dir].warmup_epochs == 5
    plain = next(r for r in full if r.config.name == "plain56-ds1")
    assert resolved[plain.dir].deep_sup == [1] and resolved[plain.dir].lr == 0.001
    assert resolved[plain.dir].milestones == [32000, 48000] and resolved[plain.dir].milestone_unit == "iter"


def test_reproduce_takes_torchvisions_cifar10_folder():
    with tmpdir() as d:
        os.makedirs(os.path.join(d, "cifar-10-batches-py"))
        lfw = os.path.join(d, "lfw")
        os.makedirs(lfw)
        paths = reproduce.parse_data([d, lfw])
        assert paths == {"cifar10": d, "lfw": lfw}
        reproduce.check_data(["seed001", "hybrid-lt", "deepsup", "lfw"], paths)
        runs = reproduce.plan_runs(["seed001", "hybrid-lt", "lfw", "deepsup"], [0], paths, "OUT", "auto", {})
        for run in runs:
            argv = reproduce.run_argv(run)
            dataset = argv[argv.index("--dataset") + 1]
            assert (dataset, argv[argv.index("--data-path") + 1]) == (("lfw", lfw) if run.setup == "lfw" else ("cifar10", d))
        resolved = reproduce.resolve_commands(runs)   # train.py accepts them
        assert {a.dataset for a in resolved.values()} == {"cifar10", "lfw"}
        deepsup = [resolved[r.dir] for r in runs if r.setup == "deepsup"]  # not Wu's recipe, which CIFAR-10 CE matches
        assert deepsup and all((a.recipe, a.warmup_iters, a.normalize) == ("none", 0, "cifar") for a in deepsup)
        both = reproduce.parse_data([d, f"npz={os.path.join(HERE, 'README.md')}"])   # an npz given wins
        assert reproduce.setup_kind("seed001", both) == "npz"
        with contextlib.suppress(reproduce.UsageError):
            reproduce.check_data(["lfw"], reproduce.parse_data([d]))
            raise AssertionError("lfw accepted a CIFAR-10 folder")


def test_reproduce_rejected_command_is_one_usage_error():
    run = reproduce.Run("seed001", reproduce.SETUPS["seed001"].configs[0], 0, ["--no-such-flag"], "OUT/x")
    try:
        reproduce.resolve_commands([run])
    except reproduce.UsageError as e:
        assert str(e).startswith("train.py rejects seed001/resnet32: ") and "\n" not in str(e), str(e)
    else:
        raise AssertionError("an unknown train.py flag was accepted")


def test_reproduce_probe_reads_timed_lines_and_estimates_minutes():
    lines = [(0.0, "resnet32: 0.464M parameters; 12406 train / 10000 test images, 10 classes; "
                   "24 iterations per epoch, 40 in all (2 epochs) on cuda; loader tensor"),
             (1.0, "epoch 0 iter 10/40 loss 2.3"),   # warm-up: not timed
             (2.0, "epoch 0 iter 20/40 loss 2.2"),   # 10 steps in 1 s
             (3.5, "eval epoch 0: train loss 2.2 test top1 10.00"),
             (5.0, "epoch 1 iter 30/40 loss 2.1"),   # across an evaluation: not timed
             (7.0, "epoch 1 iter 40/40 loss 2.0"),   # 10 steps in 2 s
             (9.5, "eval epoch 1: train loss 2.0 test top1 12.00")]
    probe = reproduce.read_probe(lines, warmup=10)
    assert probe["steps_per_s"] == 20 / 3 and probe["eval_s"] == 2.5
    assert (probe["train_size"], probe["test_size"], probe["iters_per_epoch"]) == (12406, 10000, 24)
    args = argparse.Namespace(iters=0, epochs=200, batch_size=512, eval_every=1)
    est = reproduce.estimate(args, {**probe, "steps_per_s": 10.0, "eval_s": 2.0})
    # 200 epochs x 24 iterations = 4800 at 10 it/s = 480 s, + 200 evaluations x 2 s = 400 s
    assert est == {"iterations": 4800, "images": 4800 * 512, "img_per_s": 5120.0, "evals": 200,
                   "minutes": 880 / 60}
    assert reproduce.estimate(args, {**probe, "steps_per_s": None}) is None


def test_benchmark_records_device_strict_json_and_skips_cuda_only_cells():
    out = tempfile.mkdtemp(prefix="bench_")
    try:
        result = _run_script("benchmark.py", "--models", "resnet20", "--batch-size", "8", "--warmup", "1",
                             "--windows", "1", "--steps-per-window", "1", "--no-losses", "--workers", "0",
                             "--loaders", "tensor", "--amp", "none,fp16", "--compile", "none,reduce-overhead",
                             "--out", out, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        assert "no --data-path: timing on 10000 random uint8 32x32 images" in result.stdout
        name = [f for f in os.listdir(out) if f.endswith(".json")][0]
        with open(os.path.join(out, name)) as f:  # strict: NaN / Infinity would raise
            report = json.load(f, parse_constant=lambda c: (_ for _ in ()).throw(ValueError(c)))
        for key in ("device_name", "gpu_memory_gib", "torch", "torchvision", "threads", "cpu_count"):
            assert key in report, key
        assert report["grid"]["data_path"] is None and report["device_name"]
        if not torch.cuda.is_available():
            assert report["gpu_memory_gib"] is None
            skipped = [c for c in report["cells"] if "skipped" in c]
            assert {(c["amp"], c["compile"]) for c in skipped} == {("fp16", "none"), ("none", "reduce-overhead"),
                                                                  ("fp16", "reduce-overhead")}
            assert all(c["skipped"].startswith("needs CUDA") for c in skipped)
        missing = _run_script("benchmark.py", "--data-path", "/no/such.npz", "--out", out, timeout=60)
        assert missing.returncode == 2 and missing.stderr.startswith("error: --data-path /no/such.npz not found")
        assert len(missing.stderr.strip().splitlines()) == 1
    finally:
        shutil.rmtree(out, ignore_errors=True)


# ----------------------------------------------------------------------------------
def _main():
    tests = [(name, fn) for name, fn in globals().items() if name.startswith("test_") and callable(fn)]
    passed = failed = 0
    for name, fn in tests:
        start = time.time()
        try:
            fn()
            passed += 1
            print(f"PASS {name} ({time.time() - start:.1f}s)", flush=True)
        except (Exception, SystemExit):  # a parse error exits: count it as a failure, go on
            failed += 1
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_main())
