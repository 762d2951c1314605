"""CIFAR-10-LT (beta 100) small enough to travel to a GPU machine with the repository.

The full JPEG pack (56 MB) and the repository do not fit the 64 MiB that our GPU jobs could carry. The
long-tailed runs need only the 12,406 training images that the cut keeps, and the test set:

    python results/gpu-h200/make_lt_pack.py ../shared/data/cifar10_jpeg.npz .devdata/cifar10lt100_pack.npz
    python results/gpu-h200/make_lt_pack.py --decode .devdata/cifar10lt100_pack.npz /tmp/cifar10_lt.npz   # there

The pack holds those images' JPEG bytes, every training label and the test set. Decoded, it is a
50,000-image x_train in which only the kept images are filled (the others are zeros) beside every
label, so train.py's own cut (--imbalance-ratio 100 with the default --split-seed 0, which every
hybrid and LDAM recipe uses) keeps exactly the same images as on the full set: the runs' flags and
data stay those of the CPU runs. Decoding checks that the cut finds the packed images.
"""
import io
import os
import sys

import numpy as np
from PIL import Image

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", ".."))
import data  # noqa: E402  (the repository's own cut, so the pack cannot drift from it)

BETA, SPLIT_SEED = 100.0, 0


class _Labels:
    def __init__(self, targets):
        self.targets, self.classes = list(targets), sorted(set(int(t) for t in targets))


def kept_indices(y_train):
    return np.asarray(data.long_tailed_subset(_Labels(y_train), BETA, SPLIT_SEED).indices)


def pack(full_path, out_path):
    full = np.load(full_path)
    blob, offsets = full["train_jpeg"], full["train_offsets"]
    keep = kept_indices(full["y_train"])
    pieces = [blob[offsets[i]:offsets[i + 1]] for i in keep]
    np.savez(out_path, keep=keep, y_train=full["y_train"], classes=full["classes"],
             train_jpeg=np.concatenate(pieces), train_offsets=np.cumsum([0] + [len(p) for p in pieces]),
             test_jpeg=full["test_jpeg"], test_offsets=full["test_offsets"], y_test=full["y_test"])
    print(f"wrote {out_path}: {len(keep)} of {len(full['y_train'])} training images, "
          f"{len(full['y_test'])} test images, {os.path.getsize(out_path) / 2 ** 20:.1f} MiB")


def _decode(blob, offsets):
    images = np.empty((len(offsets) - 1, 32, 32, 3), dtype=np.uint8)
    for i in range(len(offsets) - 1):  # as cifar10_jpeg.py: Pillow, .convert('RGB')
        images[i] = np.asarray(Image.open(io.BytesIO(blob[offsets[i]:offsets[i + 1]].tobytes())).convert("RGB"))
    return images


def decode(pack_path, out_path):
    p = np.load(pack_path)
    keep, y_train = p["keep"], p["y_train"]
    if not np.array_equal(kept_indices(y_train), keep):
        sys.exit(f"error: this repository's long-tailed cut no longer keeps the packed images; rebuild the pack")
    x_train = np.zeros((len(y_train), 32, 32, 3), dtype=np.uint8)
    x_train[keep] = _decode(p["train_jpeg"], p["train_offsets"])
    np.savez(out_path, x_train=x_train, y_train=y_train, x_test=_decode(p["test_jpeg"], p["test_offsets"]),
             y_test=p["y_test"], classes=p["classes"])
    print(f"wrote {out_path}: {len(keep)} training images filled of {len(y_train)}, beta {BETA:g} cut checked")


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--decode":
        decode(sys.argv[2], sys.argv[3])
    elif len(sys.argv) == 3:
        pack(sys.argv[1], sys.argv[2])
    else:
        sys.exit(__doc__)
