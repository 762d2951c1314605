"""Tests of the MKSMT parts (seed 002): kd_loss / feature_kd_loss, OPM, official
Swin weight conversion, NABirds / Stanford Dogs loaders, Grad-CAM / overlays /
FLOPs / flips. Run as ``python tests_mksmt_parts.py`` (a few seconds on CPU); to be
merged into ``test_all.py``.

Loss tests compare against per-sample loops written from the equation with
``math`` in float64; the Swin test converts a torchvision net to the official
layout with an inverse mapping written here and re-implements the official
PatchMerging forward.
"""
import math
import os
import re
import shutil
import sys
import tempfile
import time
import traceback

import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision
from PIL import Image

import data
import losses
import mksmt_eval_parts as evalparts
import models


def _tmpdir():
    return tempfile.mkdtemp(prefix="test_mksmt_")


def _jpeg_file(path, side=24, colour=(200, 100, 0)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", (side, side), colour).save(path)


def _data_error(fn, fragment):
    try:
        fn()
    except data.DataError as e:
        assert fragment in str(e) and "\n" not in str(e), str(e)
        return str(e)
    raise AssertionError("no DataError raised")


# ----------------------------------------------------------------------------------
# losses
# ----------------------------------------------------------------------------------
def _naive_kd(zs, zt, T, t2):
    """KL(p_t || p_s) with p_i = exp(z_i/T) / sum_j exp(z_j/T), averaged over samples."""
    B, K = len(zs), len(zs[0])
    total = 0.0
    for b in range(B):
        ps = [math.exp(zs[b][i] / T) / sum(math.exp(zs[b][j] / T) for j in range(K)) for i in range(K)]
        pt = [math.exp(zt[b][i] / T) / sum(math.exp(zt[b][j] / T) for j in range(K)) for i in range(K)]
        total += sum(pt[i] * (math.log(pt[i]) - math.log(ps[i])) for i in range(K)) / B
    return total * T * T if t2 else total


def test_kd_loss_matches_naive_loop():
    torch.manual_seed(0)
    zs, zt = torch.randn(3, 4, dtype=torch.float64) * 3, torch.randn(3, 4, dtype=torch.float64) * 3
    for T in (1.0, 4.0):
        for t2 in (True, False):
            got = losses.kd_loss(zs, zt, temperature=T, t2_scale=t2).item()
            want = _naive_kd(zs.tolist(), zt.tolist(), T, t2)
            assert abs(got - want) < 1e-12, (T, t2, got, want)
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

    d = _tmpdir()
    try:
        path = os.path.join(d, "swin_official.pth")
        torch.save({"model": official}, path)
        holder = Holder()
        report = models.load_swin_official(holder, path)
    finally:
        shutil.rmtree(d, ignore_errors=True)
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
    d = _tmpdir()
    try:
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
        _data_error(lambda: data.build_datasets("nabirds", d), "train_test_split.txt")
        _write_nabirds(d)
        with open(os.path.join(d, "image_class_labels.txt"), "a") as f:
            f.write("deadbeef-0000-4000-8000-000000000000 heron\n")
        _data_error(lambda: data.build_datasets("nabirds", d), "malformed")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_nabirds_and_dogs_missing_data_one_line_errors():
    d = _tmpdir()
    try:
        message = _data_error(lambda: data.load_nabirds(d, (None, None)), os.path.join(d, "images.txt"))
        assert "--data-path" in message
        _write_nabirds(d)
        shutil.rmtree(os.path.join(d, "images"))
        _data_error(lambda: data.build_datasets("nabirds", d), "images")
        _data_error(lambda: data.build_datasets("dogs", d), os.path.join(d, "train"))
        _data_error(lambda: data.build_datasets("dogs", os.path.join(d, "nowhere")), "does not exist")
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_dogs_imagefolder_with_test_or_val():
    for test_split in ("test", "val"):
        d = _tmpdir()
        try:
            for split, n in (("train", 2), (test_split, 1)):
                for breed in ("n02085620-Chihuahua", "n02085782-Japanese_spaniel"):
                    for i in range(n):
                        _jpeg_file(os.path.join(d, split, breed, f"{i}.jpg"))
            train_set, test_set, k = data.build_datasets("dogs", d, image_size=16)
            assert k == 2 and len(train_set) == 4 and len(test_set) == 2
            assert test_set.classes[1] == "n02085782-Japanese_spaniel" and test_set.targets == [0, 1]
            assert train_set[3][0].shape == (3, 16, 16)
            shutil.rmtree(os.path.join(d, test_split, "n02085620-Chihuahua"))
            _data_error(lambda: data.build_datasets("dogs", d), "different class folders")
        finally:
            shutil.rmtree(d, ignore_errors=True)
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
        cams, predictions = evalparts.gradcam(model, images, head)
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


def test_save_overlays_writes_blended_pngs():
    torch.manual_seed(7)
    images = torch.randint(0, 256, (2, 3, 6, 5), dtype=torch.uint8)
    cams = torch.zeros(2, 6, 5)
    cams[1] = 1.0
    cams[1, 0, 0] = 0.5
    d = _tmpdir()
    try:
        paths = evalparts.save_overlays(images, cams, os.path.join(d, "sub", "cam"))
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
    finally:
        shutil.rmtree(d, ignore_errors=True)


def test_complexity_counts_conv_and_linear_by_hand():
    conv = nn.Conv2d(3, 8, 3, padding=1, bias=False).train()
    result = evalparts.complexity(conv, 8)
    # 2 FLOPs per multiply-add, one per (output element, input channel, kernel tap).
    assert result == {"params": 8 * 3 * 3 * 3, "flops": 2 * (8 * 8 * 8) * (3 * 3 * 3)}
    assert conv.training
    linear = nn.Sequential(nn.Flatten(), nn.Linear(3 * 4 * 4, 5))
    assert evalparts.complexity(linear, 4) == {"params": 48 * 5 + 5, "flops": 2 * 48 * 5}
    assert evalparts.complexity(TwoHeadNet(), 16)["flops"] > 0


def test_flip_images():
    images = torch.arange(2 * 3 * 4 * 5).reshape(2, 3, 4, 5)
    h, v = evalparts.flip_images(images, "h"), evalparts.flip_images(images, "v")
    for b in range(2):
        for c in range(3):
            for i in range(4):
                for j in range(5):
                    assert h[b, c, i, j] == images[b, c, i, 4 - j]
                    assert v[b, c, i, j] == images[b, c, 3 - i, j]
    try:
        evalparts.flip_images(images, "x")
    except ValueError:
        return
    raise AssertionError("no ValueError for an unknown flip mode")


# ----------------------------------------------------------------------------------
def _main():
    torch.set_num_threads(1)
    tests = [(name, fn) for name, fn in globals().items() if name.startswith("test_") and callable(fn)]
    passed = failed = 0
    start_all = time.time()
    for name, fn in tests:
        start = time.time()
        try:
            fn()
            passed += 1
            print(f"PASS {name} ({time.time() - start:.1f}s)", flush=True)
        except Exception:
            failed += 1
            print(f"FAIL {name}\n{traceback.format_exc()}", flush=True)
    print(f"{passed} passed, {failed} failed in {time.time() - start_all:.1f}s")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(_main())
