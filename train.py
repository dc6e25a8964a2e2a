"""Train a U-Net on Carvana (or the synthetic default, or your own data) with a plain PyTorch loop.

    python train.py --synthetic                     # no Kaggle account needed: generates data/synthetic
    python train.py --data-dir data/carvana         # Kaggle's Carvana (python download.py)
    python train.py --data-dir mydata --classes 3   # your own: mydata/images/*, mydata/masks/* (class indices)
    python train.py --resume runs/exp/last.pt       # continue a run where it stopped
    torchrun --nproc_per_node=4 train.py ...        # several GPUs (DistributedDataParallel)

The run folder (--out-dir) receives last.pt, best.pt, config.json, split.json, metrics.csv, curves.png,
predictions/ and, from best.pt scored at the end, per_image.csv, errors/, dice_histogram.png and report.html
(evaluate.py does the same for any checkpoint); segment photos with predict.py.
"""
from __future__ import annotations

import argparse
import itertools
import signal
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader
from tqdm import tqdm

import dataset as ds
import report
import utils
from check_dataset import classes_problem, usable_pairs
from model import UNet, count_parameters
from task import Task, make_task


# --- command line -----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    """Every flag of train.py, with its default."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    data = p.add_argument_group("data")
    data.add_argument("--data-dir", help=f"dataset folder in {ds.LAYOUTS} (default: data/carvana, or data/synthetic "
                                         f"with --synthetic)")
    data.add_argument("--val-dir", help="validation set in its own folder, either layout (default: split --data-dir)")
    data.add_argument("--synthetic", action="store_true", help="train on the synthetic dataset, made on first use")
    data.add_argument("--synthetic-cars", type=int, default=24, help="cars in it (default: %(default)s)")
    data.add_argument("--skip-bad", action="store_true",
                      help="train on the good pairs when the dataset check finds errors (default: refuse to start)")
    data.add_argument("--val-cars", type=float, default=0.2,
                      help="without --val-dir: cars held out, a count (>= 1) or fraction (< 1) (default: %(default)s)")
    data.add_argument("--classes", type=int, default=1,
                      help="1 (default): binary masks, 0/1 or 0/255; N >= 2: masks of class indices 0..N-1")
    data.add_argument("--ignore-index", type=int, default=255,
                      help="with --classes N: the mask value of unlabelled pixels (default: %(default)s)")
    data.add_argument("--height", type=int, default=160, help="training height in pixels (default: %(default)s)")
    data.add_argument("--width", type=int, default=240, help="training width in pixels (default: %(default)s)")
    data.add_argument("--crop", type=utils.parse_size, metavar="HxW",
                      help="train on random HxW crops of the images resized to --height x --width (e.g. --height 1280 "
                           "--width 1918 --crop 512x512: full resolution on a small GPU); validation and prediction "
                           "take the whole image (default: the whole image)")
    data.add_argument("--shift", type=float, default=0.05, metavar="FRACTION",
                      help="augmentation: largest shift, a fraction of the size, each way (default: %(default)s)")
    data.add_argument("--zoom", type=float, nargs=2, default=[0.9, 1.1], metavar=("LOW", "HIGH"),
                      help="augmentation: scale range (default: %(default)s)")
    data.add_argument("--rotate", type=float, default=5.0, metavar="DEGREES",
                      help="augmentation: largest rotation each way (default: %(default)s); the shift, zoom and "
                           "rotation apply together to half the images; --shift 0 --zoom 1 1 --rotate 0 turns them off")
    data.add_argument("--grey", type=float, default=0.0, metavar="P",
                      help="augmentation: probability of turning a photo grey (default: %(default)s)")
    data.add_argument("--cache", action=argparse.BooleanOptionalAction, default=True,
                      help="keep the decoded images in shared memory, so only the first epoch decodes (default: on)")
    data.add_argument("--soft-masks", action=argparse.BooleanOptionalAction, default=True,
                      help="binary masks: train on each pixel's car coverage instead of 0/1 (default: on)")
    data.add_argument("--workers", type=int, help="data-loading processes, 0: the main process (default: on a GPU "
                                                  "the CPUs but two, at most 16; else half, at most 4)")

    model = p.add_argument_group("model")
    model.add_argument("--features", type=int, nargs="+", default=[64, 128, 256, 512],
                       help="channels of each encoder level (default: %(default)s)")
    model.add_argument("--in-channels", type=int, choices=(1, 3), default=3,
                       help="3 (default) loads images as RGB, 1 as 8-bit grey (medical, microscopy)")

    opt = p.add_argument_group("optimisation")
    opt.add_argument("--edge-weight", type=float, default=1.0,
                     help="binary masks: weight of the pixels near the outline in the loss, 1: none (default: "
                          "%(default)s; the first-place Carvana solution used 3 on a 41-pixel band at 1024)")
    opt.add_argument("--epochs", type=int, default=10, help="number of epochs (default: %(default)s)")
    opt.add_argument("--batch-size", type=int, default=8, help="images per step and process (default: %(default)s)")
    opt.add_argument("--lr", type=float, default=1e-3, help="peak one-cycle learning rate (default: %(default)s)")
    opt.add_argument("--weight-decay", type=float, default=1e-4, help="AdamW weight decay (default: %(default)s)")
    opt.add_argument("--clip-grad", type=float, default=1.0, help="gradient-norm clip, 0: none (default: %(default)s)")
    opt.add_argument("--seed", type=int, default=0,
                     help="seed of the split, initialisation, order and augmentation (default: %(default)s)")

    run = p.add_argument_group("run")
    run.add_argument("--out-dir", help="run folder (default: runs/<date-time>; with --resume, the checkpoint's)")
    run.add_argument("--device", default="auto", help="auto (default: cuda, then mps, then cpu), cuda:1, mps, cpu...")
    run.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                     help="mixed precision; auto (default): bf16 on CUDA and bf16 CPUs, fp16 on older GPUs, else off")
    run.add_argument("--fp32-warmup", type=float, default=0.05, metavar="FRACTION",
                     help="fraction of the first steps trained in fp32 before --amp (default: %(default)s)")
    run.add_argument("--channels-last", action=argparse.BooleanOptionalAction,
                     help="channels_last memory format (default: on GPUs and CPUs with bf16 units)")
    run.add_argument("--fused-adamw", action=argparse.BooleanOptionalAction, default=True,
                     help="AdamW's fused kernel on CUDA and CPUs, one pass over each tensor instead of one per "
                          "operation (default: on; --no-fused-adamw: torch's default kernels, as a plain loop)")
    run.add_argument("--compile", action="store_true", help="torch.compile the model (pays off on long GPU runs)")
    run.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes under torchrun")
    run.add_argument("--bn-images", type=int, default=0, metavar="N", help="recompute BatchNorm's statistics from N "
                     "training images before each validation (default 0: the running averages, which lag at a high lr)")
    run.add_argument("--num-predictions", type=int, default=4,
                     help="validation images saved whenever validation Dice improves (default: %(default)s)")
    run.add_argument("--init", metavar="CHECKPOINT",
                     help="start from another run's weights and split (e.g. one at a smaller size: progressive "
                          "resizing), with a new optimiser and schedule; its validation cars stay held out")
    run.add_argument("--resume", metavar="PATH",
                     help="checkpoint (or run folder: its last.pt) to continue, with its settings unless given here; "
                          "--epochs and --batch-size stay the run's, since its learning-rate schedule spans them")
    return p


# Settings that belong to the machine or to this invocation, never taken from a checkpoint.
NOT_RESUMED = {"resume", "out_dir", "device", "workers"}


def parse_args(argv: Sequence[str] | None = None) -> tuple[argparse.Namespace, dict[str, Any] | None]:
    """(flags, the --resume checkpoint or None); when resuming, the checkpoint's settings are the defaults."""
    parser = build_parser()
    peek, _ = parser.parse_known_args(argv)
    state = utils.load_checkpoint(peek.resume) if peek.resume else None
    if state is not None:  # flags typed on the command line win over the checkpoint's
        parser.set_defaults(**{key: value for key, value in state.get("config", {}).items()
                               if key in vars(peek) and key not in NOT_RESUMED})
    args = parser.parse_args(argv)
    if problem := classes_problem(args.classes):
        parser.error(problem)
    if not 0 <= args.fp32_warmup <= 1:
        parser.error(f"--fp32-warmup is a fraction of the run's steps, from 0 to 1, got {args.fp32_warmup}")
    if args.crop and (args.crop[0] > args.height or args.crop[1] > args.width):
        parser.error(f"--crop {args.crop[0]}x{args.crop[1]} is larger than the training size "
                     f"{args.height}x{args.width}")
    if args.edge_weight <= 0 or (args.edge_weight != 1 and args.classes > 1):
        parser.error(f"--edge-weight is a positive weight for binary masks (--classes 1), got {args.edge_weight}")
    if not 0 <= args.ignore_index <= 255:
        parser.error(f"--ignore-index must be 0..255 (an 8-bit mask value), got {args.ignore_index}")
    args.data_dir = args.data_dir or ("data/synthetic" if args.synthetic else "data/carvana")
    if args.resume and not args.out_dir:
        args.out_dir = str(utils.run_folder(args.resume))
    if args.workers is None:
        args.workers = ds.default_workers(args.device)
    return args, state


# --- the run ----------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    """Parse the command line, then train; returns the exit status (1 after a user error, 130 when stopped)."""
    handlers = {sig: signal.signal(sig, request_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    _stop_signals.clear()
    try:
        with utils.process_group() as (rank, world_size, local_rank):
            return utils.run_program(lambda: run(*parse_args(argv), rank, world_size, local_rank))
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def run(args: argparse.Namespace, state: dict[str, Any] | None, rank: int, world_size: int, local_rank: int) -> int:
    """Set up data, model and optimiser, then train epoch by epoch; returns the exit status."""
    setup = Setup.create(args, rank, world_size, local_rank)
    torch.manual_seed(args.seed)
    out_dir = [args.out_dir or str(Path("runs") / datetime.now().strftime("%Y%m%d-%H%M%S"))]
    if dist.is_initialized():
        dist.broadcast_object_list(out_dir)  # rank 0's: the ranks' default names may differ by a second
    out_dir = Path(out_dir[0])
    start = state
    if start is None and args.init:  # another run's weights and split (progressive resizing), a new optimiser
        start = utils.load_checkpoint(args.init)
    train_pairs, val_pairs, split = load_split(args, start, setup)
    net, model = build_model(args, start, setup)
    train_loader = make_loader(train_pairs, args, setup, train=True)
    val_loader = make_loader(val_pairs, args, setup, train=False)
    opt = Optimization.create(net, args, setup.device, steps_per_epoch=len(train_loader))
    start_epoch, best_dice, rows, progress = restore(state, opt, args) if state is not None else (1, -1.0, [], None)
    if setup.is_main:
        out_dir.mkdir(parents=True, exist_ok=True)
        utils.write_json(vars(args), out_dir / "config.json")
        utils.write_json(split, out_dir / "split.json")
        print(describe_run(args, setup, net, train_pairs, val_pairs, opt) + f"; run folder {out_dir}")
        if start_epoch > args.epochs:
            print(f"{args.resume} finished all {args.epochs} epochs: nothing to train, scoring it again")
        elif start_epoch > 1 or progress:
            print(f"resuming at epoch {start_epoch}" + (f", step {progress['step']}" if progress else ""))

    def checkpoint(epoch: int, progress: dict[str, float] | None = None) -> dict[str, Any]:
        return checkpoint_state(net, opt, epoch, best_dice, args, split, rows, progress)

    preview = list(range(min(args.num_predictions, len(val_pairs))))
    writer = utils.CheckpointWriter()  # a checkpoint goes to disk while the next epoch trains
    try:
        for epoch in range(start_epoch, args.epochs + 1):
            started = time.perf_counter()
            try:
                train_loss = train_one_epoch(model, train_loader, opt, setup, args, epoch, progress)
            except StopRequested as stop:
                if setup.is_main:
                    writer.save(checkpoint(epoch - 1, stop.progress), out_dir / "last.pt")
                    writer.wait()
                    print(f"\nstopped by signal at step {stop.progress['step']} of epoch {epoch}; saved "
                          f"{out_dir / 'last.pt'}. Resume with: python train.py --resume {out_dir}", file=sys.stderr)
                return 130
            progress = None
            refresh_batchnorm(net, train_loader, setup, epoch, args.bn_images)
            val = evaluate(model if setup.world_size == 1 else utils.sync_buffers_from_rank0(net), val_loader, setup)
            seconds = time.perf_counter() - started
            improved = val["dice"] > best_dice
            best_dice = max(best_dice, val["dice"])
            if setup.is_main:
                rows.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val["loss"], "val_dice": val["dice"],
                             "val_iou": val["iou"], "val_acc": val["acc"], "lr": opt.scheduler.get_last_lr()[0],
                             "seconds": seconds})
                writer.save(checkpoint(epoch), out_dir / "last.pt", links=[out_dir / "best.pt"] if improved else [])
                if improved and preview:
                    save_predictions(net, val_loader.dataset, preview, out_dir / "predictions", setup)
                report.write_progress(rows, out_dir)
                print(f"epoch {epoch}/{args.epochs}  train loss {train_loss:.4f}  val loss {val['loss']:.4f}  "
                      f"{setup.task.describe(val)}  [{val['images']} images at {args.height}x{args.width}]  "
                      f"{seconds:.1f}s{'  (best)' if improved else ''}", flush=True)
            if epoch < args.epochs and stop_requested(setup):
                writer.wait()
                if setup.is_main:
                    print(f"\nstopped by signal after epoch {epoch}; {out_dir / 'last.pt'} holds it. "
                          f"Resume with: python train.py --resume {out_dir}", file=sys.stderr)
                return 130
    except BaseException:
        writer.wait(raise_error=False)  # finish the write in flight; the loop's own error is the one to report
        raise
    writer.wait()  # the last checkpoint is on disk before the run scores it
    if dist.is_initialized():
        dist.barrier()  # rank 0 has written the checkpoints
    score_best(args, setup, out_dir, best_dice, val_pairs)
    return 0


def restore(state: dict[str, Any], opt: Optimization, args: argparse.Namespace
            ) -> tuple[int, float, list[dict[str, float]], dict[str, float] | None]:
    """Load a resumed run's optimiser, schedule and RNG; returns (first epoch, best Dice, metrics rows, progress)."""
    steps = opt.scheduler.total_steps  # this run's: --epochs times the batches of an epoch
    opt.load_state_dict(state)
    if opt.scheduler.total_steps != steps:  # the one-cycle schedule spans the run
        raise utils.UserError(f"{args.resume} trains for {opt.scheduler.total_steps} steps, not {steps}: resume with "
                              f"the run's --epochs and --batch-size")
    torch.set_rng_state(state["rng"])
    return state["epoch"] + 1, state["best_dice"], list(state.get("metrics", [])), state.get("progress")


def score_best(args: argparse.Namespace, setup: Setup, out_dir: Path, best_dice: float,
               val_pairs: Sequence[tuple[Path, Path]]) -> None:
    """The end of a run: score its best checkpoint on the validation images at the original size, with the report."""
    # A run resumed into a new folder has no best.pt there unless it improved on the checkpoint's best (nor a
    # last.pt when the checkpoint had finished): then the newest checkpoint scores.
    best = next((path for path in (out_dir / "best.pt", out_dir / "last.pt") if path.is_file()), Path(str(args.resume)))
    if setup.is_main:
        peak = (f"; peak GPU memory {torch.cuda.max_memory_allocated(setup.device) / 2**30:.1f} GiB"
                if setup.device.type == "cuda" else "")  # what a smaller GPU needs (--crop cuts it)
        print(f"done: best validation {setup.task.best_name} {best_dice:.4f} at {args.height}x{args.width}{peak}; "
              f"run folder {out_dir}. Scoring {best.name} at the original size:")
    from evaluate import score  # here, since evaluate.py imports train.py
    score(utils.model_from_checkpoint(utils.load_checkpoint(best), best), val_pairs, args, setup, out_dir,
          f"{ds.describe_pairs(val_pairs)}, held out from training ({best})")


def train_one_epoch(model: torch.nn.Module, loader: DataLoader, opt: Optimization, setup: Setup,
                    args: argparse.Namespace, epoch: int, progress: dict[str, float] | None = None) -> float:
    """One pass over the training data; returns the mean loss per image (over all processes).

    progress ({"step", "loss_sum", "count"}) resumes an epoch that a signal interrupted: its first
    `step` batches are skipped and their loss is carried over.
    """
    model.train()
    progress = progress or {"step": 0, "loss_sum": 0.0, "count": 0.0}
    first_step = int(progress["step"])
    loader.sampler.set_epoch(epoch, skip=first_step * args.batch_size)
    # Summed on the device: no host sync inside the step.
    loss_sum = torch.tensor(progress["loss_sum"], device=setup.device)
    count = torch.tensor(progress["count"], device=setup.device)
    first_bad_step = torch.tensor(-1, device=setup.device)
    last_step = first_step + len(loader)
    bar = tqdm(loader, desc=f"epoch {epoch}/{args.epochs} train", leave=False, disable=not setup.is_main,
               dynamic_ncols=True, initial=first_step, total=last_step)
    warmup_steps = fp32_warmup_steps(args, opt.scheduler)
    for step, (images, masks) in enumerate(bar, start=first_step + 1):
        images = images.to(setup.device, non_blocking=True, memory_format=setup.memory_format)
        masks = masks.to(setup.device, non_blocking=True)
        # The scheduler counts the steps taken so far, those before a --resume included.
        amp_dtype = None if opt.scheduler.last_epoch < warmup_steps else setup.amp_dtype
        loss = train_step(model, images, masks, opt, amp_dtype, args.clip_grad, setup.task.loss)
        opt.scheduler.step()
        finite = torch.isfinite(loss)
        loss_sum += torch.where(finite, loss * images.shape[0], 0.0)
        count += torch.where(finite, images.shape[0], 0)
        first_bad_step = torch.where(~finite & (first_bad_step < 0), step, first_bad_step)
        last = step == last_step
        if step % 10 == 0 or last:  # one host sync every 10 steps: the bar and the NaN check
            raise_if_loss_diverged(int(first_bad_step), epoch, opt.scaler)
            bar.set_postfix(loss=f"{(loss_sum / count.clamp_min(1)).item():.4f}",
                            lr=f"{opt.scheduler.get_last_lr()[0]:.2e}")
        if not last and (step % 10 == 0 or setup.world_size == 1) and stop_requested(setup):
            raise StopRequested({"step": step, "loss_sum": loss_sum.item(), "count": count.item()})
    totals = utils.all_reduce_sum(torch.stack([loss_sum, count]))
    return (totals[0] / totals[1].clamp_min(1)).item()


def train_step(model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor, opt: Optimization,
               amp_dtype: torch.dtype | None, clip_grad: float, loss_fn: Any) -> torch.Tensor:
    """One optimisation step on a batch already on the device; returns the detached loss (no sync)."""
    with utils.autocast(images.device, amp_dtype):
        logits = model(images)
    loss = loss_fn(logits, masks)
    opt.backward(loss)
    opt.step(model, clip_grad)
    return loss.detach()


def refresh_batchnorm(net: UNet, loader: DataLoader, setup: Setup, epoch: int, count: int) -> None:
    """BatchNorm's statistics for the weights as they are, from count training images: the running averages lag."""
    if count > 0:
        loader.sampler.set_epoch(epoch)  # from the epoch's start, also after a resume: the same images either way
        batches = itertools.islice(loader, -(-count // loader.batch_size))
        with utils.autocast(setup.device, setup.amp_dtype):
            torch.optim.swa_utils.update_bn((images for images, _ in batches), net, setup.device)


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: DataLoader, setup: Setup) -> dict[str, Any]:
    """Loss and Dice/IoU/accuracy over the whole loader at its resolution, reduced over processes."""
    model.eval()
    metrics = setup.task.metrics(setup.device)
    loss_sum = torch.zeros((), device=metrics.sums.device, dtype=torch.float64)  # the CPU on MPS: no float64 there
    for images, masks in tqdm(loader, desc="validate", leave=False, disable=not setup.is_main, dynamic_ncols=True):
        images = images.to(setup.device, non_blocking=True, memory_format=setup.memory_format)
        masks = masks.to(setup.device, non_blocking=True)
        with utils.autocast(setup.device, setup.amp_dtype):
            logits = model(images)
        loss_sum += setup.task.loss(logits, masks, per_image=True).to(loss_sum.device).double().sum()
        metrics.update(setup.task.labels(setup.task.probabilities(logits)), setup.task.truth(masks))
    utils.all_reduce_sum(metrics.sums)
    utils.all_reduce_sum(loss_sum)
    result = metrics.compute()
    result["loss"] = loss_sum.item() / max(result["images"], 1)
    return result


@torch.no_grad()
def save_predictions(net: torch.nn.Module, data: ds.SegmentationDataset, indices: Sequence[int], out_dir: Path,
                     setup: Setup) -> None:
    """Masks and photo | ground truth | prediction | errors panels for a fixed few validation images."""
    net.eval()
    images, masks = (torch.stack(batch) for batch in zip(*(data[i] for i in indices)))
    with utils.autocast(setup.device, setup.amp_dtype):
        logits = net(images.to(setup.device))
    labels = setup.task.labels(setup.task.probabilities(logits).cpu())
    names = [data.pairs[i][0].stem for i in indices]
    utils.save_prediction_images(images, setup.task.truth(masks), labels, names, out_dir, setup.task.classes,
                                 setup.task.ignore_index)


# --- set-up: processes, data, model, optimisation ---------------------------------------------

@dataclass(frozen=True)
class Setup:
    """Where and how this process trains: its rank, the device, precision, memory format and the task."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    amp_dtype: torch.dtype | None
    memory_format: torch.memory_format
    task: Task

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def create(args: argparse.Namespace, rank: int = 0, world_size: int = 1, local_rank: int = 0) -> Setup:
        """This process's set-up for the run's --device, --amp, --channels-last, --classes and --edge-weight."""
        device = utils.select_device(args.device, local_rank)
        # getattr: checkpoints from before --edge-weight have none in their config
        task = make_task(args.classes, args.ignore_index, getattr(args, "edge_weight", 1.0), args.height)
        return Setup(rank, world_size, local_rank, device, utils.autocast_dtype(device, args.amp),
                     utils.memory_format(device, args.channels_last), task)


def load_split(args: argparse.Namespace, state: dict[str, Any] | None,
               setup: Setup) -> tuple[list[tuple[Path, Path]], list[tuple[Path, Path]], dict[str, list[str]]]:
    """(training pairs, validation pairs, split) of the checked data: --val-dir, else a seeded split by car (or
    image) of --data-dir, which a resumed or --init run keeps; generates the synthetic dataset first when asked."""
    data_dir = Path(args.data_dir)
    if args.synthetic:
        if setup.is_main:
            from synthetic import generate_synthetic
            generate_synthetic(data_dir, cars=args.synthetic_cars, seed=0)
        if dist.is_initialized():
            dist.barrier()
    if not ds.list_images(data_dir):
        found = ("does not exist (is the path right?)" if not data_dir.exists() else "holds no training images")
        if above := ds.dataset_above(data_dir):
            raise utils.UserError(f"{data_dir} {found}{above} to --data-dir")
        raise utils.UserError(
            f"{data_dir} {found}: expected {ds.LAYOUTS.replace('DIR', str(data_dir))}.\n"
            f"  Download Carvana (needs a Kaggle account):  python download.py --out {data_dir}\n"
            f"  Or train on the synthetic default:           python train.py --synthetic")
    pairs = checked_pairs(data_dir, args, setup)
    if args.val_dir:
        val_pairs = checked_pairs(Path(args.val_dir), args, setup)
        if shared := ds.cars_on_both_sides(pairs, val_pairs):
            raise utils.UserError(
                f"{args.val_dir}: {utils.plural(len(shared), 'car')} also in {data_dir} ({', '.join(shared[:3])}"
                f"{', ...' if len(shared) > 3 else ''}), so validation would score views of cars it trained on; "
                f"move each car's photos into one of the two folders")
        return pairs, val_pairs, {"train": ds.groups_of(pairs), "val": ds.groups_of(val_pairs)}
    if state is not None and state.get("split"):
        split = state["split"]
    else:
        train_groups, val_groups = ds.split_by_group(pairs, args.val_cars, args.seed)
        split = {"train": train_groups, "val": val_groups}
    train_pairs, val_pairs = ds.pairs_of_groups(pairs, split["train"]), ds.pairs_of_groups(pairs, split["val"])
    if not val_pairs:
        raise utils.UserError(f"none of the validation cars or images of {args.resume or args.init} are in "
                              f"{args.data_dir}")
    return train_pairs, val_pairs, split


def checked_pairs(data_dir: Path, args: argparse.Namespace, setup: Setup) -> list[tuple[Path, Path]]:
    """The good pairs of a folder, after the dataset check (which knows --classes and --in-channels)."""
    return usable_pairs(data_dir, skip_bad=args.skip_bad, classes=args.classes, ignore_index=args.ignore_index,
                        in_channels=args.in_channels, announce=setup.is_main)


def make_loader(pairs: Sequence[tuple[Path, Path]], args: argparse.Namespace, setup: Setup,
                train: bool) -> DataLoader:
    """A DataLoader over pairs: augmented and shuffled for training, resize-only and in order for validation."""
    if train:  # class masks mark the border an affine move brings in as unlabelled, not as background
        augmentation = ds.Augmentation(args.shift, tuple(args.zoom), args.rotate, args.grey,
                                       tuple(args.crop) if args.crop else None)
        transform = ds.train_transforms(args.height, args.width, args.in_channels,
                                        mask_fill=args.ignore_index if args.classes > 1 else 0,
                                        augmentation=augmentation)
    else:
        transform = ds.val_transforms(args.height, args.width)
    cache = args.cache and ds.cache_fits(len(pairs), args.height, args.width, args.in_channels, announce=setup.is_main)
    data = ds.SegmentationDataset(pairs, args.height, args.width, transform, cache=cache,
                                  soft_masks=args.soft_masks, classes=args.classes, in_channels=args.in_channels)
    sampler = ds.SeededSampler(len(data), args.seed, shuffle=train, rank=setup.rank, world_size=setup.world_size)
    return DataLoader(data, batch_size=args.batch_size, sampler=sampler, num_workers=args.workers,
                      worker_init_fn=ds.prepare_workers() if args.workers > 0 else None,
                      pin_memory=setup.device.type == "cuda", persistent_workers=args.workers > 0)


def build_model(args: argparse.Namespace, state: dict[str, Any] | None,
                setup: Setup) -> tuple[UNet, torch.nn.Module]:
    """(the UNet, the model to train): the UNet from the checkpoint when resuming or with --init, wrapped for DDP
    and compile."""
    if state is None:
        net = UNet(in_channels=args.in_channels, out_channels=args.classes, features=args.features)
    else:
        source = args.resume or args.init
        net = utils.model_from_checkpoint(state, source)
        args.features = list(net.config["features"])  # the checkpoint's UNet, so config.json says which
        if (net.config["in_channels"], net.config["out_channels"]) != (args.in_channels, args.classes):
            raise utils.UserError(
                f"{source} holds a model with in_channels={net.config['in_channels']} and out_channels="
                f"{net.config['out_channels']}, which --in-channels {args.in_channels} --classes {args.classes} "
                f"do not fit; leave those flags out to use the checkpoint's")
    net = net.to(setup.device, memory_format=setup.memory_format)
    model: torch.nn.Module = net
    if setup.world_size > 1:
        if args.sync_bn:
            net = model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(net)
        model = torch.nn.parallel.DistributedDataParallel(
            net, device_ids=[setup.local_rank] if setup.device.type == "cuda" else None)
    return net, torch.compile(model) if args.compile else model


@dataclass
class Optimization:
    """AdamW, its one-cycle learning-rate schedule and the fp16 grad scaler: stepped together, saved together."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.OneCycleLR
    scaler: torch.amp.GradScaler

    @staticmethod
    def create(net: torch.nn.Module, args: argparse.Namespace, device: torch.device,
               steps_per_epoch: int) -> Optimization:
        """AdamW (fused on CUDA and CPUs unless --no-fused-adamw), its schedule, and the scaler only for fp16."""
        fused = args.fused_adamw and device.type in ("cuda", "cpu")
        optimizer = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=args.weight_decay, fused=fused)
        scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=args.lr, epochs=args.epochs,
                                                        steps_per_epoch=steps_per_epoch, pct_start=0.1)
        amp_dtype = utils.autocast_dtype(device, args.amp)
        return Optimization(optimizer, scheduler, torch.amp.GradScaler(device.type, enabled=amp_dtype == torch.float16))

    def backward(self, loss: torch.Tensor) -> None:
        """Fresh gradients of the loss (scaled for fp16, so that small ones do not flush to zero)."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()

    def step(self, model: torch.nn.Module, clip_grad: float) -> None:
        """Clip the gradients' norm (0: no clipping) and update the weights; the schedule steps in the loop."""
        if clip_grad > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(model.parameters(), clip_grad)
        self.scaler.step(self.optimizer)  # skipped by the fp16 grad scaler when gradients overflowed
        self.scaler.update()

    def state_dict(self) -> dict[str, Any]:
        return {part: getattr(self, part).state_dict() for part in ("optimizer", "scheduler", "scaler")}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for part in ("optimizer", "scheduler", "scaler"):
            getattr(self, part).load_state_dict(state[part])


def fp32_warmup_steps(args: argparse.Namespace, scheduler: Any) -> int:
    """How many of the run's first optimizer steps train in fp32 (--fp32-warmup) before mixed precision."""
    return int(args.fp32_warmup * scheduler.total_steps)


def describe_run(args: argparse.Namespace, setup: Setup, net: UNet, train_pairs: Sequence, val_pairs: Sequence,
                 opt: Optimization) -> str:
    """The run's first line: the data, the model, the device and precision."""
    source = args.data_dir if not args.val_dir else f"{args.data_dir} and {args.val_dir}"
    kind = ("" if args.in_channels == 3 else ", grayscale input") + (
        "" if args.classes == 1 else f", {args.classes} classes (ignore index {args.ignore_index})")
    warmup = fp32_warmup_steps(args, opt.scheduler) if setup.amp_dtype else 0
    size = f"{args.height}x{args.width}" + (f" in {args.crop[0]}x{args.crop[1]} crops" if args.crop else "")
    edge = f", outline weighted {args.edge_weight:g}x" if args.edge_weight != 1 else ""
    start = f" from {args.init}" if args.init and not args.resume else ""
    return (f"{ds.describe_pairs(train_pairs)} for training, {ds.describe_pairs(val_pairs)} for validation from "
            f"{source} at {size}{edge}; UNet {net.config['features']} ({count_parameters(net) / 1e6:.1f} M "
            f"parameters){start}{kind} on "
            f"{utils.device_name(setup.device)}{f' x{setup.world_size}' if setup.world_size > 1 else ''}, amp "
            f"{setup.amp_dtype or 'off'}{f' after {warmup} fp32 steps' if warmup else ''}, "
            f"{'channels_last' if setup.memory_format == torch.channels_last else 'NCHW'}, {args.workers} workers")


# --- stopping: signals and a diverged loss ----------------------------------------------------

class StopRequested(Exception):
    """SIGINT or SIGTERM arrived; carries the interrupted epoch's progress so it can be resumed."""

    def __init__(self, progress: dict[str, float]):
        super().__init__("stop requested")
        self.progress = progress


_stop_signals: list[int] = []


def request_stop(signum: int, frame: Any) -> None:
    """Signal handler: note the request; the training loop stops after the current step."""
    _stop_signals.append(signum)


def stop_requested(setup: Setup) -> bool:
    """Whether a stop signal arrived (in any process, so that all ranks stop at the same step)."""
    if setup.world_size == 1:
        return bool(_stop_signals)
    flag = torch.tensor([float(bool(_stop_signals))], device=setup.device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


def raise_if_loss_diverged(first_bad_step: int, epoch: int, scaler: torch.amp.GradScaler) -> None:
    """A UserError on a non-finite loss, unless fp16's grad scaler is still skipping overflow steps."""
    if first_bad_step < 0:
        return
    if scaler.is_enabled() and scaler.get_scale() >= 1.0:
        return  # the scaler skipped those steps and lowered its scale; only a collapsed scale is fatal
    raise utils.UserError(f"the loss became NaN or infinite in epoch {epoch} at step {first_bad_step}; "
                          f"lower --lr or try --amp off. The last good checkpoint is kept.")


def checkpoint_state(net: UNet, opt: Optimization, epoch: int, best_dice: float, args: argparse.Namespace,
                     split: dict[str, list[str]], rows: list[dict[str, Any]],
                     progress: dict[str, float] | None = None) -> dict[str, Any]:
    """Everything needed to resume a run (epoch = the last completed one) or to rebuild its model."""
    return {"model": net.state_dict(), "model_config": net.config, **opt.state_dict(), "epoch": epoch,
            "progress": progress,  # position inside the next epoch when a signal interrupted it
            "best_dice": best_dice, "metrics": rows,  # metrics: the source of truth for metrics.csv on resume
            "config": vars(args), "split": split, "rng": torch.get_rng_state()}


if __name__ == "__main__":
    sys.exit(main())
