"""The decoded CIFAR-10 copy rearranged so that train.py's long-tailed cut keeps the images
LDAM-DRW's code keeps (imbalance_cifar.py: np.random.seed(0), then per class in label order
np.random.shuffle of that class's indices, the first n_c kept).

    python results/hybrid-cifar10lt-full/gap/make_ldam_cut.py ../data/cifar10_full.npz ../data/cifar10_full_ldamcut.npz

np.random.shuffle permutes positions whatever the values, so LDAM keeps, of class c, the images
at ranks shuffle_c(arange(5000))[:n_c] of that class in the official order. The copy holds each
class's files in file-name order; that this is the official order within the class is an
assumption (the copy's source extracted the batches in order; not checkable without them).
Our cut keeps, of class c, the positions default_rng(0).permutation(class c)[:n_c]; this file
puts LDAM's kept images at those positions (and the rest elsewhere in the class), so the
training flags stay the same (--imbalance-ratio 100, --split-seed 0). Prints how many of
LDAM's images our own cut already keeps.
"""
import os
import sys

import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", ".."))
import data  # noqa: E402  (the repository's own cut and counts)


class _Labels:
    def __init__(self, targets):
        self.targets, self.classes = list(targets), sorted(set(int(t) for t in targets))


def main(src, dst):
    arrays = dict(np.load(src))
    y = arrays["y_train"]
    ours = np.asarray(data.long_tailed_subset(_Labels(y), 100.0, 0).indices)
    counts = data.long_tailed_counts(5000, 10, 100.0)
    np.random.seed(0)  # LDAM-DRW's IMBALANCECIFAR10(rand_number=0)
    x, all_theirs = arrays["x_train"].copy(), []
    for c, n in enumerate(counts):
        positions = np.flatnonzero(y == c)          # (5000,) this class, file-name order
        ranks = np.arange(len(positions))
        np.random.shuffle(ranks)                    # what LDAM's shuffle does to the class's indices
        theirs = positions[ranks[:n]]
        in_ours = np.isin(positions, ours)
        kept, rest = positions[in_ours], positions[~in_ours]   # where our cut looks, and the others
        others = positions[~np.isin(positions, theirs)]
        x[kept] = arrays["x_train"][theirs]
        x[rest] = arrays["x_train"][others]
        assert len(kept) == n
        print(f"class {c}: keeps {n}; ours and LDAM's share {len(np.intersect1d(theirs, kept))}")
        all_theirs += theirs.tolist()
    np.savez(dst, **arrays | {"x_train": x})
    # the cut on the new file (same labels, so the same positions) holds exactly LDAM's images
    again = np.asarray(data.long_tailed_subset(_Labels(y), 100.0, 0).indices)
    got = sorted(x[i].tobytes() for i in again)
    want = sorted(arrays["x_train"][i].tobytes() for i in all_theirs)
    assert got == want
    print(f"wrote {dst}: its cut keeps LDAM-DRW's {len(again)} images")


if __name__ == "__main__":
    main(*sys.argv[1:3])
