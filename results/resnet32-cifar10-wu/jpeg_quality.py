"""JPEG settings of the CIFAR-10 copy the full-scale runs used (cifar10_jpeg.npz: every
image's JPEG bytes), read from the files' own headers, nothing decoded:

    python results/resnet32-cifar10-wu/jpeg_quality.py path/to/cifar10_jpeg.npz > results/resnet32-cifar10-wu/jpeg_quality.txt

For each image: the IJG quality whose standard luminance table (JPEG spec, Annex K,
scaled as libjpeg does) reproduces the file's luminance quantisation table exactly
(None if no quality does), and the chroma subsampling from the luma sampling factors.
"""
import collections
import io
import sys

import numpy as np
from PIL import Image

# Annex K.1 luminance table, in natural (row-major) order
K1 = [16, 11, 10, 16, 24, 40, 51, 61, 12, 12, 14, 19, 26, 58, 60, 55, 14, 13, 16, 24, 40, 57, 69, 56,
      14, 17, 22, 29, 51, 87, 80, 62, 18, 22, 37, 56, 68, 109, 103, 77, 24, 35, 55, 64, 81, 104, 113, 92,
      49, 64, 78, 87, 103, 121, 120, 101, 72, 92, 95, 98, 112, 100, 103, 99]


def ijg_table(quality):
    """libjpeg's jpeg_quality_scaling + jpeg_add_quant_table (baseline: clamp 1..255)."""
    scale = 5000 // quality if quality < 50 else 200 - 2 * quality
    return sorted(min(max((q * scale + 50) // 100, 1), 255) for q in K1)


TABLES = {tuple(ijg_table(q)): q for q in range(100, 0, -1)}  # sorted values: independent of the scan order


def main(path):
    arrays = np.load(path, allow_pickle=False)
    for split in ("train", "test"):
        data, offsets = arrays[f"{split}_jpeg"], arrays[f"{split}_offsets"]
        qualities, sampling = collections.Counter(), collections.Counter()
        for i in range(len(offsets) - 1):
            image = Image.open(io.BytesIO(data[offsets[i]:offsets[i + 1]].tobytes()))
            qualities[TABLES.get(tuple(sorted(image.quantization[0])))] += 1
            h, v = image.layer[0][1:3]  # luma sampling factors; chroma at 1x1
            sampling[{(1, 1): "4:4:4", (2, 1): "4:2:2", (2, 2): "4:2:0"}.get((h, v), f"{h}x{v}")] += 1
        print(f"{split}: {len(offsets) - 1} images; IJG quality {dict(qualities)}; chroma {dict(sampling)}")


if __name__ == "__main__":
    main(sys.argv[1])
