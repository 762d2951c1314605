"""Tests for the tensor-resident data path (data.py, last section) and benchmark.py.
Run as ``python tests_speed_parts.py`` (prints PASS / FAIL per test) or with pytest.
To be merged into test_all.py.

Augmentations are checked against torchvision's own functional ops and against
statistics read back from the output images, not against the code's formulas.
"""
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import traceback

import numpy as np
import torch
import torchvision
import torchvision.transforms as T
import torchvision.transforms.functional as F
from PIL import Image

import benchmark
import data

HERE = os.path.dirname(os.path.abspath(__file__))


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
            want = F.crop(F.pad(image, 4, fill=0), int(oy[b]), int(ox[b]), 32, 32)
            want = F.hflip(want) if flips[b] else want
            want = F.pil_to_tensor(want) if isinstance(want, Image.Image) else want
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
    for ours, theirs, f in ((data.batched_brightness, F.adjust_brightness, factors),
                            (data.batched_contrast, F.adjust_contrast, factors),
                            (data.batched_saturation, F.adjust_saturation, factors),
                            (data.batched_hue, F.adjust_hue, shifts)):
        out = ours(x, f)
        for b in range(len(x)):
            err = (out[b] - theirs(x[b], float(f[b]))).abs().max().item()
            assert err < 1e-5, (ours.__name__, b, err)
    gray = data.batched_rgb_to_gray(x)
    for b in range(len(x)):
        assert (gray[b] - F.rgb_to_grayscale(x[b])).abs().max() < 1e-6
    # a whole jitter in a given order = torchvision's ops one after another
    order = [3, 0, 2, 1]
    fs = [torch.full((6,), 1.3), torch.full((6,), 0.7), torch.full((6,), 1.2), torch.full((6,), -0.08)]
    out = data.color_jitter_with_params(x, fs, order)
    ops = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation, F.adjust_hue)
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
               "--amp", "none,fp16", "--out", out]
        result = subprocess.run(cmd, cwd=HERE, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stdout + result.stderr
        files = os.listdir(out)
        assert len(files) == 1 and files[0].startswith("benchmark-") and files[0].endswith(".json"), files
        with open(os.path.join(out, files[0])) as f:
            report = json.load(f)
        cells = [c for c in report["cells"] if "median" in c]
        assert {c["loader"] for c in cells} == {"torch", "tensor"}
        for c in cells:
            assert len(c["img_per_s"]) == 2 and c["median"] > 0 and c["ratio"] > 0
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
