"""Train a U-Net on Carvana (or the synthetic default) with a plain PyTorch loop.

    python train.py --synthetic                     # no Kaggle account needed: generates data/synthetic
    python train.py --data-dir data/carvana         # Kaggle's Carvana (python dataset.py download)
    python train.py --resume runs/exp/last.pt       # continue a run where it stopped
    python train.py --resume runs/exp/best.pt --evaluate   # only evaluate a checkpoint
    torchrun --nproc_per_node=4 train.py ...        # several GPUs (DistributedDataParallel)

The run folder (--out-dir) receives last.pt, best.pt, config.json, split.json, metrics.csv,
curves.png and predictions/.
"""
from __future__ import annotations

import argparse
import contextlib
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
    p = argparse.ArgumentParser(description=__doc__, formatter_class=_HelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data-dir", default=None,
                      help="dataset folder in Kaggle's layout (train/*.jpg, train_masks/*_mask.gif); "
                           "default: data/carvana, or data/synthetic with --synthetic")
    data.add_argument("--synthetic", action="store_true",
                      help="train on the synthetic Carvana-format dataset, generating it on first use")
    data.add_argument("--synthetic-cars", type=int, default=24, help="cars in the generated synthetic dataset")
    data.add_argument("--val-cars", type=float, default=0.2,
                      help="cars held out for validation: a count (>= 1) or a fraction (< 1)")
    data.add_argument("--height", type=int, default=160, help="training height in pixels")
    data.add_argument("--width", type=int, default=240, help="training width in pixels")
    data.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                      help="keep decoded images at the training size in memory shared by the workers, so "
                           "only the first epoch decodes (4 bytes a pixel, allocated up front: about 150 KB "
                           "per image at 160x240)")
    data.add_argument("--workers", type=int, default=min(4, max(1, (os.cpu_count() or 2) // 2)),
                      help="data-loading worker processes (0 loads in the main process)")

    model = p.add_argument_group("model")
    model.add_argument("--features", type=int, nargs="+", default=[64, 128, 256, 512],
                       help="channels of each encoder level, e.g. --features 32 64 128 256")

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
    run.add_argument("--channels-last", action=argparse.BooleanOptionalAction, default=True,
                     help="channels_last memory format (faster convolutions on CPU and tensor cores)")
    run.add_argument("--compile", action="store_true", help="torch.compile the model (pays off on long GPU runs)")
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
    return args


def adopt_checkpoint_config(args: argparse.Namespace, config: dict[str, Any]) -> None:
    """On --resume, settings not typed on the command line come from the checkpoint's run."""
    for key, value in config.items():
        if key in vars(args) and key not in args.given and key not in NOT_RESUMED | {"given"}:
            setattr(args, key, value)


def resolve_data_dir(args: argparse.Namespace) -> None:
    """The default --data-dir depends on --synthetic."""
    if args.data_dir is None:
        args.data_dir = "data/synthetic" if args.synthetic else "data/carvana"


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Show defaults and keep the description's line breaks."""


# ---------------------------------------------------------------------------------------------
# Devices, precision, processes
# ---------------------------------------------------------------------------------------------

def select_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' picks cuda, then mps, then cpu."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def autocast_dtype(device: torch.device, amp: str = "auto") -> torch.dtype | None:
    """The autocast dtype for this device, or None for full fp32."""
    if amp == "off":
        return None
    if amp in ("bf16", "fp16"):
        return torch.bfloat16 if amp == "bf16" else torch.float16
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if device.type == "cpu" and _cpu_has_bf16():
        return torch.bfloat16  # about 2x faster than fp32 on CPUs with AVX-512 BF16 or AMX
    return None


def _cpu_has_bf16() -> bool:
    """True when oneDNN can run bf16 natively on this CPU (emulated bf16 is slower than fp32)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast for dtype, or a no-op context when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


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


def broadcast_buffers(model: torch.nn.Module) -> None:
    """Give every process rank 0's buffers (BatchNorm running statistics); no-op when not distributed."""
    if dist.is_available() and dist.is_initialized():
        for buffer in unwrap(model).buffers():
            dist.broadcast(buffer, src=0)


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
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _order(self) -> tuple[list[int], list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist() if self.shuffle else list(range(self.n))
        seeds = torch.randint(0, 2**31 - 1, (self.n,), generator=g).tolist()
        if self.shuffle and self.n % self.world_size:  # equal shares keep DDP's collectives in step
            pad = self.world_size - self.n % self.world_size
            order, seeds = order + order[:pad], seeds + seeds[:pad]
        return order[self.rank::self.world_size], seeds[self.rank::self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(zip(*self._order()))

    def __len__(self) -> int:
        return len(self._order()[0])


def make_loader(pairs: Sequence[tuple[Path, Path]], args: argparse.Namespace, train: bool,
                rank: int, world_size: int, device: torch.device) -> DataLoader:
    """A DataLoader over pairs: augmented and shuffled for training, resize-only and in order for validation."""
    transform = (ds.train_transforms if train else ds.val_transforms)(args.height, args.width)
    data = ds.CarvanaDataset(pairs, args.height, args.width, transform, cache=args.cache)
    sampler = SeededSampler(len(data), args.seed, shuffle=train, rank=rank, world_size=world_size)
    return DataLoader(data, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                      pin_memory=device.type == "cuda", persistent_workers=args.workers > 0,
                      drop_last=False)


def load_dataset_or_exit(args: argparse.Namespace, rank: int) -> list[tuple[Path, Path]]:
    """The (image, mask) pairs of --data-dir; generates the synthetic default; exits with help when empty."""
    data_dir = Path(args.data_dir)
    if args.synthetic:
        if rank == 0:
            ds.generate_synthetic(data_dir, cars=args.synthetic_cars, seed=0)
        if dist.is_initialized():
            dist.barrier()
    try:
        pairs = ds.find_pairs(data_dir)
    except FileNotFoundError as e:
        sys.exit(f"error: {e}")
    if not pairs:
        sys.exit(
            f"error: no training data in {data_dir} (expected {data_dir}/{ds.IMAGE_DIR}/*.jpg and "
            f"{data_dir}/{ds.MASK_DIR}/*{ds.MASK_SUFFIX}).\n"
            f"  Download Carvana (needs a Kaggle account):  python dataset.py download --out {data_dir}\n"
            f"  Or train on the synthetic default:           python train.py --synthetic")
    return pairs


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


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite."""


class StopRequested(Exception):
    """SIGINT or SIGTERM arrived: stop after the current step."""


_stop_signal: list[int] = []


def _request_stop(signum: int, frame: Any) -> None:
    _stop_signal.append(signum)


def train_one_epoch(model: torch.nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer,
                    scheduler: Any, scaler: torch.amp.GradScaler, device: torch.device,
                    amp_dtype: torch.dtype | None, args: argparse.Namespace, epoch: int,
                    show_progress: bool = True) -> float:
    """One pass over the training data; returns the mean loss per image (over all processes)."""
    model.train()
    loader.sampler.set_epoch(epoch)
    memory_format = torch.channels_last if args.channels_last else torch.contiguous_format
    loss_sum = torch.zeros((), device=device)  # summed on device: no host sync inside the step
    count = torch.zeros((), device=device)
    bar = tqdm(loader, desc=f"epoch {epoch}/{args.epochs} train", leave=False, disable=not show_progress,
               dynamic_ncols=True)
    for step, (images, masks) in enumerate(bar, start=1):
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        masks = masks.to(device, non_blocking=True)
        loss = train_step(model, images, masks, optimizer, scaler, device, amp_dtype, args.clip_grad)
        scheduler.step()
        loss_sum += loss * images.shape[0]
        count += images.shape[0]
        if step % 10 == 0 or step == len(loader):
            mean = (loss_sum / count).item()  # one sync every 10 steps, for the bar and the NaN check
            _check_finite(mean, epoch, step, scaler)
            bar.set_postfix(loss=f"{mean:.4f}", lr=f"{scheduler.get_last_lr()[0]:.2e}")
        if _stop_signal:
            raise StopRequested()
    totals = all_reduce_sum(torch.stack([loss_sum, count]))
    return (totals[0] / totals[1].clamp_min(1)).item()


def train_step(model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor,
               optimizer: torch.optim.Optimizer, scaler: torch.amp.GradScaler, device: torch.device,
               amp_dtype: torch.dtype | None, clip_grad: float) -> torch.Tensor:
    """One optimisation step on a batch already on the device; returns the detached loss (no sync)."""
    with autocast(device, amp_dtype):
        logits = model(images)
    loss = bce_dice_loss(logits, masks)
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss).backward()
    if clip_grad > 0:
        scaler.unscale_(optimizer)
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
    scaler.step(optimizer)
    scaler.update()
    return loss.detach()


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace, device: torch.device) -> torch.optim.Optimizer:
    """AdamW over the model's parameters; the fused kernel on CUDA (one launch for all tensors)."""
    return torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay,
                             fused=device.type == "cuda")


def _check_finite(mean_loss: float, epoch: int, step: int, scaler: torch.amp.GradScaler) -> None:
    """Stop on a non-finite loss, unless fp16's grad scaler is still skipping overflow steps."""
    if math.isfinite(mean_loss):
        return
    if scaler.is_enabled() and scaler.get_scale() > 1.0:
        return  # the scaler skips these steps and lowers its scale; only a collapsed scale is fatal
    raise NonFiniteLossError(f"the loss became {mean_loss} in epoch {epoch} by step {step}; "
                             f"lower --lr or try --amp off. The last good checkpoint is kept.")


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, device: torch.device,
             amp_dtype: torch.dtype | None, channels_last: bool = True, show_progress: bool = True,
             desc: str = "validate") -> dict[str, float]:
    """Loss and Dice/IoU/accuracy over the whole loader at its resolution, reduced over processes."""
    model.eval()
    if dist.is_available() and dist.is_initialized():
        # Ranks may hold different numbers of validation batches, even none, but DDP's forward may
        # broadcast buffers, a collective every rank must join: score with the plain module, after
        # giving every rank rank 0's BatchNorm statistics (each rank updated its own in training).
        broadcast_buffers(model)
        model = unwrap(model)
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    metrics = utils.SegmentationMetrics(device)
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    for images, masks in tqdm(loader, desc=desc, leave=False, disable=not show_progress, dynamic_ncols=True):
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        masks = masks.to(device, non_blocking=True)
        with autocast(device, amp_dtype):
            logits = model(images)
        loss_sum += bce_dice_loss(logits, masks, per_image=True).double().sum()
        metrics.update(logits > 0, masks > 0.5)
    all_reduce_sum(metrics.sums)
    all_reduce_sum(loss_sum)
    result = metrics.compute()
    result["loss"] = loss_sum.item() / max(result["images"], 1)
    return result


@torch.no_grad()
def save_predictions(model: torch.nn.Module, data: ds.CarvanaDataset, indices: Sequence[int],
                     out_dir: Path, device: torch.device, amp_dtype: torch.dtype | None) -> None:
    """Masks and image | truth | prediction | overlay panels for a fixed few validation images."""
    model.eval()
    images, masks = zip(*(data[i] for i in indices))
    images, masks = torch.stack(images), torch.stack(masks)
    with autocast(device, amp_dtype):
        logits = model(images.to(device))
    names = [data.pairs[i][0].stem for i in indices]
    utils.save_prediction_images(images, masks, logits.float().cpu() > 0, names, out_dir)


# ---------------------------------------------------------------------------------------------
# Run folder
# ---------------------------------------------------------------------------------------------

def format_metrics(m: dict[str, float], height: int, width: int) -> str:
    """One line: loss, Dice, IoU and accuracy, with the resolution they were computed at."""
    return (f"loss {m['loss']:.4f}  Dice {m['dice']:.4f} (mean per image {m['mean_dice']:.4f})  "
            f"IoU {m['iou']:.4f}  acc {m['acc']:.4f}  [{m['images']} images at {height}x{width}]")


def default_out_dir() -> Path:
    return Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S")


def write_json(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")


def run_config(args: argparse.Namespace) -> dict[str, Any]:
    """The run's settings as plain data, for config.json and checkpoints."""
    return {k: v for k, v in vars(args).items() if k != "given"}


def checkpoint_state(model, optimizer, scheduler, scaler, epoch: int, best_dice: float,
                     args: argparse.Namespace, split: dict[str, list[str]]) -> dict[str, Any]:
    """Everything needed to resume a run or rebuild its model."""
    return {
        "model": unwrap(model).state_dict(),
        "model_config": unwrap(model).config,
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict(),
        "epoch": epoch,
        "best_dice": best_dice,
        "config": run_config(args),
        "split": split,
        "rng": torch.get_rng_state(),
    }


# ---------------------------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    rank, world_size, local_rank = init_distributed()
    is_main = rank == 0
    device = select_device(args.device, local_rank)

    resume_state = None
    if args.resume:
        try:
            resume_state = utils.load_checkpoint(args.resume)
        except utils.CheckpointError as e:
            sys.exit(f"error: {e}")
        adopt_checkpoint_config(args, resume_state.get("config", {}))
        resume_path = Path(args.resume)
        args.out_dir = args.out_dir or str(resume_path if resume_path.is_dir() else resume_path.parent)
    resolve_data_dir(args)
    out_dir = Path(args.out_dir or default_out_dir())
    amp_dtype = autocast_dtype(device, args.amp)  # after --resume has adopted the run's --amp and --seed
    torch.manual_seed(args.seed)

    pairs = load_dataset_or_exit(args, rank)
    if resume_state is not None and "split" in resume_state:
        split = resume_state["split"]
    else:
        train_cars, val_cars = ds.split_by_car(pairs, args.val_cars, args.seed)
        split = {"train": train_cars, "val": val_cars}
    train_pairs, val_pairs = ds.pairs_of_cars(pairs, split["train"]), ds.pairs_of_cars(pairs, split["val"])
    if not val_pairs:
        sys.exit(f"error: none of the checkpoint's validation cars are in {args.data_dir}")

    model_config = resume_state["model_config"] if resume_state else {"features": args.features}
    model = UNet(**model_config)
    if resume_state:
        model = utils.model_from_checkpoint(resume_state, args.resume)
    model = model.to(device, memory_format=torch.channels_last if args.channels_last else torch.contiguous_format)
    if world_size > 1:
        if args.sync_bn:
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[local_rank] if device.type == "cuda" else None)
    train_model = torch.compile(model) if args.compile else model

    val_loader = make_loader(val_pairs, args, False, rank, world_size, device)
    if args.evaluate:
        return run_evaluation(train_model, val_loader, args, device, amp_dtype, is_main)

    train_loader = make_loader(train_pairs, args, True, rank, world_size, device)
    optimizer = make_optimizer(model, args, device)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=args.lr, epochs=args.epochs, steps_per_epoch=len(train_loader), pct_start=0.1)
    scaler = torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16)
    start_epoch, best_dice = 1, -1.0
    rows = utils.read_metrics_csv(out_dir / "metrics.csv") if resume_state else []
    if resume_state:
        optimizer.load_state_dict(resume_state["optimizer"])
        scheduler.load_state_dict(resume_state["scheduler"])
        scaler.load_state_dict(resume_state["scaler"])
        torch.set_rng_state(resume_state["rng"])
        start_epoch, best_dice = resume_state["epoch"] + 1, resume_state["best_dice"]
        rows = [r for r in rows if r["epoch"] < start_epoch]

    if is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json(run_config(args), out_dir / "config.json")
        write_json(split, out_dir / "split.json")
        print(f"{len(train_pairs)} training images ({len(split['train'])} cars), {len(val_pairs)} validation "
              f"images ({len(split['val'])} cars) from {args.data_dir}; UNet {model_config['features']} "
              f"({count_parameters(model) / 1e6:.1f} M parameters) on {device}"
              f"{f' x{world_size}' if world_size > 1 else ''}, amp {amp_dtype or 'off'}; run folder {out_dir}")

    signal.signal(signal.SIGINT, _request_stop)
    signal.signal(signal.SIGTERM, _request_stop)
    preview = list(range(min(args.num_predictions, len(val_pairs))))
    epoch = start_epoch - 1
    try:
        for epoch in range(start_epoch, args.epochs + 1):
            started = time.perf_counter()
            train_loss = train_one_epoch(train_model, train_loader, optimizer, scheduler, scaler, device,
                                         amp_dtype, args, epoch, show_progress=is_main)
            val = evaluate(train_model, val_loader, device, amp_dtype, args.channels_last, show_progress=is_main)
            seconds = time.perf_counter() - started
            improved = val["dice"] > best_dice
            best_dice = max(best_dice, val["dice"])
            if not is_main:
                continue
            rows.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"], "val_dice": val["dice"],
                         "val_iou": val["iou"], "val_acc": val["acc"], "lr": scheduler.get_last_lr()[0],
                         "seconds": seconds})
            state = checkpoint_state(model, optimizer, scheduler, scaler, epoch, best_dice, args, split)
            utils.save_checkpoint(state, out_dir / "last.pt")
            if improved:
                utils.save_checkpoint(state, out_dir / "best.pt")
                save_predictions(unwrap(model), val_loader.dataset, preview, out_dir / "predictions", device,
                                 amp_dtype)
            utils.write_metrics_csv(rows, out_dir / "metrics.csv")
            utils.plot_curves(rows, out_dir / "curves.png")
            print(f"epoch {epoch}/{args.epochs}  train loss {train_loss:.4f}  val {format_metrics(val, args.height, args.width)}"
                  f"  {seconds:.1f}s{'  (best)' if improved else ''}", flush=True)
    except StopRequested:
        if is_main:
            print(f"\nstopped by signal during epoch {epoch}; {out_dir / 'last.pt'} holds epoch {epoch - 1}. "
                  f"Resume with: python train.py --resume {out_dir}", file=sys.stderr)
        return 130
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if is_main:
        print(f"done: best validation Dice {best_dice:.4f} at {args.height}x{args.width}; run folder {out_dir}")
    return 0


def run_evaluation(model: torch.nn.Module, val_loader: DataLoader, args: argparse.Namespace,
                   device: torch.device, amp_dtype: torch.dtype | None, is_main: bool) -> int:
    """--evaluate: print the checkpoint's validation metrics."""
    val = evaluate(model, val_loader, device, amp_dtype, args.channels_last, show_progress=is_main)
    if is_main:
        print(f"validation {format_metrics(val, args.height, args.width)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
