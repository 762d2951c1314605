"""All tests. Run as ``python test_all.py`` (prints ``N passed, N failed``) or
``python -m pytest test_all.py``. Tiny models and inputs: under 5 minutes on 2 CPU cores.

Loss tests compare against per-sample Python loops written from the paper's
equation (floats and ``math``, not tensors), in float64.
"""
import contextlib
import io
import json
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np
import torch
from PIL import Image

import data
import losses
import models
import train

HERE = os.path.dirname(os.path.abspath(__file__))
SHARED_DATA = os.path.join(HERE, "..", "shared", "data")


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
def naive_contrastive_center(x, y, c, delta, reduction="sum"):
    """Eq. 7 of Qi & Su 2017, one sample and one center at a time."""
    B, K, d = len(x), len(c), len(x[0])
    total = 0.0
    for i in range(B):
        own = sum((x[i][k] - c[y[i]][k]) ** 2 for k in range(d))
        others = sum(sum((x[i][k] - c[j][k]) ** 2 for k in range(d)) for j in range(K) if j != y[i])
        total += 0.5 * own / (others + delta)
    return total if reduction == "sum" else total / B


def naive_center(x, y, c, reduction="sum"):
    """Eq. 2 of Wen et al. 2016."""
    total = sum(0.5 * sum((x[i][k] - c[y[i]][k]) ** 2 for k in range(len(x[0]))) for i in range(len(x)))
    return total if reduction == "sum" else total / len(x)


def _features_and_centers(B, K, d, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, d, generator=g, dtype=torch.float64), torch.randn(K, d, generator=g, dtype=torch.float64)


def test_contrastive_center_matches_naive_loop_with_absent_class():
    x, c = _features_and_centers(7, 5, 3)
    y = torch.tensor([0, 1, 1, 3, 0, 4, 3])  # class 2 absent from the batch
    for reduction in ("sum", "mean"):
        loss = losses.ContrastiveCenterLoss(5, 3, delta=0.7, reduction=reduction).double()
        loss.centers.data.copy_(c)
        want = naive_contrastive_center(x.tolist(), y.tolist(), c.tolist(), 0.7, reduction)
        assert abs(loss(x, y).item() - want) < 1e-12, (reduction, loss(x, y).item(), want)


def test_contrastive_center_single_sample_and_single_class():
    x, c = _features_and_centers(1, 4, 6, seed=1)
    y = torch.tensor([2])
    loss = losses.ContrastiveCenterLoss(4, 6).double()
    loss.centers.data.copy_(c)
    assert abs(loss(x, y).item() - naive_contrastive_center(x.tolist(), [2], c.tolist(), 1.0)) < 1e-12
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
            want = naive_center(x.tolist(), y.tolist(), c.tolist(), reduction)
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
    want = ce + 0.3 * naive_contrastive_center(x.tolist(), y, c.tolist(), 1.0)  # Eq. 8
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
        _expect_data_error(lambda: data.build_datasets("npz", bad), "y_test")
        _expect_data_error(lambda: data.build_datasets("npz", os.path.join(d, "none.npz")), "--data-path")


def _expect_data_error(fn, fragment):
    try:
        fn()
    except data.DataError as e:
        assert fragment in str(e) and "\n" not in str(e), str(e)
        return
    raise AssertionError("no DataError raised")


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
        _expect_data_error(lambda: data.build_datasets("lfw", os.path.join(d, "Dan_E")), "--data-path")


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
        os.remove(os.path.join(d, "train_test_split.txt"))
        _expect_data_error(lambda: data.build_datasets("cub", d), "train_test_split.txt")
    with tmpdir() as d:
        _write_cub(d)
        with open(os.path.join(d, "image_class_labels.txt"), "a") as f:
            f.write("999\n")
        _expect_data_error(lambda: data.build_datasets("cub", d), "malformed")


def test_imagefolder_dataset():
    with tmpdir() as d:
        for split in ("train", "val"):
            for cls in ("cat", "dog"):
                _jpeg(os.path.join(d, split, cls, "a.jpg"), mode="RGB")
        train_set, test_set, k = data.build_datasets("imagefolder", d, image_size=32)
        assert k == 2 and len(train_set) == 2 and test_set[1][1] == 1
        shutil.rmtree(os.path.join(d, "val"))
        _expect_data_error(lambda: data.build_datasets("imagefolder", d), "val")


def test_missing_cifar_says_download():
    with tmpdir() as d:
        _expect_data_error(lambda: data.build_datasets("cifar10", d), "--download")


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
    assert train.parse_args([]).lr == 0.1 and train.parse_args([]).recipe is None


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


def test_epoch_milestones_scale_by_iterations_per_epoch():
    args = train.parse_args(["--milestones", "2", "3", "--lr", "1.0"])
    optimizer = train.build_optimizer(args, torch.nn.Linear(1, 1), None)
    scheduler = train.build_scheduler(args, optimizer, iters_per_epoch=10)
    lrs = []
    for _ in range(35):
        lrs.append(optimizer.param_groups[0]["lr"])
        optimizer.step()
        scheduler.step()
    assert lrs[19] == 1.0 and math.isclose(lrs[20], 0.1) and math.isclose(lrs[30], 0.01)


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
    assert result["per_class"] == [100.0, 50.0, 0.0, 0.0, 0.0, 0.0]
    assert result["balanced_top1"] == (100 + 50 + 0) / 3  # classes 2-4 absent from the test set


def _run(*argv, cwd=HERE):
    return subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True, timeout=240)


def test_train_and_evaluate_end_to_end():
    with tmpdir() as d:
        npz = _write_npz(os.path.join(d, "t.npz"), n_train=48, n_test=24)
        out = os.path.join(d, "run")
        common = ["train.py", "--dataset", "npz", "--data-path", npz, "--model", "resnet20",
                  "--loss", "joint", "--batch-size", "16", "--workers", "0", "--epochs", "2",
                  "--milestones", "1", "--print-freq", "1", "--output-dir", out, "--device", "cpu"]
        r = _run(*common)
        assert r.returncode == 0, r.stderr
        assert "img/s" in r.stdout and "eta" in r.stdout
        rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        assert [row["epoch"] for row in rows] == [0, 1] and rows[-1]["iteration"] == 6
        assert {"train_loss", "train_ce", "train_center", "test_top1", "test_top5", "lr", "seconds"} <= set(rows[0])
        ckpt = torch.load(os.path.join(out, "checkpoint.pth"), weights_only=True)
        assert {"model", "optimizer", "scheduler", "criterion", "epoch", "iteration", "args"} <= set(ckpt)
        assert ckpt["criterion"]["center_loss.centers"].shape == (4, 64)
        assert json.load(open(os.path.join(out, "config.json")))["loss"] == "joint"
        r = _run("evaluate.py", "--checkpoint", os.path.join(out, "checkpoint.pth"), "--json",
                 "--workers", "0", "--device", "cpu")
        assert r.returncode == 0, r.stderr
        result = json.loads(r.stdout.strip().splitlines()[-1])
        assert abs(result["top1"] - rows[-1]["test_top1"]) < 1e-9 and len(result["per_class"]) == 4
        # resume: a third epoch continues from the saved iteration
        r = _run(*common, "--epochs", "3", "--resume", os.path.join(out, "checkpoint.pth"))
        assert r.returncode == 0, r.stderr
        rows = [json.loads(line) for line in open(os.path.join(out, "metrics.jsonl"))]
        assert [row["epoch"] for row in rows] == [0, 1, 2] and rows[-1]["iteration"] == 9


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
        loss, _ = train.compute_loss(None, {**out, "logits": out["logits"].detach()}, y, aux_weight=1.0)
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
        assert last["aux_weight"] == 0.3 * (1 - 1 / 2)
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
        data.PerSampleSeed(train_set)[(0, 123)]
        assert torch.equal(state, torch.get_rng_state())  # the caller's RNG is untouched


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
        r = subprocess.run(_train_cmd(npz, os.path.join(d, "a"), "--lr", "1e30"), cwd=HERE,
                           capture_output=True, text=True, timeout=240)
        assert r.returncode == 3 and "Traceback" not in r.stderr
        assert re.search(r"non-finite loss \((ce|center|ce, center)\) at iteration \d+", r.stderr), r.stderr
        r = subprocess.run(_train_cmd(npz, os.path.join(d, "b"), "--lr", "1e30", "--skip-nonfinite", "100"),
                           cwd=HERE, capture_output=True, text=True, timeout=240)
        assert r.returncode == 0, r.stderr
        rows = [json.loads(line) for line in open(os.path.join(d, "b", "metrics.jsonl"))]
        assert rows[-1]["skipped_nonfinite"] > 0


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
        subprocess.run(_train_cmd(good, old, "--iters", "1"), cwd=HERE, capture_output=True, timeout=240)
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
             "other optimizer groups"),
            (npz_run + ["--data-path", good, "--deep-sup", "2"], "--deep-sup"),
            (["--dataset", "imagefolder", "--data-path", folder, "--image-size", "32", "--batch-size", "2",
              "--workers", "0"], broken),  # found while training: a config.json may exist, no torn file
            (["--dataset", "imagefolder", "--data-path", folder, "--image-size", "32", "--batch-size", "2",
              "--workers", "1"], broken),
            (npz_run + ["--data-path", good, "--output-dir", os.path.join(a_file, "sub")], "--output-dir"),
            (npz_run + ["--data-path", good, "--batch-size", "64"], "larger than the training set"),
            (npz_run + ["--data-path", good, "--resume", truncated], "truncated"),
            (npz_run + ["--data-path", good, "--resume", foreign], "not a train.py checkpoint"),
            (npz_run + ["--data-path", good, "--model", "resnet32", "--resume",
                        os.path.join(old, "checkpoint.pth")], "does not fit this resnet32"),
        ]
        for argv, fragment in cases:
            out = os.path.join(d, "out")
            r = _run("train.py", *argv, "--output-dir", out) if "--output-dir" not in argv else _run("train.py", *argv)
            lines = r.stderr.strip().splitlines()
            assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, (argv, r.stderr)
            assert fragment in lines[0], (fragment, lines[0])
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
        r = _run("train.py", "--dataset", "imagefolder", "--data-path", folder, "--image-size", "32",
                 "--batch-size", "2", "--workers", "0", "--iters", "1", "--skip-corrupt",
                 "--output-dir", os.path.join(d, "skip"))
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
def _main():
    tests = [(name, fn) for name, fn in globals().items() if name.startswith("test_") and callable(fn)]
    passed = failed = 0
    for name, fn in tests:
        start = time.time()
        try:
            fn()
            passed += 1
            print(f"PASS {name} ({time.time() - start:.1f}s)", flush=True)
        except Exception:
            failed += 1
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_main())
