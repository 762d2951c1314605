"""Test-time checks of a seed-001 full-run checkpoint: its test top-1 in fp32 and in bf16
autocast + channels-last (the setting it trained and was evaluated in), on the decoded JPEG
test set and on make_data.py's two re-encodes of it. Run from the pinned worktree so the
model code is the run's own:

    cd ../seed001-worktree && PYTHONPATH=. OMP_NUM_THREADS=1 python \
        ../main/results/resnet32-cifar10-wu/seed001-gap/eval_checks.py CHECKPOINT ../data \
        > ../main/results/resnet32-cifar10-wu/seed001-gap/eval_checks.txt

(../seed001-worktree: the worktree at commit 5909c2f beside the checkout, ../main here, that
seed001-gap/run.sh creates when it is missing; ../data: the decoded copies.)
"""
import os
import sys
from types import SimpleNamespace

import torch

import evaluate as E
from train import build_datasets_from_args, build_model_from_args, evaluate, load_checkpoint


def main(checkpoint, data_dir):
    ckpt = load_checkpoint(checkpoint)
    train_args = {**vars(E.train_args_parser().parse_args([])), **ckpt["args"]}
    print(f"{os.path.relpath(checkpoint)}: iteration {ckpt['iteration']}, epoch {ckpt['epoch']}")
    for name in ("cifar10_full", "cifar10_full_reenc_aligned", "cifar10_full_reenc_shifted"):
        args = SimpleNamespace(**{**train_args, "download": False})
        args.data_path = os.path.join(data_dir, name + ".npz")
        _, test_set, num_classes = build_datasets_from_args(args)
        loader = E.make_test_loader(test_set, 500, 0, torch.device("cpu"), normalize=args.normalize)
        model = build_model_from_args(args, num_classes, load_weights=False)
        model.load_state_dict(ckpt["model"])
        for amp, channels_last in (("none", False), ("bf16", True)):
            args.amp, args.channels_last = amp, channels_last
            net = model.to(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
            result = evaluate(net, loader, torch.device("cpu"), num_classes, args=args)
            print(f"  test set {name}: amp {amp}, channels_last {channels_last}: "
                  f"top-1 {result['top1']:.2f}, loss {result['loss']:.4f}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
