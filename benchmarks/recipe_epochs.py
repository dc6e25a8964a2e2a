"""How many epochs of a train.py command fit a training budget on this device, from a short measured probe.

    python benchmarks/recipe_epochs.py --minutes 10 -- --data-dir DIR --height 1280 --width 1918 --batch-size 4 ...

Times train.py's training step for the command's UNet, size and batch on a fixed batch (bench_train.py's
measurement, a few seconds on a GPU), counts the photos the command's split trains and validates on, and prints
the number of epochs whose estimated time fits: each training photo at the probe's rate, each validation photo at a
third of that (a forward pass), times --margin for the loader, the fp32 warm-up steps and the loss's extras, plus
the copy of the UNet's checkpoint to CPU memory (train.py's writer, timed into --dir as bench_checkpoint.py times
it). The checkpoint's write overlaps the next epoch, so an epoch takes at least that long. The estimate goes to
stderr, the number alone to stdout: benchmarks/gpu_recipe.sh runs this when EPOCHS is not given, so that a lent
GPU's run fits the time it has; benchmarks/cpu_schedule.py estimates the CPU recipe's stages with the same probe.
"""
from __future__ import annotations

import argparse
import math
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import bench_checkpoint
import bench_train
import dataset as ds
import train
import utils


def epoch_seconds(images_per_second: float, train_images: int, val_images: int, margin: float,
                  checkpoint_seconds: tuple[float, float] = (0.0, 0.0)) -> float:
    """Estimated seconds an epoch. checkpoint_seconds: (the copy to CPU memory, which blocks; the write, which
    overlaps the next epoch)."""
    copy, write = checkpoint_seconds
    return max(margin * (train_images + val_images / 3) / images_per_second + copy, write)


def epochs_that_fit(minutes: float, images_per_second: float, train_images: int, val_images: int, margin: float,
                    checkpoint_seconds: tuple[float, float] = (0.0, 0.0)) -> tuple[int, float]:
    """(epochs, estimated seconds an epoch): at least one epoch, as many as fit in the minutes."""
    seconds = epoch_seconds(images_per_second, train_images, val_images, margin, checkpoint_seconds)
    return max(1, math.floor(minutes * 60 / seconds)), seconds


@dataclass
class Probe:
    """What an epoch of a train.py command costs here, from a few measured steps."""
    images_per_second: float
    checkpoint_seconds: tuple[float, float]
    train_images: int
    val_images: int

    def epoch_seconds(self, margin: float) -> float:
        """Estimated seconds an epoch, with margin for what the probe does not time."""
        return epoch_seconds(self.images_per_second, self.train_images, self.val_images, margin,
                             self.checkpoint_seconds)


def probe(args: argparse.Namespace, steps: int, folder: Path) -> Probe:
    """Times train.py's step for args' UNet, size and batch, and its checkpoint (into folder); counts args' split."""
    pairs = ds.find_pairs(args.data_dir)
    train_groups, val_groups = ds.split_by_group(pairs, args.val_cars, args.seed)
    train_images, val_images = len(ds.pairs_of_groups(pairs, train_groups)), len(ds.pairs_of_groups(pairs, val_groups))
    timing = argparse.Namespace(height=args.height, width=args.width, batch_size=args.batch_size, workers=args.workers,
                                features=args.features, device=args.device, warmup=3, steps=steps, compile=False)
    images_per_second = bench_train.measure_steps(timing, "project")["img_s"]
    return Probe(images_per_second, time_checkpoint(args, folder), train_images, val_images)


def time_checkpoint(args: argparse.Namespace, folder: Path) -> tuple[float, float]:
    """(seconds, seconds) that train.py's checkpoint writer blocks and then writes for this UNet's checkpoint."""
    state = bench_checkpoint.checkpoint_of(args.features, utils.select_device(args.device))
    folder.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".recipe-epochs-probe-", dir=folder) as scratch:
        blocked, on_disk = bench_checkpoint.with_writer(state, Path(scratch))
    return blocked, on_disk - blocked


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--minutes", type=float, required=True, help="the training budget (the sum of the epochs)")
    parser.add_argument("--margin", type=float, default=1.15,
                        help="estimated epoch time over the steps' own (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps of the probe (default: %(default)s)")
    parser.add_argument("--dir", default="runs", help="where to time a checkpoint's write (default: %(default)s)")
    parser.add_argument("train_flags", nargs=argparse.REMAINDER, help="train.py's flags, after --")
    opts = parser.parse_args()
    flags = opts.train_flags[1:] if opts.train_flags[:1] == ["--"] else opts.train_flags
    args, _ = train.parse_args(flags)
    measured = probe(args, opts.steps, Path(opts.dir))
    epochs, seconds = epochs_that_fit(opts.minutes, measured.images_per_second, measured.train_images,
                                      measured.val_images, opts.margin, measured.checkpoint_seconds)
    copy, write = measured.checkpoint_seconds
    print(f"probe: {measured.images_per_second:.1f} training img/s at {args.height}x{args.width}, batch "
          f"{args.batch_size}, UNet {args.features}; checkpoint copy {copy:.2f} s, write {write:.2f} s; "
          f"{measured.train_images} training and {measured.val_images} validation photos: about {seconds:.1f} s an "
          f"epoch, so {utils.plural(epochs, 'epoch')}, about {epochs * seconds / 60:.1f} of the {opts.minutes:g} "
          f"minutes", file=sys.stderr)
    print(epochs)


if __name__ == "__main__":
    main()
