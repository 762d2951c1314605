"""The machinery of train.py, kept out of its reading path (as torchvision keeps
references/classification/utils.py beside its train.py): the command line's
one-line errors and flag groups, devices and mixed precision, the optimizer step
that skips a non-finite loss on the device, the step meter and the run's
bookkeeping between steps (progress lines, signals, the non-finite stop),
checkpoints with every RNG state, data loaders, distributed setup, strict JSON.

Nothing here is a training method: the methods, their recipes and the training
loop are in train.py. Two things to know when copying it: the flag groups read
argparse's private lists (``_actions``, ``_action_groups``, ``_group_actions``,
``_defaults``), and the non-finite skip hands the fused SGD a ``found_inf`` tensor,
the hook torch's GradScaler uses (``backward_and_step``).
"""
import argparse
import builtins
import contextlib
import datetime
import functools
import json
import math
import os
import platform
import random
import signal
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

import data


# ----------------------------------------------------------------------------------
# Command line: one-line errors, value ranges, flag groups that apply to some runs only
# ----------------------------------------------------------------------------------
class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each flag's default, but not a None one (resolved later, or said in the help)."""

    def _get_help_string(self, action):
        return action.help if action.default is None else super()._get_help_string(action)


class OneLineErrorParser(argparse.ArgumentParser):
    """argparse, but a bad flag is one line on stderr (exit code 2), not the usage
    block; argparse's "argument --lr: must be > 0" reads "--lr must be > 0". --help
    shows the defaults (``HelpFormatter``)."""

    def __init__(self, *args, formatter_class=HelpFormatter, **kwargs):
        super().__init__(*args, formatter_class=formatter_class, **kwargs)

    def error(self, message):
        flags, sep, rest = message.partition(": must be ")
        if sep and flags.startswith("argument "):
            message = f"{flags[len('argument '):].split('/')[-1]} must be {rest}"
        self.exit(2, f"error: {message} (see --help)\n" if os.environ.get("RANK", "0") == "0" else None)  # torchrun


def ranged(kind, words, test):
    """An argparse ``type``: ``kind`` (int / float / a parser of its own) whose value
    must pass ``test``; else argparse reports "--flag must be <words>, got <value>"."""
    def parse(text):
        value = kind(text)
        if not test(value):
            raise argparse.ArgumentTypeError(f"must be {words}, got {text}")
        return value
    parse.__name__ = f"{getattr(kind, '__name__', 'value')} {words}"
    parse.words = words  # read by the generated flag test (test_all.py)
    return parse


def conditional_group(parser, title, when=None):
    """An argument group whose flags apply only when ``when`` = (in words, test on
    the parsed arguments) holds; ``check_groups`` rejects them otherwise."""
    group = parser.add_argument_group(title + (f" (with {when[0]})" if when else ""))
    group.when = when
    return group


POSITIVE = ranged(float, "> 0", lambda v: v > 0)
NON_NEGATIVE = ranged(float, ">= 0", lambda v: v >= 0)
COUNT = ranged(int, ">= 0", lambda v: v >= 0)
AT_LEAST_1 = ranged(int, ">= 1", lambda v: v >= 1)
AT_LEAST_2 = ranged(int, ">= 2", lambda v: v >= 2)
UNIT = ranged(float, "in [0, 1]", lambda v: 0 <= v <= 1)
BELOW_ONE = ranged(float, "in [0, 1)", lambda v: 0 <= v < 1)
GAMMA = ranged(float, "in (0, 1]", lambda v: 0 < v <= 1)
SEED = ranged(int, "in [0, 2**32)", lambda v: 0 <= v < 2 ** 32)
IMAGE_SIDE = ranged(int, ">= 16", lambda v: v >= 16)
STEP = ranged(int, "numbers >= 0 in increasing order", lambda v: v >= 0)
SMALL_DATASETS = data.SMALL_DATASETS
FILE_DATASETS = tuple(name for name in data.DATASETS if name not in SMALL_DATASETS)


def add_data_arguments(parser):
    """The flags of data.py's datasets and loaders."""
    group = functools.partial(conditional_group, parser)
    g = parser.add_argument_group("data")
    g.add_argument("--dataset", default="cifar10", choices=data.DATASETS, help="data.py's datasets (README: Data)")
    g.add_argument("--data-path", help="dataset root or .npz file (cifar default: ./data)")
    g.add_argument("--image-size", type=IMAGE_SIDE, help="input side (default: 32 for CIFAR/npz, else 224)")
    g.add_argument("--normalize", choices=sorted(data.NORMALIZATIONS),
                   help="pixel normalisation (default per dataset; seed001 = x*2/255-1)")
    g.add_argument("--val-split", type=BELOW_ONE, default=0.0, metavar="F",
                   help="hold out a stratified fraction F of the training set (seeded by --split-seed; after "
                        "the long-tailed cut) and evaluate it as val_* in metrics.jsonl: select on it, never on test")
    g.add_argument("--many-threshold", type=COUNT, default=100,
                   help="many-shot classes have more than this many training images")
    g.add_argument("--few-threshold", type=COUNT, default=20,
                   help="few-shot classes have fewer than this many training images")
    g.add_argument("--workers", type=COUNT, default=2, help="DataLoader worker processes")
    g.add_argument("--loader", default="auto", choices=["auto", "tensor", "torch"],
                   help="tensor: the uint8 training set lives on the device and batches are augmented "
                        "there in batched ops (also a file dataset of one image size, e.g. LFW, decoded once); "
                        "torch: DataLoader + PIL transforms; auto: tensor for in-memory arrays (CIFAR, npz)")
    group("downloads", ("--dataset cifar10 or cifar100", lambda a: a.dataset in ("cifar10", "cifar100"))).add_argument(
        "--download", action="store_true",
        help="download CIFAR into --data-path (without --data-path it is fetched into ./data when missing)")
    g = group("long-tailed data", ("--dataset cifar10, cifar100 or npz", lambda a: a.dataset in SMALL_DATASETS))
    g.add_argument("--imbalance-ratio", type=ranged(float, ">= 1", lambda v: v >= 1), metavar="BETA",
                   help="make the training set long-tailed: n_max/n_min = BETA")
    group("hybrid views", ("a hybrid --loss on CIFAR / npz", lambda a: a.dataset in SMALL_DATASETS
                                 and getattr(a, "loss", "").startswith("hybrid-"))).add_argument(
        "--hybrid-crop", default="pad", choices=["pad", "resized"],
        help="the 32-px crop of both streams (the digest: '32x32 random crop'): 4-px padding + random crop, "
             "or SupContrast's CIFAR RandomResizedCrop(32, scale 0.2-1)")
    group("hybrid CE batch", ("a hybrid --loss", lambda a: getattr(a, "loss", "").startswith("hybrid-"))).add_argument(
        "--hybrid-ce-sampler", default="class-balanced", choices=["class-balanced", "instance"],
        help="how the CE branch draws its batch: class-balanced (our reading: the digest names no sampler, its "
             "introduction says class-balanced sampling suits classifier learning) or instance, shuffled")
    group("LFW", ("--dataset lfw", lambda a: a.dataset == "lfw")).add_argument(
        "--lfw-top-k", type=AT_LEAST_2, default=20, help="keep the k identities with most images")
    group("CUB", ("--dataset cub", lambda a: a.dataset == "cub")).add_argument(
        "--cub-classes", type=AT_LEAST_2, help="keep the first N classes, 8:2 split")
    group("splits", ("--dataset lfw or cub, --imbalance-ratio or --val-split",
                     lambda a: a.dataset in ("lfw", "cub") or a.imbalance_ratio is not None or a.val_split > 0)
          ).add_argument("--split-seed", type=SEED, default=0,
                         help="seed of the LFW / CUB-subset 8:2 split, the long-tailed subset and the "
                              "validation split (fixed across --seed on purpose)")
    group("image files", ("a file-based --dataset (" + ", ".join(FILE_DATASETS) + ")",
                          lambda a: a.dataset in FILE_DATASETS)).add_argument(
        "--skip-corrupt", action="store_true", help="open every image once at start and drop unreadable ones")


def add_run_arguments(parser):
    """The flags of the machinery: device, precision, output, checkpoints, distribution."""
    g = parser.add_argument_group("run")
    g.add_argument("--seed", type=SEED, default=0, help="seeds every RNG (init, data order, augmentation)")
    g.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, ...")
    g.add_argument("--amp", default="none", choices=["none", "bf16", "fp16"],
                   help="autocast mixed precision for training and evaluation (fp16 with GradScaler, CUDA only)")
    g.add_argument("--channels-last", action="store_true", help="NHWC memory format for model and inputs")
    g.add_argument("--compile", default="none", choices=["none", "default", "reduce-overhead", "max-autotune"],
                   help="torch.compile mode for the training and evaluation forward")
    g.add_argument("--output-dir", help="default: runs/<recipe or dataset>-<model>-<loss>-seed<seed>")
    g.add_argument("--eval-every", type=AT_LEAST_1, default=1, help="evaluate every N epochs (and at the end)")
    g.add_argument("--print-freq", type=AT_LEAST_1, default=50, help="progress line every N iterations")
    g.add_argument("--resume", help="checkpoint.pth to continue from, exactly where it stopped; "
                   "'auto' = output-dir/checkpoint.pth if it exists")
    g.add_argument("--save-every", type=COUNT, default=0,
                   help="also checkpoint every N iterations (always at the end of each epoch)")
    g.add_argument("--skip-nonfinite", type=COUNT, default=0,
                   help="skip up to K batches whose loss is NaN/inf instead of stopping")
    g.add_argument("--deterministic", action="store_true",
                   help="torch.use_deterministic_algorithms + cuDNN deterministic (slower on GPU)")
    g.add_argument("--debug", action="store_true", help="show tracebacks instead of one-line errors")
    conditional_group(parser, "distributed", ("torchrun (WORLD_SIZE > 1)",
                                              lambda a: int(os.environ.get("WORLD_SIZE", 1)) > 1)
                      ).add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes")


def option_names(parser):
    """dest -> the flag as typed (lam -> --lambda)."""
    return {a.dest: a.option_strings[-1] for a in parser._actions if a.option_strings and a.dest != "help"}


def flag_conditions(parser):
    """dest -> (in words, test) of the group it belongs to, for conditional flags."""
    return {a.dest: group.when for group in parser._action_groups if getattr(group, "when", None)
            for a in group._group_actions}


def explicit_dests(parser, argv):
    """The dests of the flags actually typed in ``argv`` (not defaults, not a recipe's)."""
    saved, saved_defaults = {a.dest: a.default for a in parser._actions}, parser._defaults
    for action in parser._actions:
        action.default = argparse.SUPPRESS
    parser._defaults = {}  # a recipe's values (set_defaults) are not typed either
    try:
        return set(vars(parser.parse_args(argv)))
    finally:
        parser._defaults = saved_defaults
        for action in parser._actions:
            action.default = saved[action.dest]


def switched_off(parser, args):
    """The dests of the conditional flags whose group does not apply to ``args``."""
    return {dest for dest, (_, applies) in flag_conditions(parser).items() if not applies(args)}


def check_groups(parser, args, argv):
    """The first flag typed in ``argv`` whose group does not apply to ``args``, as
    one line, or None."""
    explicit, names, conditions = explicit_dests(parser, argv), option_names(parser), flag_conditions(parser)
    for dest in sorted(switched_off(parser, args) & explicit, key=list(conditions).index):
        return f"{names[dest]} applies only with {conditions[dest][0]}; drop it or change the run"
    return None


def config_line(parser, args, defaults):
    """The recipe and the flags (used by this run) that differ from ``defaults``, in one line."""
    names, conditions = option_names(parser), flag_conditions(parser)
    changed = []
    for dest, value in vars(args).items():
        if dest in ("recipe", "output_dir") or dest not in names or value == defaults.get(dest) \
                or (dest in conditions and not conditions[dest][1](args)):  # unused by this run
            continue
        if isinstance(value, bool):
            changed.append(names[dest])
        else:
            shown = (" ".join(map(str, value)) or "(none)") if isinstance(value, list) else value
            changed.append(f"{names[dest]} {shown}")
    recipe = args.recipe + (" (matched the setup; --recipe none turns it off)" if args.recipe_matched else "")
    return f"config: recipe {recipe}; " + (" ".join(changed) or "all defaults") + \
        f"; the full configuration is in {os.path.join(args.output_dir, 'config.json')}"


def stage_list(text):
    """'1,2' -> [1, 2]: stage indices >= 0 in increasing order (--deep-sup, --heads)."""
    try:
        stages = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be stage indices like 1 or 1,2, got {text}") from None
    if any(s < 0 for s in stages) or stages != sorted(set(stages)):
        raise argparse.ArgumentTypeError(f"must be stage indices >= 0 in increasing order, got {text}")
    return stages


stage_list.words = "stage indices >= 0 in increasing order"


def run_with_one_line_errors(main, args):
    """``main(args)``, with a DataError turned into one line on stderr and exit code 2
    (a bad flag already exits with 2 in the parser); --debug shows the traceback."""
    try:
        return main(args)
    except data.DataError as e:
        if args.debug:
            raise
        print(f"error: {one_line(e)}", file=sys.stderr)
        return 2


def one_line(error):
    """The user's line of a DataError, also when a DataLoader worker re-raised it
    wrapped in its own traceback text."""
    last = (str(error).strip().splitlines() or [""])[-1]
    return last.split("DataError: ", 1)[-1]


# ----------------------------------------------------------------------------------
# Devices, seeds, mixed precision, the optimizer step
# ----------------------------------------------------------------------------------
def seed_everything(seed, deterministic=False):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic:
        # cuBLAS needs a fixed workspace for deterministic matmuls (CUDA >= 10.2).
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True)
        torch.backends.cudnn.benchmark = False
        torch.backends.cudnn.deterministic = True
    else:  # fixed input shapes: let cuDNN time its kernels once and keep the fastest (GPU only), as torchvision's reference
        torch.backends.cudnn.benchmark = True


def resolve_device(name):
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(amp, device_type):
    """torch.autocast for ``amp`` "bf16" / "fp16"; a no-op context for "none"."""
    if amp == "none":
        return contextlib.nullcontext()
    return torch.autocast(device_type, dtype=AMP_DTYPES[amp])


LOSS_INPUTS = ("logits", "embedding", "projection", "aux_logits")


def to_float32(out, keys=LOSS_INPUTS):
    """The entries ``keys`` of a model's output dict (tensors or lists of tensors) in
    fp32: what autocast left in bf16 / fp16 is cast up, so the loss that follows is
    computed in fp32. Only what a loss reads: an fp32 copy of every stage's feature
    map would live until the backward pass ends."""
    def up(value):
        return [up(v) for v in value] if isinstance(value, (list, tuple)) else value.float()
    return {k: up(out[k]) for k in keys if k in out}


def to_device(tensor, device, channels_last=False):
    """A batch tensor on ``device``; images (4-d) contiguous, or channels-last when asked."""
    if tensor.dim() == 4:
        memory_format = torch.channels_last if channels_last else torch.contiguous_format
        return tensor.to(device, non_blocking=True, memory_format=memory_format)
    return tensor.to(device, non_blocking=True)


def fused_sgd_works(device):
    """True where torch has a fused SGD kernel for ``device`` (CPU and CUDA in recent
    torch). Its step reads a device flag (``found_inf``) and leaves everything
    untouched when it is set, so a non-finite loss is skipped without the host
    ever reading the loss (see ``backward_and_step``)."""
    p = torch.zeros(1, device=device, requires_grad=True)
    p.grad = torch.zeros(1, device=device)
    try:
        torch.optim.SGD([p], lr=0.1, momentum=0.9, fused=True).step()
        return True
    except (RuntimeError, ValueError):
        return False


def match_momentum_layouts(optimizer, saved_channels_last):
    """Give every loaded momentum buffer its weight's memory layout, keeping its values:
    SGD's fused kernel walks buffer and weight in memory order (CUDA refuses differing
    strides; the CPU kernel silently mixes them up), and a run may resume with another
    --channels-last. A channels-last run saved before the optimizer was built after the
    conversion holds 4-d buffers with contiguous strides but the weight's NHWC memory
    order: those are read back as NHWC."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            buf = optimizer.state.get(p, {}).get("momentum_buffer")
            if buf is None:
                continue
            if saved_channels_last and buf.dim() == 4 and buf.is_contiguous():  # (N, C, H, W) labels, NHWC memory
                n, c, h, w = buf.shape  # (where both layouts coincide, e.g. 1x1 kernels, this reads the same values)
                buf = buf.reshape(n, h, w, c).permute(0, 3, 1, 2)
            optimizer.state[p]["momentum_buffer"] = buf if buf.stride() == p.stride() else torch.empty_like(p).copy_(buf)


def init_momentum_buffers(optimizer):
    """Give every parameter with momentum a zero momentum buffer before its first step.
    SGD with dampening 0 then computes buf = 0.9 * 0 + g = g on the first step, the
    same as when it creates the buffer itself; but a first step that the fused kernel
    skips (``found_inf``) would otherwise leave an uninitialised buffer behind."""
    for group in optimizer.param_groups:
        if group["momentum"] != 0:
            for p in group["params"]:
                optimizer.state[p].setdefault("momentum_buffer", torch.zeros_like(p, memory_format=torch.preserve_format))


def backward_and_step(optimizer, loss, scaler=None):
    """``loss.backward()`` and one optimizer step, applied only when ``loss`` is
    finite. Returns a 0-dim bool tensor on the loss's device: True if the loss
    was finite (with fp16 the GradScaler may still skip a step whose gradients overflowed).

    The host never reads ``loss`` here: with a fused SGD a non-finite loss sets
    the kernel's ``found_inf`` flag on the device, and the step leaves
    parameters, momentum buffers and centers untouched. With ``--amp fp16`` the
    GradScaler does the same (a non-finite loss gives non-finite gradients, which
    it skips, halving its scale). Only an optimizer without a fused kernel (e.g.
    on MPS) falls back to one host check per step. Gradients are set to None
    first, so parameters that ``loss`` does not reach have no gradient and SGD
    leaves them, their weight decay and their momentum buffers untouched."""
    optimizer.zero_grad(set_to_none=True)
    finite = torch.isfinite(loss.detach())                                  # (), bool, on the device
    if world_size() > 1:  # DDP averages the gradients: one process's NaN reaches all, so all skip
        finite = finite.float()
        dist.all_reduce(finite, op=dist.ReduceOp.MIN)                       # a device op, no host sync
        finite = finite.bool()
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return finite
    if not optimizer.defaults.get("fused"):
        if finite:  # a device sync: only without a fused kernel
            loss.backward()
            optimizer.step()
        return finite
    loss.backward()
    optimizer.found_inf = (~finite).float()   # read by the fused kernel on the device
    try:
        optimizer.step()
    finally:
        del optimizer.found_inf
    return finite


# ----------------------------------------------------------------------------------
# The run between two steps: loss sums on the device, progress, signals, non-finite stop
# ----------------------------------------------------------------------------------
class StopTraining(Exception):
    """Raised between two steps: a signal asked us to stop, or the loss went
    non-finite. Carries the exit code."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


class StepMeter:
    """The epoch's loss sums and the non-finite guard, kept on the device: a step adds
    to them without the host reading anything (a ``.item()`` per term per step
    would make the host wait for the GPU several times per iteration). ``read()``
    copies everything to the host in one transfer; the run calls it once per
    ``--print-freq`` window, at the end of the epoch and before a checkpoint.

    sums: {name: float} and count: the epoch so far (a resumed epoch's progress);
    nonfinite: non-finite steps since the run started; iteration: the global
    iteration of the next step."""

    def __init__(self, device, iteration, sums=None, count=0, nonfinite=0):
        self.dtype = torch.float32 if device.type == "mps" else torch.float64
        self.names = list(sums or {})
        self.sums = torch.tensor([sums[k] for k in self.names], dtype=self.dtype, device=device)   # (T,)
        self.count = torch.tensor(float(count), dtype=self.dtype, device=device)
        self.nonfinite = torch.tensor(float(nonfinite), dtype=self.dtype, device=device)
        self.iteration = torch.tensor(float(iteration), dtype=self.dtype, device=device)
        self.first_bad = torch.tensor(-1.0, dtype=self.dtype, device=device)   # not yet reported
        self.bad_terms = torch.zeros(len(self.names), dtype=torch.bool, device=device)

    def add(self, loss, parts, finite):
        """loss, parts' values: 0-dim tensors; finite: 0-dim bool (the step applied)."""
        names = ["loss", *parts]
        if names != self.names:
            if self.names:
                raise RuntimeError(f"loss terms changed within an epoch: {self.names} -> {names}")
            self.names = names
            self.sums = self.sums.new_zeros(len(names))
            self.bad_terms = self.bad_terms.new_zeros(len(names))
        values = torch.stack([loss.detach().to(self.dtype)] + [v.to(self.dtype) for v in parts.values()])  # (T,)
        bad = ~finite
        self.sums += torch.where(finite, values, 0.0)       # a skipped step adds nothing
        self.count += finite
        self.nonfinite += bad
        self.bad_terms |= bad & ~torch.isfinite(values)
        self.first_bad = torch.where(bad & (self.first_bad < 0), self.iteration, self.first_bad)
        self.iteration += 1

    def read(self):
        """One device-to-host copy -> {"sums": {name: float}, "count": int,
        "nonfinite": int, "first_bad": int or None, "bad_terms": [names]}."""
        flat = torch.cat([self.sums, torch.stack([self.count, self.nonfinite, self.first_bad]),
                          self.bad_terms.to(self.dtype)]).tolist()
        T = len(self.names)
        count, nonfinite, first_bad = flat[T:T + 3]
        return {"sums": dict(zip(self.names, flat[:T])), "count": int(count), "nonfinite": int(nonfinite),
                "first_bad": int(first_bad) if first_bad >= 0 else None,
                "bad_terms": [n for n, b in zip(self.names, flat[T + 3:]) if b and n != "loss"]}

    def reported(self):
        """Forget the non-finite steps just reported (device ops only)."""
        self.first_bad.fill_(-1.0)
        self.bad_terms.zero_()


class Run:
    """Where a training run stands and what happens between two steps.

    State (saved in the checkpoint as ``progress``): the global ``iteration``, the
    epoch's loss sums so far, the non-finite steps skipped, the seconds trained.
    Between steps (``end_step``): the progress line every ``print_freq``
    iterations, the non-finite check (stop with exit code 3 beyond
    ``skip_nonfinite``), a pending SIGINT / SIGTERM (finish the step, save, stop
    with 128 + signal), ``save_every`` checkpoints. ``save()`` is the caller's
    checkpoint writer. Distributed, every process must stop at the same step: a
    signal is acted on at the next progress line, once the processes have agreed
    on it (one all-reduce per line, with the non-finite count)."""

    PROGRESS = ("iteration", "epoch_sums", "epoch_count", "skipped_nonfinite", "seconds")

    def __init__(self, total_iters, iters_per_epoch, images_per_step, device, print_freq=50, save_every=0,
                 skip_nonfinite=0, save=lambda: None, world_size=1):
        self.total_iters, self.iters_per_epoch, self.images_per_step = total_iters, iters_per_epoch, images_per_step
        self.device, self.print_freq, self.save_every, self.skip_nonfinite = device, print_freq, save_every, skip_nonfinite
        self.save, self.world_size, self.stop_agreed = save, world_size, False
        self.iteration, self.epoch_sums, self.epoch_count, self.skipped_nonfinite, self.seconds = 0, {}, 0, 0, 0.0
        self.stop_signal = None

    def progress(self):
        self.seconds = time.time() - self.start_time
        return {k: getattr(self, k) for k in self.PROGRESS}

    def begin(self, progress=None):
        """Start (or continue from a checkpoint's ``progress``) the clock and the counters."""
        for key, value in (progress or {}).items():
            setattr(self, key, value)
        # start_time is shifted by the seconds already trained, so "seconds" keeps counting across resumes
        self.start_iteration, self.process_start = self.iteration, time.time()
        self.start_time = time.time() - self.seconds

    @contextlib.contextmanager
    def signals_stop_at_a_step_boundary(self):
        """SIGINT / SIGTERM set ``stop_signal``; the run saves and stops after the
        step in flight (distributed: at the next progress line). A second Ctrl-C stops
        at once; a repeated SIGTERM (a launcher signalling every process, then torchrun
        forwarding it) changes nothing, so the checkpoint is still written."""
        def on_signal(signum, frame):
            if self.stop_signal is not None:
                if signum == signal.SIGINT:
                    raise KeyboardInterrupt
                return
            self.stop_signal = signum
            when = "at the next progress line" if self.world_size > 1 else "after this step"
            print(f"signal {signum}: stopping {when}, then saving a checkpoint", flush=True)

        previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def start_epoch(self, epoch):
        """-> a fresh StepMeter (holding the epoch's sums so far when resumed mid-epoch)."""
        if self.iteration == epoch * self.iters_per_epoch:
            self.epoch_sums, self.epoch_count = {}, 0
        self.epoch, self.epoch_end = epoch, min((epoch + 1) * self.iters_per_epoch, self.total_iters)
        self.window_start, self.window_images, self.means, self.read_at = time.time(), 0, None, None
        return StepMeter(self.device, self.iteration, self.epoch_sums, self.epoch_count, self.skipped_nonfinite)

    def end_step(self, meter, lr):
        """After a step: count it, print / check / save when due. True when the epoch ended."""
        self.iteration += 1
        self.window_images += self.images_per_step
        due = self.iteration % self.print_freq == 0 or self.iteration == self.total_iters
        if due:
            self.read(meter)
            now = time.time()
            eta = (now - self.process_start) / (self.iteration - self.start_iteration) * (self.total_iters - self.iteration)
            print(f"epoch {self.epoch} iter {self.iteration}/{self.total_iters} "
                  + " ".join(f"{k} {v:.4f}" for k, v in self.means.items())
                  + f" lr {lr:.4g} {self.window_images / max(now - self.window_start, 1e-9):.1f} img/s"
                  f" eta {datetime.timedelta(seconds=int(eta))}", flush=True)
            self.window_start, self.window_images = now, 0
        if self.iteration == self.epoch_end:
            return True  # the caller evaluates, saves, and honours a pending signal
        if self.stopping():
            self.read(meter)
            self.save()
            self.stop_if_signalled(f"at iteration {self.iteration}")
        if self.save_every and self.iteration % self.save_every == 0:
            self.read(meter)
            self.save()
        return False

    def end_epoch(self, meter):
        """The epoch's mean loss terms."""
        return self.read(meter)

    def read(self, meter):
        """``check`` once per iteration (a progress line, a checkpoint and the epoch's end
        may fall on the same one). Returns the epoch's mean loss terms so far."""
        if self.read_at != self.iteration:
            self.means, self.read_at = self.check(meter), self.iteration
        return self.means

    def check(self, meter):
        """Read ``meter`` (one device sync). Non-finite steps since the last check: stop
        with exit code 3 when there are more than ``skip_nonfinite`` in the run,
        else warn. Those steps changed nothing (``backward_and_step``); the steps
        after them did apply. Called before every checkpoint, so no checkpoint is
        written after a non-finite step that stops the run: the last good one stays.
        Returns the epoch's mean loss terms so far."""
        r = meter.read()
        if self.world_size > 1:  # every process decides alike: any process's signal stops them all
            flag = torch.tensor(float(self.stop_signal is not None), device=meter.count.device)
            dist.all_reduce(flag)
            self.stop_agreed = flag.item() > 0
        self.epoch_sums, self.epoch_count = r["sums"], r["count"]
        new = r["nonfinite"] - self.skipped_nonfinite
        if new > 0:
            where = (f"non-finite loss ({', '.join(r['bad_terms']) or 'total'}) at iteration {r['first_bad']}"
                     + (f" and {new - 1} more step(s) since" if new > 1 else ""))
            if r["nonfinite"] > self.skip_nonfinite:
                raise StopTraining(f"{where}; stopped, the last good checkpoint stays on disk "
                                   f"(lower --lr / --center-lr, or pass --skip-nonfinite K)", 3)
            self.skipped_nonfinite = r["nonfinite"]
            meter.reported()
            print(f"warning: {where}; skipped: that step (MKSMT: that sub-step) changed nothing "
                  f"({r['nonfinite']}/{self.skip_nonfinite})", flush=True)
        return {k: v / max(r["count"], 1) for k, v in r["sums"].items()}

    def stopping(self):
        """A signal asked to stop: this process, or, distributed, any process (as agreed
        at the last check, so that all stop at the same step)."""
        return self.stop_agreed if self.world_size > 1 else self.stop_signal is not None

    def stop_if_signalled(self, where):
        """Called after save(): stop (every process) if a signal asked to."""
        if self.stopping():
            if self.world_size > 1:
                dist.barrier()  # no process exits (and so makes torchrun stop the others) before rank 0 has saved
            code = self.stop_signal or signal.SIGTERM  # a process the signal did not reach stops as if sent SIGTERM
            raise StopTraining(f"stopped by signal {code} {where}; continue with the same command plus "
                               f"--resume auto", 128 + code)


# ----------------------------------------------------------------------------------
# Checkpoints: a plain dict with every RNG state, atomic writes, exact resume
# ----------------------------------------------------------------------------------
def rng_states(device=None):
    """Every global RNG the training step may draw from (dropout, stochastic depth),
    as tensors / plain Python values so the checkpoint loads with weights_only. CUDA:
    the generator of the training ``device`` only (each process has its own)."""
    _, keys, pos, has_gauss, cached_gaussian = np.random.get_state()
    return {"python": random.getstate(),
            "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos,
                      "has_gauss": has_gauss, "cached_gaussian": cached_gaussian},
            "torch": torch.get_rng_state(),
            "cuda": [torch.cuda.get_rng_state(device)] if device is not None and device.type == "cuda" else []}


def set_rng_states(states, device=None):
    version, internal, gauss_next = states["python"]
    random.setstate((version, tuple(internal), gauss_next))
    n = states["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(states["torch"])
    if states["cuda"] and torch.cuda.is_available():
        if len(states["cuda"]) == 1:
            if device is not None and device.type == "cuda":
                torch.cuda.set_rng_state(states["cuda"][0], device)
        else:  # an older checkpoint holds every device's state
            torch.cuda.set_rng_state_all(states["cuda"])


def save_checkpoint(state, path):
    """Atomic: write a temporary file in the same folder, fsync, then rename, so a
    kill at any moment leaves either the old or the new checkpoint, never a torn one."""
    tmp = path + ".tmp"
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_training_checkpoint(path, rank, run, model, criterion, optimizer, scheduler, scaler, args, data_facts):
    """Called on every process: the RNG states of all are gathered (each process draws
    its own dropout masks), then rank 0 writes the checkpoint."""
    rng = rng_states(run.device)
    if world_size() > 1:
        per_rank = [None] * world_size()
        dist.all_gather_object(per_rank, rng)
    if rank == 0:
        ckpt = training_checkpoint(run, model, criterion, optimizer, scheduler, scaler, args, data_facts, rng)
        save_checkpoint({**ckpt, **({"rng_per_rank": per_rank} if world_size() > 1 else {})}, path)


def training_checkpoint(run, model, criterion, optimizer, scheduler, scaler, args, data_facts, rng):
    """The checkpoint dict: model, loss parameters (centers, prototypes), optimizer,
    scheduler, the run's progress, the RNG states, the resolved arguments, and
    ``data_facts`` (num_classes, the class names, training images per class)."""
    return {"model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "criterion": criterion.state_dict() if criterion is not None else {},
            "scheduler": scheduler.state_dict(), "epoch": run.iteration // run.iters_per_epoch,
            "iteration": run.iteration, "progress": run.progress(), "rng": rng,
            "world_size": run.world_size, **data_facts, "args": vars(args),
            **({"scaler": scaler.state_dict()} if scaler is not None else {})}


def load_checkpoint(path):
    """torch.load(weights_only=True) with one-line errors for a missing, truncated
    or foreign file."""
    if not os.path.isfile(path):
        raise data.DataError(f"checkpoint {path} not found: pass --checkpoint/--resume runs/<name>/checkpoint.pth")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:
        reason = (str(e).strip().splitlines() or [e.__class__.__name__])[0]
        raise data.DataError(f"cannot load checkpoint {path}: truncated or not a torch file ({reason})") from None
    lacking = [k for k in ("model", "iteration", "args") if not isinstance(ckpt, dict) or k not in ckpt]
    if lacking:
        raise data.DataError(f"{path} is not a train.py checkpoint: it has no {', '.join(lacking)}")
    return ckpt


def load_state_checked(module, state, path, what):
    """load_state_dict, but a mismatch is one line naming the keys that do not fit."""
    own = module.state_dict()
    problems = {"missing": [k for k in own if k not in state],
                "unexpected": [k for k in state if k not in own],
                "wrong shape": [k for k in own if k in state and state[k].shape != own[k].shape]}
    if any(problems.values()):
        raise data.DataError(f"checkpoint {path} does not fit this {what}: " + "; ".join(
            f"{len(keys)} {kind} (e.g. {', '.join(keys[:3])})" for kind, keys in problems.items() if keys))
    module.load_state_dict(state)


def resume(args, model, criterion, optimizer, scheduler, scaler):
    """--resume PATH / auto: load model, loss parameters, optimizer, scheduler and scaler,
    and check the global batch. Returns (path, checkpoint) or (None, None) for a fresh run."""
    ckpt_path = os.path.join(args.output_dir, "checkpoint.pth")
    path = ckpt_path if args.resume == "auto" else args.resume
    if args.resume == "auto" and not os.path.exists(ckpt_path):
        print(f"--resume auto: no {ckpt_path} yet, starting fresh", flush=True)
        path = None
    if path is None:
        return None, None
    ckpt = load_checkpoint(path)
    # settings whose defaults changed and that no tensor records: a resumed run must not switch them silently
    # (and --loss: center and contrastive-center keep the same (K, d) centers, so their checkpoints load into each other)
    for dest, before_flag in (("loss", None), ("ctc_reduction", None), ("hybrid_crop", "pad"),  # before_flag: older
                              ("hybrid_ce_sampler", "class-balanced"), ("recipe", None)):  # recipe: matching changed
        saved, flag = ckpt["args"].get(dest, before_flag), "--" + dest.replace("_", "-")
        if saved is not None and saved != getattr(args, dest, saved):
            raise data.DataError(f"checkpoint {path} was trained with {flag} {saved}, this run has "
                                 f"{getattr(args, dest)}: pass {flag} {saved} to continue it")
    try:
        load_state_checked(model, ckpt["model"], path, args.model)
    except data.DataError as e:  # a checkpoint from before --image-size / --head-width were resolved
        old = ckpt["args"]
        unset = [hint for hint, applies in (
            ("--head-width 512 (Swin's heads were 512 wide)",
             old.get("loss") == "mksmt" and str(old.get("model")).startswith("swin") and old.get("head_width") is None),
            ("the code that wrote it (its model has the 32-px stem, its data the dataset's size)",
             "image_size" in old and old["image_size"] is None and old.get("dataset") not in SMALL_DATASETS)) if applies]
        raise data.DataError(str(e) + ("; it was trained with these unset, resume it with " + " or ".join(unset)
                                       if unset else "")) from None
    if criterion is not None:
        load_state_checked(criterion, ckpt.get("criterion", {}), path, f"--loss {args.loss}")
    try:
        optimizer.load_state_dict(ckpt["optimizer"])
        init_momentum_buffers(optimizer)  # a checkpoint from before a parameter's first step
        match_momentum_layouts(optimizer, ckpt["args"].get("channels_last", False))
        scheduler.load_state_dict(ckpt["scheduler"])
    except (ValueError, KeyError) as e:
        raise data.DataError(f"checkpoint {path} was trained with other optimizer groups "
                             f"(a different --loss?): {e}") from None
    if scaler is not None and "scaler" in ckpt:
        scaler.load_state_dict(ckpt["scaler"])
    # iterations count global batches: another global batch would shift epochs, milestones and the data order
    saved_world, saved_batch = checkpoint_world_size(ckpt), ckpt["args"].get("batch_size")
    if saved_world is None:
        print(f"{path} does not record its number of processes (an older checkpoint): resume it at the global "
              f"batch it was trained with (it ran --batch-size {saved_batch} per process)", flush=True)
    elif saved_world * saved_batch != world_size() * args.batch_size:
        raise data.DataError(f"checkpoint {path} was trained at a global batch of {saved_world} process(es) x "
                             f"{saved_batch}; this run's is {world_size()} x {args.batch_size}: resume it with "
                             f"the same product")
    return path, ckpt


def checkpoint_world_size(ckpt):
    """The number of processes that trained ``ckpt``; None for an older checkpoint
    that recorded neither it nor per-process RNG states."""
    return ckpt.get("world_size", len(ckpt.get("rng_per_rank", [])) or None)


def restore_progress(path, ckpt, rank=0, device=None):
    """The RNG states and the run's progress of a checkpoint that ``resume`` loaded."""
    per_rank = ckpt.get("rng_per_rank", [])
    if len(per_rank) == world_size() > 1:
        set_rng_states(per_rank[rank], device)
    elif "rng" not in ckpt:
        print(f"{path} holds no RNG states (older format): the resumed run is not bit-exact", flush=True)
    elif (checkpoint_world_size(ckpt) or 1) != world_size():  # the same global batch, another process count
        if rank == 0:
            set_rng_states(ckpt["rng"], device)
        written = checkpoint_world_size(ckpt) or "an unknown number of"
        print(f"{path} was written by {written} process(es), this run has {world_size()}: rank 0 restores "
              f"rank 0's RNG state, the others keep their seed; the resumed run is not bit-exact", flush=True)
    else:
        set_rng_states(ckpt["rng"], device)
    progress = ckpt.get("progress", {"iteration": ckpt["iteration"]})
    print(f"resumed from {path} at iteration {progress['iteration']}", flush=True)
    return progress


def keep_metrics_up_to(path, iteration, source=None):
    """On resume, ``path`` (metrics.jsonl) keeps the resumed run's rows up to its
    checkpoint's ``iteration``, taken from ``source``, the checkpoint's own folder's
    metrics.jsonl (default: ``path``): a kill between a row and the checkpoint would
    otherwise leave a duplicate, and a folder resumed into from another folder's
    checkpoint would mix its old rows with this run's."""
    source = source or path
    rows = []
    if os.path.exists(source):
        with open(source) as f:
            rows = [line for line in f if line.strip() and json.loads(line)["iteration"] <= iteration]
    if not rows and not os.path.exists(path):
        return
    with open(path + ".tmp", "w") as f:
        f.writelines(rows)
    os.replace(path + ".tmp", path)


# ----------------------------------------------------------------------------------
# Output folder, metrics rows, strict JSON
# ----------------------------------------------------------------------------------
def default_output_dir(args):
    # model and loss in the name: runs of one recipe with another backbone or loss must not share a folder
    prefix = args.recipe if args.recipe not in (None, "none") else args.dataset
    return os.path.join("runs", f"{prefix}-{args.model}-{args.loss}-seed{args.seed}")


def cpu_name():
    """The CPU's model name (Linux), else what ``platform`` knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def environment(device, world_size):
    """What a run ran on, for config.json: versions, device, processes, threads."""
    import torchvision  # only for its version
    return {"torch": torch.__version__, "torchvision": torchvision.__version__, "numpy": np.__version__,
            "python": platform.python_version(), "device": str(device),
            "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name(),
            "cuda": torch.version.cuda if device.type == "cuda" else None,
            "cudnn": torch.backends.cudnn.version() if device.type == "cuda" else None,
            "processes": world_size, "threads": torch.get_num_threads()}


def run_summary(model_name, num_parameters, sets, num_classes, schedule, device, world_size, loader,
                milestones=(), milestone_unit="iter"):
    """The line a run prints before training: model, data sizes, schedule, device, loader,
    and the lr milestones that fall after the last iteration (a silent no-op otherwise)."""
    (train_set, val_set, test_set), (iters_per_epoch, total_iters, epochs) = sets, schedule
    late = [m for m in milestones if m * (1 if milestone_unit == "iter" else iters_per_epoch) >= total_iters]
    return (f"{model_name}: {num_parameters / 1e6:.3f}M parameters; {len(train_set)} train / "
            + (f"{len(val_set)} validation / " if val_set is not None else "")
            + f"{len(test_set)} test images, {num_classes} classes; {iters_per_epoch} iterations per epoch, "
            f"{total_iters} in all ({epochs} epochs) on {device}"
            + (f" x {world_size} processes" if world_size > 1 else "") + f"; loader {loader}"
            + (f"; lr milestones {late} ({milestone_unit}s) come after the end: never applied" if late else ""))


def prepare_output_dir(args, resumed_at=None, resumed_from=None, environment=None):
    """Create --output-dir, write config.json (every resolved flag, plus ``environment``
    under that key; a resumed segment rewrites it), and remove its metrics.jsonl (a
    fresh run never mixes with an old run's rows) or, resumed at iteration
    ``resumed_at`` from checkpoint ``resumed_from``, make it that checkpoint's folder's
    rows up to that iteration; or fail with one line."""
    try:
        os.makedirs(args.output_dir, exist_ok=True)
        path = os.path.join(args.output_dir, "config.json")
        with open(path + ".tmp", "w") as f:
            json.dump({**vars(args), "environment": environment}, f, indent=2, sort_keys=True)
        os.replace(path + ".tmp", path)
        metrics_path = os.path.join(args.output_dir, "metrics.jsonl")
        if resumed_at is not None:
            # another run folder's history comes along; a checkpoint kept elsewhere (a backup) trims this one's
            source = os.path.join(os.path.dirname(os.path.abspath(resumed_from or metrics_path)), "metrics.jsonl")
            keep_metrics_up_to(metrics_path, resumed_at, source if os.path.exists(source) else None)
        elif os.path.exists(metrics_path):
            os.remove(metrics_path)
    except OSError as e:
        raise data.DataError(f"cannot write to --output-dir {args.output_dir} ({e.strerror}); "
                             f"pass a writable folder") from None


def log_evaluation(metrics_path, epoch, iteration, train_stats, results, extra):
    """Append one row to metrics.jsonl and print the evaluation line. ``results``
    maps "val" (with --val-split) and "test" to evaluate()'s output; their keys
    become val_* and test_* columns. ``extra``: the row's last columns."""
    record = {"epoch": epoch, "iteration": iteration, **{f"train_{k}": v for k, v in train_stats.items()}}
    for split, result in results.items():
        record.update({f"{split}_top1": result["top1"], f"{split}_top5": result["top5"],
                       f"{split}_balanced_top1": result["balanced_top1"], f"{split}_loss": result["loss"],
                       **{f"{split}_{k}": v for k, v in result.items()
                          if k.startswith(("aux_top1", "head_top1")) or k in ("many_top1", "medium_top1", "few_top1")}})
    record.update(extra)
    with open(metrics_path, "a") as f:
        f.write(json.dumps(strict_json(record), allow_nan=False) + "\n")
    line = f"eval epoch {epoch}: train loss {train_stats.get('loss', float('nan')):.4f}"
    for split, result in results.items():
        shots = [(g, result[g + "_top1"]) for g in ("many", "medium", "few")
                 if result.get(g + "_top1") is not None and math.isfinite(result[g + "_top1"])]
        line += (f" {split} top1 {result['top1']:.2f} top5 {result['top5']:.2f} balanced {result['balanced_top1']:.2f}"
                 + "".join(f" {g} {v:.2f}" for g, v in shots if len(shots) > 1)
                 + "".join(f" {k.replace('_top1_', ' ')} {v:.2f}" for k, v in result.items()
                           if k.startswith("head_top1")))
    print(line, flush=True)


def strict_json(value):
    """``value`` with every non-finite float replaced by None, so json.dumps writes
    strict JSON (null, never NaN / Infinity, which jq and JavaScript reject)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


# ----------------------------------------------------------------------------------
# Datasets from the flags (the loaders are data.make_train_loader / make_test_loader)
# ----------------------------------------------------------------------------------
def build_datasets_from_args(args):
    """data.build_datasets with the run's flags; with --skip-corrupt, says how many images it dropped.
    Distributed, rank 0 builds first (and fetches CIFAR into ./data if it has to), the others after it."""
    first = dist.is_available() and dist.is_initialized() and dist.get_rank() == 0
    if dist.is_available() and dist.is_initialized() and not first:
        dist.barrier()  # wait for rank 0's download, if any
    train_set, test_set, num_classes = data.build_datasets(
        args.dataset, args.data_path, download=args.download, image_size=args.image_size,
        normalize=args.normalize, lfw_top_k=args.lfw_top_k, cub_classes=args.cub_classes,
        split_seed=args.split_seed, skip_corrupt=getattr(args, "skip_corrupt", False),
        imbalance_ratio=getattr(args, "imbalance_ratio", None))
    if first:
        dist.barrier()
    if getattr(args, "skip_corrupt", False):
        dropped = getattr(train_set, "dropped", []) + getattr(test_set, "dropped", [])
        print(f"--skip-corrupt: dropped {len(dropped)} unreadable images" + "".join(f" (e.g. {d})" for d in dropped[:1]))
    return train_set, test_set, num_classes


def train_loader_from_args(args, train_set, device, two_streams=False, rank=0, world_size=1):
    """data.make_train_loader with the run's flags. Returns (loader, sampler)."""
    return data.make_train_loader(
        train_set, args.batch_size, device, args.seed, loader=args.loader, sampler=args.sampler, workers=args.workers,
        normalize=args.normalize, two_streams=two_streams, positives=args.positives, image_size=args.image_size,
        small=args.dataset in data.SMALL_DATASETS, rank=rank, world_size=world_size,
        hybrid_crop=getattr(args, "hybrid_crop", "pad"),  # older checkpoints' configs: before the flags
        ce_sampler=getattr(args, "hybrid_ce_sampler", "class-balanced"))


def split_off_validation(args, train_set, test_set):
    """(training part, validation part or None): ``--val-split`` held out of the
    training set with the test set's transform; the only set to select on."""
    if not getattr(args, "val_split", 0):
        return train_set, None
    return data.validation_split(train_set, args.val_split, args.split_seed, test_set.transform)


# ----------------------------------------------------------------------------------
# Distributed training (torchrun): process group, model wrapping, averaged statistics
# ----------------------------------------------------------------------------------
def setup_distributed(device_name, sync_bn=False):
    """torchrun sets WORLD_SIZE / RANK / LOCAL_RANK: start the process group (NCCL on
    GPUs, gloo on CPU; an already started one is used as it is) and silence print()
    on every process but rank 0 (as torchvision's references do). Returns (rank,
    world_size, device, whether this call started the group)."""
    world_size = int(os.environ.get("WORLD_SIZE", 1))
    if world_size == 1:
        return 0, 1, resolve_device(device_name), False
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", 0))
    if rank != 0:
        builtins.print = lambda *a, **k: None
    device = resolve_device(device_name)
    # torch: "SyncBatchNorm layers only work with GPU modules". Rank 0 says so and exits; torchrun then
    # stops the others (waiting for it in init_process_group), so the line is printed once, reliably
    if sync_bn and device.type != "cuda" and rank == 0:
        raise data.DataError("--sync-bn needs CUDA devices; on CPU drop it (each process then keeps "
                             "its own BatchNorm statistics)")
    if device.type == "cuda":
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return rank, world_size, device, started


def world_size():
    """The number of processes of the distributed run, 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GatherWithGradient(torch.autograd.Function):
    """all_gather along dim 0; going backward, each process's part receives the sum over
    the processes of the gradient with respect to it (each computed the loss on all parts)."""

    @staticmethod
    def forward(ctx, tensor):
        parts = [torch.empty_like(tensor) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, tensor.contiguous())
        ctx.rank, ctx.rows = dist.get_rank(), tensor.shape[0]
        return torch.cat(parts)                                                 # (N B, ...)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)                                                   # summed over the processes
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows]


def gather(tensor):
    """The tensors of every process concatenated along dim 0, in rank order: (N * B, ...);
    differentiable (``_GatherWithGradient``). The tensor itself without a distributed run."""
    if world_size() == 1:
        return tensor
    if tensor.requires_grad:
        return _GatherWithGradient.apply(tensor)
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


def broadcast_buffers(model):
    """Rank 0's buffers (BatchNorm running statistics) to every process. DDP does not
    send them here (``broadcast_buffers=False``, see ``prepare_model``), so each process
    holds its own; the evaluation then matches the checkpoint, which holds rank 0's."""
    if world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, 0)


def reduce_mean(stats, world_size, device):
    """Average a {name: float} dict over the processes."""
    if world_size == 1 or not stats:
        return stats
    keys = sorted(stats)
    values = torch.tensor([stats[k] for k in keys], dtype=torch.float64, device=device)
    dist.all_reduce(values)
    return dict(zip(keys, (values / world_size).tolist()))


def prepare_model(model, device, world_size, channels_last=False, sync_bn=False, compile_mode="none",
                  unused_parameters=False):
    """channels-last, SyncBN and DDP for training; torch.compile for both the
    training and the evaluation forward. Returns (train_model, eval_model); both
    share ``model``'s parameters, which is what the checkpoint holds.
    ``unused_parameters``: some steps leave parameters unused (MKSMT's step 1)."""
    if channels_last:
        model.to(memory_format=torch.channels_last)
    if sync_bn and world_size > 1:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    train_model = model
    if world_size > 1:
        train_model = nn.parallel.DistributedDataParallel(
            model, device_ids=[device.index] if device.type == "cuda" else None,
            find_unused_parameters=unused_parameters, broadcast_buffers=False)
        # not DDP's default: copying rank 0's BN buffers in before every forward would, in a step
        # with two forward passes before its backward (the hybrid network), overwrite in place
        # what the first pass saved for backward (an error on some torch versions). Training-mode
        # BN reads batch statistics; evaluation and checkpoints use rank 0's buffers (train.py)
    if compile_mode != "none":
        return torch.compile(train_model, mode=compile_mode), torch.compile(model, mode=compile_mode)
    return train_model, model


def prepare_criterion(criterion, world_size):
    """A loss with learned parameters (centers, prototypes) under DDP too, so their
    gradients are averaged over the processes like the network's; otherwise each
    process would drift its own copy."""
    if world_size > 1 and criterion is not None and any(p.requires_grad for p in criterion.parameters()):
        return nn.parallel.DistributedDataParallel(criterion)
    return criterion
