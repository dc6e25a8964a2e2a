"""Score a checkpoint: Dice, IoU and accuracy at the training size and at each photo's own size.

    python evaluate.py --checkpoint runs/NAME/best.pt --data-dir data/carvana        # its held-out cars
    python evaluate.py --checkpoint runs/NAME/best.pt --data-dir unseen --all --tta  # every image of a folder
    torchrun --nproc_per_node=4 evaluate.py --checkpoint ...                          # several GPUs

At the original size the probabilities are upsampled bilinearly before the decision (threshold, or
the likeliest class), exactly as predict.py makes its masks (with --size, from the model's inputs at those
sizes, averaged). The images and settings (size, classes, split) are the checkpoint's own. Each scoring writes
per_image.csv, errors/ and report.html into the checkpoint's folder, replacing those of the last one.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image
from torch.utils.data import DataLoader
from tqdm import tqdm

import dataset as ds
import utils
from predict import mean_upsampled, predict_probabilities
from report import PerImage, write_report
from task import keep_largest_region
from train import Setup, checked_pairs


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """evaluate.py's command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, metavar="FILE",
                        help="checkpoint written by train.py (e.g. runs/NAME/best.pt), or a run folder (its last.pt)")
    parser.add_argument("--data-dir", metavar="DIR", help="folder with the run's validation cars (default: the run's)")
    parser.add_argument("--all", action="store_true",
                        help="score every image of --data-dir (cars the run never saw), not only its held-out ones")
    parser.add_argument("--tta", action="store_true", help="also score horizontal-flip TTA (2x the compute)")
    parser.add_argument("--size", type=utils.parse_size, nargs="+", metavar="HxW",
                        help="input size(s) for the original-size rows, as predict.py --size (default: the training "
                             "size); several average their probabilities (multi-scale TTA)")
    parser.add_argument("--batch-size", type=int, help="images per forward pass (default: the run's)")
    parser.add_argument("--workers", type=int, help="data-loading processes, 0: the main process (default: train's)")
    parser.add_argument("--device", default="auto", help="auto (default: cuda, then mps, then cpu), cuda:1, mps, cpu")
    parser.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"),
                        help="mixed precision, as predict.py's (default: the run's, which is auto unless it was set)")
    args = parser.parse_args(argv)
    if (args.batch_size is not None and args.batch_size < 1) or (args.workers is not None and args.workers < 0):
        parser.error("--batch-size must be at least 1 and --workers 0 or more")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table; exit status 1 after a user error."""
    with utils.process_group() as (rank, world_size, local_rank):
        return utils.run_program(lambda: run(parse_args(argv), rank, world_size, local_rank))


def run(args: argparse.Namespace, rank: int, world_size: int, local_rank: int) -> None:
    """Load the checkpoint, find its held-out images, score them and print the table."""
    state = utils.load_checkpoint(args.checkpoint)
    net = utils.model_from_checkpoint(state, args.checkpoint)
    utils.check_input_sizes(args.size or [], net.config)
    config = utils.training_config(state, args.checkpoint)  # the run's settings, but this command's data and machine
    config.data_dir = args.data_dir or getattr(config, "val_dir", None) or config.data_dir
    config.batch_size = config.batch_size if args.batch_size is None else args.batch_size
    config.device = args.device
    config.amp = args.amp or config.amp
    config.skip_bad = True  # score what can be read: the check lists the rest, and training's flag is not ours
    config.workers = ds.default_workers(args.device) if args.workers is None else args.workers
    setup = Setup.create(config, rank, world_size, local_rank)
    pairs = checked_pairs(Path(config.data_dir), config, setup)
    if not args.all:
        pairs = ds.pairs_of_groups(pairs, state.get("split", {}).get("val", []))
        if not pairs:
            raise utils.UserError(f"none of the validation cars or images of {args.checkpoint} are in "
                                  f"{config.data_dir}; pass --all to score every image there")
    run_dir = utils.run_folder(args.checkpoint)
    summary = (f"{ds.describe_pairs(pairs)} of {config.data_dir}{'' if args.all else ', held out from training'} "
               f"({args.checkpoint})")
    score(net, pairs, config, setup, run_dir, summary, args.tta, args.size)


def score(net: torch.nn.Module, pairs: Sequence[tuple[Path, Path]], config: argparse.Namespace, setup: Setup,
          run_dir: Path, summary: str, tta: bool = False, sizes: Sequence[tuple[int, int]] | None = None) -> None:
    """Score net on the pairs: print the table and the threshold line, write per_image.csv and report.html."""
    net = net.to(setup.device, memory_format=setup.memory_format)
    per_image = PerImage(setup.task, run_dir, setup.device)
    results = evaluate_at_training_and_original_size(net, pairs, config, setup, tta, per_image, sizes)
    if setup.is_main:
        print(summary)
        print_table(results, config, original_size_label(pairs), setup, sizes)
        if per_image.threshold_dice:
            print("mean Dice at the original size without TTA, by threshold: "
                  + "  ".join(f"{t}: {dice:.4f}" for t, dice in per_image.threshold_dice.items()))
        inputs = utils.describe_sizes(sizes or [(config.height, config.width)])
        write_report(per_image, f"{summary}; the model's input{'s' if ' + ' in inputs else ''}: {inputs}")
        print(f"per-image scores, worst first: {run_dir / 'per_image.csv'}; report: {run_dir / 'report.html'}")


class WithOriginalMasks(ds.SegmentationDataset):
    """Validation items at the training size, each with its mask at the original size, its index and the image at
    each of input_sizes (the model's inputs for the original-size scores)."""

    def __init__(self, pairs: Sequence[tuple[Path, Path]], config: argparse.Namespace,
                 input_sizes: Sequence[tuple[int, int]]):
        super().__init__(pairs, config.height, config.width, ds.val_transforms(config.height, config.width),
                         soft_masks=False, classes=config.classes, in_channels=config.in_channels)
        self.input_sizes = [tuple(size) for size in input_sizes]
        self.other_sizes = [size for size in self.input_sizes if size != self.size]  # decoded besides the training size

    def __getitem__(self, item: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int, list]:
        image, mask = super().__getitem__(item)
        views = [ds.image_tensor(ds.load_image(self.pairs[item[0]][0], size, self.in_channels))
                 for size in self.other_sizes]
        return image, mask, torch.from_numpy(self.original_mask(item[0])), item[0], views

    @staticmethod
    def collate(items: list) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor], tuple[int, ...], list]:
        """Stack the training-size tensors and each other input size's; original masks stay a list (their sizes may
        differ)."""
        images, masks, originals, indices, views = zip(*items)
        return torch.stack(images), torch.stack(masks), list(originals), indices, [torch.stack(v) for v in zip(*views)]


@torch.no_grad()
def evaluate_at_training_and_original_size(net: torch.nn.Module, pairs: Sequence[tuple[Path, Path]],
                                           config: argparse.Namespace, setup: Setup,
                                           tta: bool = False, per_image: PerImage | None = None,
                                           sizes: Sequence[tuple[int, int]] | None = None
                                           ) -> dict[tuple[str, bool], dict[str, Any]]:
    """Metrics keyed by (resolution, tta), resolution "training", "original" or, for a binary model, "one region"
    (original, only the largest region kept, its holes filled), reduced over processes; the original-size rows
    average the probabilities of the inputs at `sizes` (default: the training size); per_image collects each
    image's scores without TTA at the original size."""
    net.eval()
    task = setup.task
    data = WithOriginalMasks(pairs, config, sizes or [(config.height, config.width)])
    sampler = ds.SeededSampler(len(data), config.seed, shuffle=False, rank=setup.rank, world_size=setup.world_size)
    loader = DataLoader(data, batch_size=config.batch_size, num_workers=config.workers, sampler=sampler,
                        worker_init_fn=ds.prepare_workers() if config.workers > 0 else None,
                        collate_fn=WithOriginalMasks.collate)
    modes = (False, True) if tta else (False,)
    resolutions = ("training", "original") + (("one region",) if task.classes == 1 else ())
    metrics = {(res, flip): task.metrics(setup.device) for res in resolutions for flip in modes}
    for images, masks, originals, indices, views in tqdm(loader, desc="evaluate", leave=False,
                                                         disable=not setup.is_main):
        inputs = [x.to(setup.device, memory_format=setup.memory_format) for x in (images, *views)]
        for flip in modes:
            with utils.autocast(setup.device, setup.amp_dtype):
                probs = {size: predict_probabilities(net, x, task, flip)
                         for size, x in zip([data.size, *data.other_sizes], inputs)}
            metrics[("training", flip)].update(task.labels(probs[data.size].cpu()), task.truth(masks))
            for i, (original, index) in enumerate(zip(originals, indices)):
                upsampled = mean_upsampled([probs[size][i:i + 1] for size in data.input_sizes], tuple(original.shape))
                full, truth = task.labels(upsampled), task.truth(original[None])
                decided = full.cpu()  # one copy off the device, for the metrics and the one-region cleaning
                metrics[("original", flip)].update(decided, truth)
                if task.classes == 1:
                    one_car = torch.from_numpy(keep_largest_region(decided[0].numpy()))
                    metrics[("one region", flip)].update(one_car[None], truth)
                if per_image is not None and not flip:
                    per_image.add(data.pairs[index][0], upsampled, full[0], truth[0])
    for m in metrics.values():
        utils.all_reduce_sum(m.sums)
    if per_image is not None:
        per_image.gather()
    return {key: m.compute() for key, m in metrics.items()}


def original_size_label(pairs: Sequence[tuple[Path, Path]]) -> str:
    """'1280x1918 (original)' (height x width) when all masks share one size, else 'original sizes'."""
    sizes = set()
    for _, mask in pairs:
        with Image.open(mask) as img:  # reads the header only
            sizes.add((img.height, img.width))
    return f"{'x'.join(map(str, sizes.pop()))} (original)" if len(sizes) == 1 else "original sizes"


def print_table(results: dict[tuple[str, bool], dict[str, Any]], config: argparse.Namespace, original: str,
                setup: Setup, sizes: Sequence[tuple[int, int]] | None = None) -> None:
    """One row per (resolution, TTA), the task's columns, then what they mean."""
    task = setup.task
    if sizes and list(sizes) != [(config.height, config.width)]:
        averaged = "averaged, " if len(sizes) > 1 else ""
        print(f"original-size rows: the probabilities at inputs of {utils.describe_sizes(sizes)} ({averaged}"
              f"upsampled to the original size)")
    labels = {"training": f"{config.height}x{config.width} (training)", "original": original,
              "one region": f"{original.split()[0]}, one region"}
    print(f"{'resolution':<22}{'TTA':<5}" + "".join(f"{title:>{width}}" for title, _, width in task.table))
    for (resolution, tta), m in results.items():
        print(f"{labels[resolution]:<22}{'yes' if tta else 'no':<5}"
              + "".join(f"{m[key]:>{width}.4f}" for _, key, width in task.table))
    print(task.table_note)
    if task.classes > 1:
        for (resolution, tta), m in results.items():
            print(f"IoU per class 0..{task.classes - 1} at {labels[resolution]}{', TTA' if tta else ''}: "
                  + " ".join(f"{v:.4f}" for v in m["class_iou"]))


if __name__ == "__main__":
    sys.exit(main())
