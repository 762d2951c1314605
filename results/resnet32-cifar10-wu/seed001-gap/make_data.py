"""A proxy for what the JPEG round of our CIFAR-10 copy costs: encode every image once more
at the same settings (IJG quality 75, 4:2:0, as results/resnet32-cifar10-wu/jpeg_quality.txt measured) and train
on that. Three variants:

- aligned: re-encoded on the same 8x8 / 16x16 block grid. Close to idempotent, so a weak proxy.
- shifted: the image is edge-padded by 4 px on the top and left (36x36), encoded, decoded and
  cropped back, so the blocks straddle the old block edges and the quantisation error is new,
  like a first round on (already smoothed) images.
- shifted2: the shifted variant encoded once more, edge-padded by 2 px (blocks straddle both
  earlier grids: 8x8 edges at 6 mod 8 in the original's coordinates, against 0 and 4), so a
  third fresh round. Its cost against shifted's tells whether a round's cost shrinks as
  rounds pile up, i.e. how far the second round's cost can stand in for the first's.

    python results/resnet32-cifar10-wu/seed001-gap/make_data.py ../data/cifar10_full.npz ../data > results/resnet32-cifar10-wu/seed001-gap/make_data.txt

Writes DIR/cifar10_full_reenc_{aligned,shifted,shifted2}.npz (same keys) and prints the PSNR of each
against its input. Pillow's encoder: quality=75, subsampling 4:2:0 (Pillow's default for RGB).
"""
import io
import os
import sys

import numpy as np
from PIL import Image


def reencode(images, shift):
    out = np.empty_like(images)
    for i, image in enumerate(images):  # (32, 32, 3) uint8
        padded = np.pad(image, ((shift, 0), (shift, 0), (0, 0)), mode="edge")
        buffer = io.BytesIO()
        Image.fromarray(padded).save(buffer, format="JPEG", quality=75, subsampling="4:2:0")
        out[i] = np.asarray(Image.open(buffer).convert("RGB"))[shift:, shift:]
    return out


def psnr(a, b):
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return 10 * np.log10(255 ** 2 / mse)


def main(path, out_dir):
    made = {"base": dict(np.load(path, allow_pickle=False))}
    for name, source, shift in (("aligned", "base", 0), ("shifted", "base", 4), ("shifted2", "shifted", 2)):
        arrays = made[source]
        new = made[name] = dict(arrays)
        for split in ("train", "test"):
            new[f"x_{split}"] = reencode(arrays[f"x_{split}"], shift)
            print(f"{name}: x_{split} PSNR {psnr(arrays[f'x_{split}'], new[f'x_{split}']):.2f} dB against its input ({source}), "
                  f"{psnr(made['base'][f'x_{split}'], new[f'x_{split}']):.2f} dB against base, "
                  f"{np.mean(arrays[f'x_{split}'] != new[f'x_{split}']) * 100:.1f}% of values changed")
        np.savez(os.path.join(out_dir, f"cifar10_full_reenc_{name}.npz"), **new)


if __name__ == "__main__":
    main(*sys.argv[1:3])
