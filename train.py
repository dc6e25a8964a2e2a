"""Train a U-Net on Carvana (or the synthetic default, or your own data) with a plain PyTorch loop.

    python train.py --synthetic                     # no Kaggle account needed: generates data/synthetic
    python train.py --data-dir data/carvana         # Kaggle's Carvana (python dataset.py download)
    python train.py --data-dir mydata --classes 3   # your own: mydata/images/*, mydata/masks/* (class indices)
    python train.py --resume runs/exp/last.pt       # continue a run where it stopped
    python train.py --resume runs/exp/best.pt --evaluate   # only evaluate a checkpoint
    torchrun --nproc_per_node=4 train.py ...        # several GPUs (DistributedDataParallel)

The run folder (--out-dir) receives last.pt, best.pt, config.json, split.json, metrics.csv,
curves.png and predictions/.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import signal
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Sequence

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.utils.data import DataLoader, Sampler
from tqdm import tqdm

import dataset as ds
import utils
from model import UNet, count_parameters


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """Every flag of train.py, with its default."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data-dir", default=None,
                      help="dataset folder in Kaggle's layout (train/*.jpg, train_masks/*_mask.gif) or the "
                           "generic one (images/*, masks/* paired by file stem); "
                           "default: data/carvana, or data/synthetic with --synthetic")
    data.add_argument("--val-dir", default=None,
                      help="validation set in its own folder (either layout); default: split --data-dir")
    data.add_argument("--synthetic", action="store_true",
                      help="train on the synthetic Carvana-format dataset, generating it on first use")
    data.add_argument("--synthetic-cars", type=int, default=24, help="cars in the generated synthetic dataset")
    data.add_argument("--skip-bad", action="store_true",
                      help="train on the good pairs when the dataset check finds errors (default: refuse to start)")
    data.add_argument("--val-cars", "--val-split", dest="val_cars", type=float, default=0.2,
                      help="without --val-dir, held out for validation: a count (>= 1) or a fraction (< 1) of "
                           "the cars (Carvana-named images: all views of a car on one side) or else of the images")
    data.add_argument("--classes", type=int, default=1,
                      help="1: binary masks (0/1 or 0/255), sigmoid, BCE + soft Dice; N >= 2: masks hold class "
                           "indices 0..N-1 (single-channel or palette PNG), softmax cross-entropy + soft Dice, "
                           "per-class IoU/Dice")
    data.add_argument("--ignore-index", type=int, default=255,
                      help="with --classes N: the mask value of unlabelled pixels, left out of the loss and metrics")
    data.add_argument("--height", type=int, default=160, help="training height in pixels")
    data.add_argument("--width", type=int, default=240, help="training width in pixels")
    data.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                      help="keep decoded images at the training size in memory shared by the workers, so "
                           "only the first epoch decodes (4 bytes a pixel, allocated up front: about 150 KB "
                           "per image at 160x240)")
    data.add_argument("--soft-masks", action=argparse.BooleanOptionalAction, default=True,
                      help="train on each small pixel's car coverage instead of 0/1, so that masks upsampled "
                           "to full resolution put the edge where it is (metrics always use 0/1 targets); "
                           "binary only: class masks are resized by nearest neighbour")
    data.add_argument("--workers", type=int, default=None,
                      help="data-loading worker processes, 0 loads in the main process (default: on a GPU all of "
                           "this process's CPUs but two, at most 16; on the CPU half of them, at most 4)")

    model = p.add_argument_group("model")
    model.add_argument("--features", type=int, nargs="+", default=[64, 128, 256, 512],
                       help="channels of each encoder level, e.g. --features 32 64 128 256")
    model.add_argument("--in-channels", type=int, choices=(1, 3), default=3,
                       help="image channels: 3 loads images as RGB, 1 as 8-bit grey (medical, microscopy)")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--epochs", type=int, default=10, help="number of epochs")
    opt.add_argument("--batch-size", type=int, default=8, help="images per step (per process under torchrun)")
    opt.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the one-cycle schedule")
    opt.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay")
    opt.add_argument("--clip-grad", type=float, default=1.0, help="gradient-norm clipping (0 disables)")
    opt.add_argument("--seed", type=int, default=0, help="seed of the split, initialisation, shuffling and augmentation")

    run = p.add_argument_group("run")
    run.add_argument("--out-dir", default=None, help="run folder (default: runs/<date-time>; with --resume, "
                                                     "the checkpoint's folder)")
    run.add_argument("--device", default="auto", help="auto (cuda, then mps, then cpu), cuda, cuda:1, mps or cpu")
    run.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                     help="mixed precision: auto = bf16 on CUDA and on CPUs with bf16 units, "
                          "fp16 with a grad scaler on older GPUs, off elsewhere")
    run.add_argument("--fp32-warmup", type=float, default=0.05, metavar="FRACTION",
                     help="this fraction of the run's optimizer steps, from the first, trains in fp32 before "
                          "--amp takes over: from a random start bf16 gradients are least accurate, and short "
                          "runs ended with lower Dice without it (BENCHMARKS.md); 0 uses --amp from the start")
    run.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                     help="channels_last memory format (faster convolutions on CPU and tensor cores)")
    run.add_argument("--compile", action="store_true",
                     help="torch.compile the model (pays off on long GPU runs); with an fp32 warm-up it compiles "
                          "twice, once for the fp32 steps and once for mixed precision")
    run.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes under torchrun")
    run.add_argument("--num-predictions", type=int, default=4,
                     help="validation images saved to predictions/ whenever validation Dice improves")
    run.add_argument("--resume", default=None, metavar="PATH",
                     help="checkpoint (or run folder, meaning its last.pt) to continue from")
    run.add_argument("--evaluate", action="store_true",
                     help="with --resume: only evaluate the checkpoint on the validation cars and print metrics")
    run.add_argument("--tta", action="store_true", help="with --evaluate: also report horizontal-flip TTA")
    return p


# Settings that belong to the machine or to this invocation, never taken from a checkpoint.
NOT_RESUMED = {"resume", "evaluate", "tta", "out_dir", "device", "workers"}


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse the command line; args.given names the flags the user typed (the rest are defaults)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    for action in parser._actions:  # parse again with no defaults: what remains was typed
        action.default = argparse.SUPPRESS
    args.given = set(vars(parser.parse_args(argv)))
    if args.evaluate and not args.resume:
        parser.error("--evaluate needs --resume CHECKPOINT")
    if not 1 <= args.classes <= 256:
        parser.error(f"--classes must be 1 (binary) or 2..256 (class indices fit in 8 bits), got {args.classes}")
    if not 0 <= args.fp32_warmup <= 1:
        parser.error(f"--fp32-warmup is a fraction of the run's steps, from 0 to 1, got {args.fp32_warmup}")
    if not 0 <= args.ignore_index <= 255:
        parser.error(f"--ignore-index must be 0..255 (an 8-bit mask value), got {args.ignore_index}")
    if args.workers is None:
        args.workers = default_workers(args.device)
    return args


def default_workers(device_name: str) -> int:
    """Loader workers when --workers is not given, from this process's share of the CPUs (torchrun splits them).

    On a GPU, all but two (the main process drives the GPU): the first epoch decodes every photo, and a
    GPU trains at 160x240 faster than a few workers decode. On the CPU, half, at most 4: the rest compute.
    """
    cpus = max(1, ds.usable_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available()):
        return max(1, min(16, cpus - 2))
    return min(4, max(1, cpus // 2))


def adopt_checkpoint_config(args: argparse.Namespace, config: dict[str, Any]) -> None:
    """On --resume, settings not typed on the command line come from the checkpoint's run."""
    for key, value in config.items():
        if key in vars(args) and key not in args.given and key not in NOT_RESUMED | {"given"}:
            setattr(args, key, value)


def resolve_data_dir(args: argparse.Namespace) -> None:
    """The default --data-dir depends on --synthetic."""
    if args.data_dir is None:
        args.data_dir = "data/synthetic" if args.synthetic else "data/carvana"



# ---------------------------------------------------------------------------------------------
# Devices, precision, processes
# ---------------------------------------------------------------------------------------------

def select_device_or_exit(name: str, local_rank: int) -> torch.device:
    """utils.select_device, with a bad --device reported as one line."""
    try:
        return utils.select_device(name, local_rank)
    except ValueError as e:
        sys.exit(f"error: {e}")


def init_distributed() -> tuple[int, int, int]:
    """(rank, world_size, local_rank); starts the process group when launched by torchrun."""
    if "RANK" not in os.environ or int(os.environ.get("WORLD_SIZE", "1")) == 1:
        return 0, 1, 0
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    return dist.get_rank(), dist.get_world_size(), local_rank


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum a tensor over processes (identity when not distributed)."""
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def scoring_model(model: torch.nn.Module) -> torch.nn.Module:
    """The model to validate with; when distributed, the plain module holding rank 0's buffers.

    Ranks may hold different numbers of validation batches, even none, but DDP's forward may
    broadcast buffers, a collective every rank must join: score with the plain module, after giving
    every rank rank 0's BatchNorm statistics (each rank updated its own in training).
    """
    if not (dist.is_available() and dist.is_initialized()):
        return model
    for buffer in unwrap(model).buffers():
        dist.broadcast(buffer, src=0)
    return unwrap(model)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain UNet inside DDP and torch.compile wrappers."""
    model = getattr(model, "module", model)
    return getattr(model, "_orig_mod", model)


# ---------------------------------------------------------------------------------------------
# Data
# ---------------------------------------------------------------------------------------------

class SeededSampler(Sampler):
    """Yields (index, augmentation seed) for this process's share of an epoch.

    Order and augmentation are a pure function of (seed, epoch), independent of workers and of
    restarts, so a resumed run sees exactly the batches an uninterrupted one would. With several
    processes each takes every world_size-th item; training pads to equal shares, validation
    does not (so every image is scored exactly once).
    """

    def __init__(self, n: int, seed: int, shuffle: bool, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's order; skip its first `skip` items (those an interrupted run already did)."""
        self.epoch, self.skip = epoch, skip

    def _order(self) -> tuple[list[int], list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist() if self.shuffle else list(range(self.n))
        seeds = torch.randint(0, 2**31 - 1, (self.n,), generator=g).tolist()
        if self.shuffle and self.n % self.world_size:  # equal shares keep DDP's collectives in step
            pad = self.world_size - self.n % self.world_size
            order, seeds = order + order[:pad], seeds + seeds[:pad]
        shard = slice(self.rank, None, self.world_size)
        return order[shard][self.skip:], seeds[shard][self.skip:]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(zip(*self._order()))

    def __len__(self) -> int:
        return len(self._order()[0])


def make_loader(pairs: Sequence[tuple[Path, Path]], args: argparse.Namespace, train: bool,
                rank: int, world_size: int, device: torch.device) -> DataLoader:
    """A DataLoader over pairs: augmented and shuffled for training, resize-only and in order for validation."""
    if train:  # class masks mark the border an affine move brings in as unlabelled, not as background
        transform = ds.train_transforms(args.height, args.width, args.in_channels,
                                        mask_fill=args.ignore_index if args.classes > 1 else 0)
    else:
        transform = ds.val_transforms(args.height, args.width)
    cache = args.cache and cache_fits(len(pairs), args, announce=rank == 0)
    data = ds.CarvanaDataset(pairs, args.height, args.width, transform, cache=cache, soft_masks=args.soft_masks,
                             classes=args.classes, in_channels=args.in_channels)
    sampler = SeededSampler(len(data), args.seed, shuffle=train, rank=rank, world_size=world_size)
    return DataLoader(data, batch_size=args.batch_size, sampler=sampler, num_workers=loader_workers(args),
                      pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
                      drop_last=False)


def loader_workers(args: argparse.Namespace) -> int:
    """--workers, once this process is ready to fork them: OpenCV single-threaded, as each worker is one core."""
    if args.workers > 0:
        ds.single_threaded_opencv()
    return args.workers


def cache_fits(images: int, args: argparse.Namespace, announce: bool = True) -> bool:
    """Whether --cache's shared memory (allocated up front) takes at most a quarter of this machine's RAM.

    At full resolution the whole of Carvana would need about 50 GB: then decode every epoch instead.
    """
    need = images * args.height * args.width * (args.in_channels + 1)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need <= total // 4:
        return True
    if announce:
        print(f"note: --cache would hold {need / 2**30:.1f} GiB of decoded images, over a quarter of this "
              f"machine's {total / 2**30:.0f} GiB; decoding every epoch instead", file=sys.stderr)
    return False


def print_findings(lines: Sequence[str], kind: str, data_dir: Path, limit: int = 10) -> None:
    """The dataset check's first few errors or notes on stderr; the CLI lists them all."""
    for line in lines[:limit]:
        print(f"{kind}: {line}", file=sys.stderr)
    if len(lines) > limit:
        print(f"... and {len(lines) - limit} more {kind}s: python dataset.py check {data_dir} lists them all",
              file=sys.stderr)


def load_dataset_or_exit(args: argparse.Namespace, rank: int) -> list[tuple[Path, Path]]:
    """The good (image, mask) pairs of --data-dir, after the dataset check; exits with help on problems.

    Generates the synthetic default first when asked.
    """
    data_dir = Path(args.data_dir)
    if args.synthetic:
        if rank == 0:
            ds.generate_synthetic(data_dir, cars=args.synthetic_cars, seed=0)
        if dist.is_initialized():
            dist.barrier()
    if not ds.list_images(data_dir):
        sys.exit(
            f"error: no training data in {data_dir}: expected {ds.LAYOUTS.replace('DIR', str(data_dir))}.\n"
            f"  Download Carvana (needs a Kaggle account):  python dataset.py download --out {data_dir}\n"
            f"  Or train on the synthetic default:           python train.py --synthetic")
    return checked_pairs_or_exit(data_dir, args, rank)


def checked_pairs_or_exit(data_dir: Path, args: argparse.Namespace, rank: int) -> list[tuple[Path, Path]]:
    """The good pairs of a dataset folder after the dataset check, which knows --classes and --in-channels.

    Refuses to train on a dataset with errors unless --skip-bad, which trains on the good pairs and
    says how many were left out.
    """
    report = ds.check_dataset(data_dir, progress=rank == 0 and sys.stderr.isatty(), classes=args.classes,
                              ignore_index=args.ignore_index, in_channels=args.in_channels)
    if rank == 0:
        print_findings(report.errors, "error", data_dir)
        print_findings(report.notes, "note", data_dir)
    if not report.ok:
        if not args.skip_bad:
            sys.exit(f"error: {report.summary()}. Fix or remove the files above, or pass --skip-bad "
                     f"to train on the {len(report.pairs)} good pairs.")
        if rank == 0:
            print(f"--skip-bad: training on {len(report.pairs)} good pairs, leaving out {report.skipped} "
                  f"image(s) with errors", file=sys.stderr)
    if not report.pairs:
        sys.exit(f"error: no usable image/mask pairs in {data_dir}")
    return report.pairs


# ---------------------------------------------------------------------------------------------
# Loss, training and evaluation
# ---------------------------------------------------------------------------------------------

def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor, per_image: bool = False) -> torch.Tensor:
    """BCE-with-logits plus soft Dice over the batch, in fp32 for stability under autocast.

    per_image=True gives one loss per image, shape (N,): sums of those do not depend on how the
    images were batched or shared among processes (validation needs that).
    """
    logits = logits.float()
    dims = tuple(range(1 if per_image else 0, logits.ndim))
    bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none").mean(dims)
    prob = torch.sigmoid(logits)
    inter = (prob * target).sum(dims)
    soft_dice = (2 * inter + 1) / (prob.sum(dims) + target.sum(dims) + 1)
    return bce + (1 - soft_dice)


def ce_dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Softmax cross-entropy plus soft Dice averaged over the classes, skipping ignore_index pixels; fp32.

    logits (N, C, H, W), target int64 (N, H, W) class indices. Both terms are over the batch's labelled
    pixels (a batch with none gives 0 rather than NaN).
    """
    logits = logits.float()
    labelled = target != ignore_index
    ce = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum") / labelled.sum().clamp_min(1)
    weight = labelled.unsqueeze(1).float()
    prob = logits.softmax(dim=1) * weight
    one_hot = F.one_hot(target.where(labelled, 0), logits.shape[1]).permute(0, 3, 1, 2).float() * weight
    dims = (0, 2, 3)
    soft_dice = (2 * (prob * one_hot).sum(dims) + 1) / (prob.sum(dims) + one_hot.sum(dims) + 1)
    return ce + (1 - soft_dice.mean())


class BinaryTask:
    """One logit per pixel (car or not): BCE + soft Dice on coverage targets, metrics of logits > 0."""

    classes = 1
    best_name = "Dice"  # what best.pt is chosen by
    # --evaluate's table: (title, metrics key, column width), then what the columns mean.
    table = (("mean Dice", "mean_dice", 10), ("Dice", "dice", 9), ("mean IoU", "mean_iou", 10),
             ("IoU", "iou", 9), ("accuracy", "acc", 10))
    table_note = "mean Dice = mean of per-image Dice (Kaggle's metric); Dice = over all pixels of the set"

    def loss(self, logits: torch.Tensor, masks: torch.Tensor, per_image: bool = False) -> torch.Tensor:
        """The batch's loss, or with per_image one loss per image (N,), whose sum ignores batching."""
        return bce_dice_loss(logits, masks, per_image=per_image)  # looked up at each call: tests patch it

    def labels(self, logits: torch.Tensor) -> torch.Tensor:
        """Predicted masks (N, 1, H, W) from logits."""
        return logits > 0

    def truth(self, masks: torch.Tensor) -> torch.Tensor:
        """Target masks for the metrics: coverage (or {0, 1}) above one half."""
        return masks > 0.5

    def metrics(self, device: torch.device) -> utils.SegmentationMetrics:
        return utils.SegmentationMetrics(device)

    def describe(self, m: dict[str, Any]) -> str:
        """The scores of a metrics dict in one line."""
        return (f"Dice {m['dice']:.4f} (mean per image {m['mean_dice']:.4f})  IoU {m['iou']:.4f}  "
                f"acc {m['acc']:.4f}")


class MulticlassTask:
    """One logit per class: softmax cross-entropy + soft Dice, metrics of the argmax from a confusion matrix."""

    best_name = "Dice (mean over foreground classes)"
    table = (("Dice fg", "dice", 10), ("IoU fg", "iou", 9), ("Dice all", "dice_all", 10),
             ("IoU all", "iou_all", 9), ("accuracy", "acc", 10))
    table_note = ("fg = mean over the foreground classes 1..N-1, all = mean including background (class 0); "
                  "over all pixels of the set, --ignore-index pixels left out")

    def __init__(self, classes: int, ignore_index: int):
        self.classes, self.ignore_index = classes, ignore_index

    def loss(self, logits: torch.Tensor, masks: torch.Tensor, per_image: bool = False) -> torch.Tensor:
        """The batch's loss, or with per_image one loss per image (N,), whose sum ignores batching."""
        if per_image:
            return torch.stack([ce_dice_loss(l[None], m[None], self.ignore_index) for l, m in zip(logits, masks)])
        return ce_dice_loss(logits, masks, self.ignore_index)

    def labels(self, logits: torch.Tensor) -> torch.Tensor:
        """Predicted class indices (N, H, W) from logits."""
        return logits.argmax(dim=1)

    def truth(self, masks: torch.Tensor) -> torch.Tensor:
        """Target class indices: the masks themselves (ignore_index pixels are skipped by the metrics)."""
        return masks

    def metrics(self, device: torch.device) -> utils.MulticlassMetrics:
        return utils.MulticlassMetrics(self.classes, self.ignore_index, device)

    def describe(self, m: dict[str, Any]) -> str:
        """The scores of a metrics dict in one line, saying which classes each mean covers."""
        per_class = " ".join(f"{v:.3f}" for v in m["class_iou"])
        return (f"mean over foreground classes: Dice {m['dice']:.4f} IoU {m['iou']:.4f}  incl. background: "
                f"Dice {m['dice_all']:.4f} IoU {m['iou_all']:.4f}  IoU per class 0..{self.classes - 1} "
                f"[{per_class}]  acc {m['acc']:.4f}")


def make_task(args: argparse.Namespace) -> BinaryTask | MulticlassTask:
    """The loss, metrics and decisions for --classes: binary for 1, multi-class otherwise."""
    return BinaryTask() if args.classes == 1 else MulticlassTask(args.classes, args.ignore_index)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite."""


class StopRequested(Exception):
    """SIGINT or SIGTERM arrived; carries the interrupted epoch's progress so it can be resumed."""

    def __init__(self, progress: dict[str, float]):
        super().__init__("stop requested")
        self.progress = progress


_stop_signals: list[int] = []


def _request_stop(signum: int, frame: Any) -> None:
    """Signal handler: note the request; the training loop stops after the current step."""
    _stop_signals.append(signum)


def stop_requested(device: torch.device, distributed: bool) -> bool:
    """Whether a stop signal arrived (in any process, so that all ranks stop at the same step)."""
    if not distributed:
        return bool(_stop_signals)
    flag = torch.tensor([float(bool(_stop_signals))], device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def train_one_epoch(model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scheduler: Any, scaler: torch.amp.GradScaler, device: torch.device,
                    amp_dtype: torch.dtype | None, args: argparse.Namespace, epoch: int,
                    progress: dict[str, float] | None = None, show_progress: bool = True,
                    task: BinaryTask | MulticlassTask = BinaryTask()) -> float:
    """One pass over the training data; returns the mean loss per image (over all processes).

    progress ({"step", "loss_sum", "count"}) resumes an epoch that a signal interrupted: its first
    `step` batches are skipped and their loss is carried over.
    """
    model.train()
    progress = progress or {"step": 0, "loss_sum": 0.0, "count": 0.0}
    first_step = int(progress["step"])
    loader.sampler.set_epoch(epoch, skip=first_step * args.batch_size)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    distributed = dist.is_available() and dist.is_initialized()
    # Summed on the device: no host sync inside the step.
    loss_sum = torch.tensor(progress["loss_sum"], device=device)
    count = torch.tensor(progress["count"], device=device)
    first_bad_step = torch.tensor(-1, device=device)
    bar = tqdm(loader, desc=f"epoch {epoch}/{args.epochs} train", leave=False, disable=not show_progress,
               dynamic_ncols=True, initial=first_step, total=first_step + len(loader))
    warmup_steps = fp32_warmup_steps(args, scheduler)
    for step, (images, masks) in enumerate(bar, start=first_step + 1):
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        masks = masks.to(device, non_blocking=True)
        # The scheduler counts the steps taken so far, those before a --resume included.
        step_amp = None if scheduler.last_epoch < warmup_steps else amp_dtype
        loss = train_step(model, images, masks, optimizer, scaler, device, step_amp, args.clip_grad, task.loss)
        scheduler.step()
        finite = torch.isfinite(loss)
        loss_sum += torch.where(finite, loss * images.shape[0], 0.0)
        count += torch.where(finite, images.shape[0], 0)
        first_bad_step = torch.where(~finite & (first_bad_step < 0), step, first_bad_step)
        last = step == first_step + len(loader)
        if step % 10 == 0 or last:  # one host sync every 10 steps: the bar and the NaN check
            _check_finite(int(first_bad_step), epoch, scaler)
            bar.set_postfix(loss=f"{(loss_sum / count.clamp_min(1)).item():.4f}",
                            lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if not last and (step % 10 == 0 or not distributed) and stop_requested(device, distributed):
            raise StopRequested({"step": step, "loss_sum": loss_sum.item(), "count": count.item()})
    totals = all_reduce_sum(torch.stack([loss_sum, count]))
    return (totals[0] / totals[1].clamp_min(1)).item()


def fp32_warmup_steps(args: argparse.Namespace, scheduler: Any) -> int:
    """How many of the run's first optimizer steps train in fp32 (--fp32-warmup) before mixed precision."""
    return int(args.fp32_warmup * scheduler.total_steps)


def train_step(model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, device: torch.device,
               amp_dtype: torch.dtype | None, clip_grad: float, loss_fn=None) -> torch.Tensor:
    """One optimisation step on a batch already on the device; returns the detached loss (no sync)."""
    with utils.autocast(device, amp_dtype):
        logits = model(images)
    loss = (loss_fn or bce_dice_loss)(logits, masks)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)  # skipped by the fp16 grad scaler when gradients overflowed
    scaler.update()
    return loss.detach()


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the model's parameters; the fused kernel on CUDA (one launch for all tensors)."""
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                             fused=device.type == "cuda")


def _check_finite(first_bad_step: int, epoch: int, scaler: torch.amp.GradScaler) -> None:
    """Stop on a non-finite loss, unless fp16's grad scaler is still skipping overflow steps."""
    if first_bad_step < 0:
        return
    if scaler.is_enabled() and scaler.get_scale() >= 1.0:
        return  # the scaler skipped those steps and lowered its scale; only a collapsed scale is fatal
    raise NonFiniteLossError(f"the loss became NaN or infinite in epoch {epoch} at step {first_bad_step}; "
                             f"lower --lr or try --amp off. The last good checkpoint is kept.")


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, device: torch.device,
             amp_dtype: torch.dtype | None, channels_last: bool = True, show_progress: bool = True,
             desc: str = "validate", task: BinaryTask | MulticlassTask = BinaryTask()) -> dict[str, Any]:
    """Loss and Dice/IoU/accuracy over the whole loader at its resolution, reduced over processes."""
    model.eval()
    model = scoring_model(model)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    metrics = task.metrics(device)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    for images, masks in tqdm(loader, desc=desc, leave=False, disable=not show_progress, dynamic_ncols=True):
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        masks = masks.to(device, non_blocking=True)
        with utils.autocast(device, amp_dtype):
            logits = model(images)
        loss_sum += task.loss(logits, masks, per_image=True).double().sum()
        metrics.update(task.labels(logits), task.truth(masks))
    all_reduce_sum(metrics.sums)
    all_reduce_sum(loss_sum)
    result = metrics.compute()
    result["loss"] = loss_sum.item() / max(result["images"], 1)
    return result


@torch.no_grad()
def save_predictions(model: torch.nn.Module, data: ds.CarvanaDataset, indices: Sequence[int],
                     out_dir: Path, device: torch.device, amp_dtype: torch.dtype | None,
                     task: BinaryTask | MulticlassTask = BinaryTask()) -> None:
    """Masks and image | truth | prediction | overlay panels for a fixed few validation images."""
    model.eval()
    images, masks = zip(*(data[i] for i in indices))
    images, masks = torch.stack(images), torch.stack(masks)
    with utils.autocast(device, amp_dtype):
        logits = model(images.to(device))
    names = [data.pairs[i][0].stem for i in indices]
    utils.save_prediction_images(images, task.truth(masks), task.labels(logits.float().cpu()), names, out_dir,
                                 classes=task.classes)


# ---------------------------------------------------------------------------------------------
# Run folder
# ---------------------------------------------------------------------------------------------

def format_metrics(m: dict[str, Any], height: int, width: int,
                   task: BinaryTask | MulticlassTask = BinaryTask()) -> str:
    """One line: loss, Dice, IoU and accuracy, with the resolution they were computed at."""
    return f"loss {m['loss']:.4f}  {task.describe(m)}  [{m['images']} images at {height}x{width}]"


def default_out_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def write_json(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings as plain data, for config.json and checkpoints."""
    return {k: v for k, v in vars(args).items() if k != "given"}


def checkpoint_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                     scaler: torch.amp.GradScaler, epoch: int, best_dice: float, args: argparse.Namespace,
                     split: dict[str, list[str]], rows: list[dict[str, Any]],
                     progress: dict[str, float] | None = None) -> dict[str, Any]:
    """Everything needed to resume a run (epoch = the last completed one) or to rebuild its model."""
    return {
        "model": unwrap(model).state_dict(),
        "model_config": unwrap(model).config,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "progress": progress,  # position inside the next epoch when a signal interrupted it
        "best_dice": best_dice,
        "metrics": rows,       # the source of truth for metrics.csv on resume
        "config": run_config(args),
        "split": split,
        "rng": torch.get_rng_state(),
    }


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, then train (or evaluate); returns the exit status."""
    args = parse_args(argv)
    rank, world_size, local_rank = init_distributed()
    handlers = {sig: signal.signal(sig, _request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    _stop_signals.clear()
    try:
        return run(args, rank, world_size, local_rank)
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)
        if dist.is_initialized():
            dist.destroy_process_group()


def load_resume_state(args: argparse.Namespace) -> dict[str, Any] | None:
    """The --resume checkpoint (its settings adopted into args), or None when not resuming."""
    if not args.resume:
        return None
    try:
        state = utils.load_checkpoint(args.resume)
    except utils.CheckpointError as e:
        sys.exit(f"error: {e}")
    adopt_checkpoint_config(args, state.get("config", {}))
    resume_path = Path(args.resume)
    args.out_dir = args.out_dir or str(resume_path if resume_path.is_dir() else resume_path.parent)
    return state


def split_or_exit(pairs: list[tuple[Path, Path]], args: argparse.Namespace, state: dict[str, Any] | None,
                  rank: int) -> tuple[list[tuple[Path, Path]], list[tuple[Path, Path]], dict[str, list[str]]]:
    """(training pairs, validation pairs, split) from --val-dir, else from a seeded split by group.

    A group is a car for Carvana-named images, the image itself otherwise; a resumed run keeps its split.
    """
    if args.val_dir:
        val_pairs = checked_pairs_or_exit(Path(args.val_dir), args, rank)
        return pairs, val_pairs, {"train": ds.groups_of(pairs), "val": ds.groups_of(val_pairs)}
    if state is not None and state.get("split"):
        split = state["split"]
    else:
        try:
            train_groups, val_groups = ds.split_by_group(pairs, args.val_cars, args.seed)
        except ValueError as e:
            sys.exit(f"error: {e}")
        split = {"train": train_groups, "val": val_groups}
    train_pairs, val_pairs = ds.pairs_of_groups(pairs, split["train"]), ds.pairs_of_groups(pairs, split["val"])
    if not val_pairs:
        sys.exit(f"error: none of the validation cars or images of {args.resume} are in {args.data_dir}")
    return train_pairs, val_pairs, split


def build_model(args: argparse.Namespace, state: dict[str, Any] | None, device: torch.device,
                world_size: int, local_rank: int) -> tuple[torch.nn.Module, torch.nn.Module]:
    """(model to save, model to run): the UNet (from the checkpoint when resuming), wrapped for DDP/compile."""
    if state is None:
        model = UNet(in_channels=args.in_channels, out_channels=args.classes, features=args.features)
    else:
        try:
            model = utils.model_from_checkpoint(state, args.resume)
        except utils.CheckpointError as e:
            sys.exit(f"error: {e}")
        if (model.config["in_channels"], model.config["out_channels"]) != (args.in_channels, args.classes):
            sys.exit(f"error: {args.resume} holds a model with in_channels={model.config['in_channels']} and "
                     f"out_channels={model.config['out_channels']}, which --in-channels {args.in_channels} "
                     f"--classes {args.classes} do not fit; leave those flags out to use the checkpoint's")
    model = model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    if world_size > 1:
        if args.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None)
    return model, torch.compile(model) if args.compile else model


def run(args: argparse.Namespace, rank: int, world_size: int, local_rank: int) -> int:
    """Set up data, model and optimiser, then train epoch by epoch (or only evaluate)."""
    is_main = rank == 0
    device = select_device_or_exit(args.device, local_rank)
    state = load_resume_state(args)
    amp_dtype = utils.autocast_dtype(device, args.amp)  # after --resume has adopted the run's --amp and --seed
    torch.manual_seed(args.seed)
    resolve_data_dir(args)
    out_dir = Path(args.out_dir or default_out_dir())

    task = make_task(args)
    pairs = load_dataset_or_exit(args, rank)
    train_pairs, val_pairs, split = split_or_exit(pairs, args, state, rank)

    model, train_model = build_model(args, state, device, world_size, local_rank)
    if args.evaluate:
        return run_evaluation(train_model, val_pairs, args, device, amp_dtype, rank, world_size, task)
    val_loader = make_loader(val_pairs, args, False, rank, world_size, device)

    train_loader = make_loader(train_pairs, args, True, rank, world_size, device)
    optimizer = make_optimizer(model, args, device)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=len(train_loader), pct_start=0.1)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_epoch, best_dice, rows, progress = 1, -1.0, [], None
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        start_epoch, best_dice = state["epoch"] + 1, state["best_dice"]
        rows, progress = list(state.get("metrics", [])), state.get("progress")

    warmup_steps = fp32_warmup_steps(args, scheduler) if amp_dtype else 0
    warmup = f" after {warmup_steps} fp32 steps" if warmup_steps else ""
    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_config(args), out_dir / "config.json")
        write_json(split, out_dir / "split.json")
        source = args.data_dir if not args.val_dir else f"{args.data_dir} and {args.val_dir}"
        kind = ("" if args.in_channels == 3 else ", grayscale input") + (
            "" if task.classes == 1 else f", {task.classes} classes (ignore index {args.ignore_index})")
        print(f"{ds.describe_pairs(train_pairs)} for training, {ds.describe_pairs(val_pairs)} for validation "
              f"from {source}; UNet {unwrap(model).config['features']} ({count_parameters(model) / 1e6:.1f} M "
              f"parameters){kind} on {device}"
              f"{f' x{world_size}' if world_size > 1 else ''}, amp {amp_dtype or 'off'}{warmup}; run folder {out_dir}")
        if start_epoch > 1 or progress:
            print(f"resuming at epoch {start_epoch}" + (f", step {progress['step']}" if progress else ""))

    def state_at(epoch: int, progress: dict[str, float] | None = None) -> dict[str, Any]:
        return checkpoint_state(model, optimizer, scheduler, scaler, epoch, best_dice, args, split, rows, progress)

    preview = list(range(min(args.num_predictions, len(val_pairs))))
    for epoch in range(start_epoch, args.epochs + 1):
        started = time.perf_counter()
        try:
            train_loss = train_one_epoch(train_model, train_loader, optimizer, scheduler, scaler, device,
                                         amp_dtype, args, epoch, progress, show_progress=is_main, task=task)
        except StopRequested as stop:
            if is_main:
                utils.save_checkpoint(state_at(epoch - 1, stop.progress), out_dir / "last.pt")
                print(f"\nstopped by signal at step {stop.progress['step']} of epoch {epoch}; saved "
                      f"{out_dir / 'last.pt'}. Resume with: python train.py --resume {out_dir}", file=sys.stderr)
            return 130
        except NonFiniteLossError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        progress = None
        val = evaluate(train_model, val_loader, device, amp_dtype, args.channels_last, show_progress=is_main, task=task)
        seconds = time.perf_counter() - started
        improved = val["dice"] > best_dice
        best_dice = max(best_dice, val["dice"])
        if is_main:
            rows.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"], "val_dice": val["dice"],
                         "val_iou": val["iou"], "val_acc": val["acc"], "lr": scheduler.get_last_lr()[0],
                         "seconds": seconds})
            state = state_at(epoch)
            utils.save_checkpoint(state, out_dir / "last.pt")
            if improved:
                utils.save_checkpoint(state, out_dir / "best.pt")
                if preview:  # --num-predictions 0 saves none
                    save_predictions(unwrap(model), val_loader.dataset, preview, out_dir / "predictions", device,
                                     amp_dtype, task)
            utils.write_metrics_csv(rows, out_dir / "metrics.csv")
            utils.plot_curves(rows, out_dir / "curves.png")
            print(f"epoch {epoch}/{args.epochs}  train loss {train_loss:.4f}  "
                  f"val {format_metrics(val, args.height, args.width, task)}  {seconds:.1f}s"
                  f"{'  (best)' if improved else ''}", flush=True)
        if epoch < args.epochs and stop_requested(device, world_size > 1):
            if is_main:
                print(f"\nstopped by signal after epoch {epoch}; {out_dir / 'last.pt'} holds it. "
                      f"Resume with: python train.py --resume {out_dir}", file=sys.stderr)
            return 130
    if is_main:
        print(f"done: best validation {task.best_name} {best_dice:.4f} at {args.height}x{args.width}; "
              f"run folder {out_dir}")
    return 0


class FullResolutionPairs(torch.utils.data.Dataset):
    """Validation items for --evaluate: the image and mask at the training size plus the original mask."""

    def __init__(self, pairs: Sequence[tuple[Path, Path]], height: int, width: int, classes: int = 1,
                 in_channels: int = 3):
        self.resized = ds.CarvanaDataset(pairs, height, width, ds.val_transforms(height, width), soft_masks=False,
                                         classes=classes, in_channels=in_channels)

    def __len__(self) -> int:
        return len(self.resized)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        image, mask = self.resized[item]
        index = item[0] if isinstance(item, tuple) else item
        return image, mask, torch.from_numpy(self.resized.original_mask(index))

    @staticmethod
    def collate(items: list) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
        """Stack the training-size tensors; original masks stay a list (their sizes may differ)."""
        images, masks, originals = zip(*items)
        return torch.stack(images), torch.stack(masks), list(originals)


@torch.no_grad()
def evaluate_resolutions(model: torch.nn.Module, pairs: Sequence[tuple[Path, Path]], args: argparse.Namespace,
                         device: torch.device, amp_dtype: torch.dtype | None, rank: int = 0,
                         world_size: int = 1, task: BinaryTask | MulticlassTask = BinaryTask(),
                         ) -> dict[tuple[str, bool], dict[str, Any]]:
    """Dice/IoU/accuracy at the training size and at each photo's original size, with and without TTA.

    Probabilities are upsampled bilinearly to the original size before thresholding (or, multi-class,
    taking the likeliest class), as predict.py does. Keys are (resolution, tta) with resolution
    "training" or "original".
    """
    from predict import predict_probabilities, to_labels, upsample_to
    model.eval()
    model = scoring_model(model)
    data = FullResolutionPairs(pairs, args.height, args.width, args.classes, args.in_channels)
    loader = DataLoader(data, batch_size=args.batch_size, num_workers=loader_workers(args),
                        sampler=SeededSampler(len(data), args.seed, False, rank, world_size),
                        collate_fn=FullResolutionPairs.collate)
    modes = (False, True) if args.tta else (False,)
    metrics = {(res, tta): task.metrics(device) for res in ("training", "original") for tta in modes}
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    for images, masks, originals in tqdm(loader, desc="evaluate", leave=False, disable=rank != 0):
        images = images.to(device, memory_format=memory_format)
        for tta in modes:
            with utils.autocast(device, amp_dtype):
                probs = predict_probabilities(model, images, tta)
            metrics[("training", tta)].update(to_labels(probs.cpu()), task.truth(masks))
            for prob, original in zip(probs, originals):
                full = to_labels(upsample_to(prob[None], tuple(original.shape))).cpu()
                metrics[("original", tta)].update(full, task.truth(original[None]))
    results = {}
    for key, m in metrics.items():
        all_reduce_sum(m.sums)
        results[key] = m.compute()
    return results


def original_size_label(pairs: Sequence[tuple[Path, Path]]) -> str:
    """'1280x1918 (original)' (height x width) when all masks share one size, else 'original sizes'."""
    from PIL import Image
    sizes = set()
    for _, mask in pairs:
        with Image.open(mask) as img:  # reads the header only
            sizes.add((img.height, img.width))
    return f"{'x'.join(map(str, sizes.pop()))} (original)" if len(sizes) == 1 else "original sizes"


def run_evaluation(model: torch.nn.Module, pairs: Sequence[tuple[Path, Path]], args: argparse.Namespace,
                   device: torch.device, amp_dtype: torch.dtype | None, rank: int, world_size: int,
                   task: BinaryTask | MulticlassTask = BinaryTask()) -> int:
    """--evaluate: print validation metrics at the training and the original resolution."""
    results = evaluate_resolutions(model, pairs, args, device, amp_dtype, rank, world_size, task)
    if rank == 0:
        original = original_size_label(pairs)
        print(f"validation on {ds.describe_pairs(pairs)} held out from training ({args.resume})")
        print(f"{'resolution':<22}{'TTA':<5}" + "".join(f"{title:>{width}}" for title, _, width in task.table))
        for (resolution, tta), m in results.items():
            label = f"{args.height}x{args.width} (training)" if resolution == "training" else original
            print(f"{label:<22}{'yes' if tta else 'no':<5}"
                  + "".join(f"{m[key]:>{width}.4f}" for _, key, width in task.table))
        print(task.table_note)
        if task.classes > 1:
            for (resolution, tta), m in results.items():
                label = f"{args.height}x{args.width}" if resolution == "training" else original
                print(f"IoU per class 0..{task.classes - 1} at {label}{', TTA' if tta else ''}: "
                      + " ".join(f"{v:.4f}" for v in m["class_iou"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
