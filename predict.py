"""Predict masks with a trained U-Net: full-resolution PNG masks, overlays and a Kaggle submission.

    python predict.py --checkpoint runs/NAME/best.pt --input data/carvana/test --output predictions
    python predict.py --checkpoint runs/NAME/best.pt --input a.jpg photos/ --output out \\
        --overlay --tta --submission out/submission.csv.gz

Each image, turned upright as its EXIF orientation says, runs through the model at its training size (or at each
--size); the probabilities, upsampled bilinearly to the image's own size (and averaged), are thresholded (or give the
likeliest class). For X.jpg it writes OUTPUT/X_mask.png (0 background, 255 car; multi-class: a palette PNG of the
class indices) and, with --overlay, X_overlay.jpg. Images whose outputs OUTPUT holds are skipped (see --overwrite);
unreadable ones are listed at the end (exit status 2), after every other image got its mask, and no submission is
written: it would lack them.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import gzip
import io
import sys
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

import utils
from dataset import GENERIC, is_hidden, load_image, load_mask, upright
from task import Task, keep_largest_region, make_task
from utils import UserError

IMAGE_EXTENSIONS = GENERIC.image_extensions


# --- inputs and outputs -----------------------------------------------------------------------

def find_images(inputs: Sequence[str | Path]) -> list[Path]:
    """The images named by inputs, in order: files as given, folders' images sorted by name; no repeats."""
    images: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir()
                           if p.suffix.lower() in IMAGE_EXTENSIONS and not is_hidden(p) and p.is_file())
            if not found:
                below = sorted(str(d) for d in item.iterdir() if d.is_dir() and not is_hidden(d))
                hint = f"; the photos may be in a folder below it: {', '.join(below[:4])}" if below else ""
                raise UserError(f"{item}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder{hint}")
            images += found
        elif item.is_file():
            if item.suffix.lower() not in IMAGE_EXTENSIONS:
                raise UserError(f"{item}: not an image file (expected {', '.join(IMAGE_EXTENSIONS)})")
            images.append(item)
        else:
            raise UserError(f"{item}: no such file or folder")
    # A file named both directly and through its folder is predicted once, where it first comes.
    return list(dict(zip(map(Path.resolve, images), images)).values())


def check_output_names(paths: Sequence[Path]) -> None:
    """Refuse two images that would write the same X_mask.png (a/X.jpg and b/X.png, say), names that differ only in
    case included: Windows and macOS file names ignore it, so there one mask would silently replace the other."""
    seen: dict[str, Path] = {}
    for path in paths:
        if (first := seen.setdefault(path.stem.casefold(), path)) is not path:
            raise UserError(f"{first} and {path} would both write {path.stem}_mask.png (file names that differ only "
                            f"in case are one file on Windows and macOS): predict them into separate --output folders")


def save_outputs(path: Path, mask: np.ndarray, output: Path, overlay: bool = False, classes: int = 1) -> None:
    """Write OUTPUT/X_mask.png (and with overlay OUTPUT/X_overlay.jpg) for image X from its boolean mask or map
    of class indices."""
    utils.save_mask_png(mask, output / f"{path.stem}_mask.png", classes)
    if overlay:
        photo = torch.tensor(load_image(path)).permute(2, 0, 1)  # full resolution (3, H, W), a writable copy
        tinted = utils.overlay(photo, torch.from_numpy(mask), classes)
        with utils.atomic_write(output / f"{path.stem}_overlay.jpg", "wb") as f:
            Image.fromarray(tinted.permute(1, 2, 0).numpy()).save(f, format="JPEG", quality=90)


@contextlib.contextmanager
def open_submission(path: Path | None) -> Iterator[Any]:
    """A csv writer for Kaggle's `img,rle_mask` file (gzip for .gz), renamed into place only on success."""
    if path is None:
        yield None
        return
    with contextlib.ExitStack() as stack:  # closes the streams innermost first, raw last, synced by atomic_write
        try:
            raw = stack.enter_context(utils.atomic_write(path, "wb"))
        except OSError as e:
            raise UserError(f"{path}: cannot write the submission ({e.strerror or e})") from None
        if path.name.lower().endswith(".gz"):  # filename= names the csv inside (else it would be the temporary name)
            raw = stack.enter_context(gzip.GzipFile(filename=path.name, mode="wb", fileobj=raw, compresslevel=6))
        text = io.TextIOWrapper(raw, encoding="utf-8", newline="")
        stack.callback(text.detach)  # flushes, and leaves closing the streams to the stack
        writer = csv.writer(text, lineterminator="\n")
        writer.writerow(["img", "rle_mask"])
        yield writer


# --- model ------------------------------------------------------------------------------------

def load_segmentation_model(checkpoint: Path, device: torch.device) -> tuple[nn.Module, tuple[int, int]]:
    """(model in eval mode, in the device's memory format (utils.memory_format), on device; its training size
    (height, width)) from a checkpoint, or from export.py's ONNX file (run by ONNX Runtime on the CPU)."""
    if utils.is_onnx_file(checkpoint):
        from export import OnnxModel  # here, not at the top: the core install has no onnxruntime
        model = OnnxModel(checkpoint)
        return model, model.size
    state = utils.load_checkpoint(checkpoint)
    config = utils.training_config(state, checkpoint)
    model = utils.model_from_checkpoint(state, checkpoint).to(device, memory_format=utils.memory_format(device)).eval()
    return model, (config.height, config.width)


@torch.inference_mode()
def predict_probabilities(model: nn.Module, images: torch.Tensor, task: Task, tta: bool = False) -> torch.Tensor:
    """Float32 probabilities (N, C, h, w) of float images (N, in_channels, h, w) in [0, 1]; model in eval mode."""
    if not tta:
        return task.probabilities(model(images))
    # Horizontal-flip TTA in one forward pass over both views (BatchNorm is in eval mode, so mixing
    # them in a batch changes nothing); the mirrored view's prediction is flipped back before averaging.
    plain, mirrored = task.probabilities(model(torch.cat([images, images.flip(-1)]))).chunk(2)
    return (plain + mirrored.flip(-1)) / 2


def upsample_to(probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C, h, w) probabilities or logits resized bilinearly (align_corners=False) to size=(H, W)."""
    if tuple(probs.shape[-2:]) == tuple(size):
        return probs
    return F.interpolate(probs, size=tuple(size), mode="bilinear", align_corners=False)


def mean_upsampled(probs: Sequence[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
    """The mean of one image's probabilities (each (1, C, h, w), from inputs of different sizes: multi-scale TTA)
    after upsampling each to size=(H, W)."""
    if len(probs) == 1:
        return upsample_to(probs[0], size)
    return torch.stack([upsample_to(p, size) for p in probs]).mean(0)


class ImageFiles(Dataset):
    """Images decoded straight to each of the model's input sizes and its channels, with their original size."""

    def __init__(self, paths: Sequence[Path], sizes: Sequence[tuple[int, int]], channels: int = 3):
        self.paths, self.sizes, self.channels = list(paths), list(sizes), channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[list[torch.Tensor], torch.Tensor, int, str]:
        """(uint8 (h, w, channels) image at each size, original (H, W) as viewers show it, index, error or "")."""
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                (width, height), _ = upright(img)  # reads the header only
            # Copies (torch.tensor): PIL's arrays are read-only.
            images = [torch.tensor(load_image(path, size, self.channels)) for size in self.sizes]
            return images, torch.tensor([height, width]), index, ""
        except Exception as e:  # truncated, corrupt, a decompression bomb: returned, so the others get masks
            blanks = [torch.zeros(*size, self.channels, dtype=torch.uint8) for size in self.sizes]
            return blanks, torch.tensor([0, 0]), index, f"{path}: cannot read the image ({type(e).__name__}: {e})"


def predict_paths(model: nn.Module, paths: Sequence[Path], sizes: Sequence[tuple[int, int]], *, batch_size: int = 8,
                  workers: int = 0, threshold: float = 0.5, tta: bool = False, amp: str = "auto",
                  postprocess: bool = False) -> Iterator[tuple[Path, np.ndarray | None, str]]:
    """(path, mask at the image's own size: boolean, or uint8 class indices; "") for each path, in order, or
    (path, None, why) for an image that cannot be read; several input sizes average their probabilities;
    postprocess keeps a binary mask's largest region."""
    device = next(model.parameters()).device
    dtype, memory_format = utils.autocast_dtype(device, amp), utils.memory_format(device)
    task = make_task(model.config["out_channels"])
    loader = DataLoader(ImageFiles(paths, sizes, model.config["in_channels"]), batch_size=batch_size,
                        num_workers=workers, pin_memory=device.type == "cuda")
    for views, originals, indices, errors in loader:
        probs = []  # (N, C, h, w) at each input size
        for images in views:
            # (N, h, w, 3) uint8 permuted to (N, 3, h, w) is channels_last in memory already.
            x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
            with utils.autocast(device, dtype):
                probs.append(predict_probabilities(model, x.contiguous(memory_format=memory_format), task, tta))
        for i, ((height, width), index, error) in enumerate(zip(originals.tolist(), indices.tolist(), errors)):
            mask = None
            if not error:  # upsample the probabilities, not the decided mask, so edges are smooth at full size
                prob = mean_upsampled([p[i:i + 1] for p in probs], (height, width))
                mask = task.labels(prob, threshold)[0].cpu().numpy()
            if mask is not None and postprocess:
                mask = keep_largest_region(mask)
            yield paths[index], mask, error


# --- command line -----------------------------------------------------------------------------

def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """predict.py's command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, metavar="FILE", required=True,
                        help="checkpoint written by train.py (runs/NAME/best.pt), or a run folder (its last.pt)")
    parser.add_argument("--input", type=Path, nargs="+", metavar="PATH", required=True,
                        help=f"images and/or folders of images ({', '.join(IMAGE_EXTENSIONS)}), in name order")
    parser.add_argument("--output", type=Path, metavar="DIR", required=True,
                        help="folder for X_mask.png (and X_overlay.jpg) per image X; created if needed")
    parser.add_argument("--threshold", type=float, default=0.5, metavar="P",
                        help="binary models: a pixel is car above this probability (default: %(default)s)")
    parser.add_argument("--overlay", action="store_true",
                        help="also write X_overlay.jpg: the mask tinted over the full-resolution photo")
    parser.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto",
                        help="mixed precision, as train.py's (default: auto; off: fp32, as an ONNX export runs)")
    parser.add_argument("--tta", action="store_true",
                        help="average the probabilities of each image and its horizontal mirror (2x the compute)")
    parser.add_argument("--size", type=utils.parse_size, nargs="+", metavar="HxW",
                        help="the model's input size(s) (default: its training size); several average their "
                             "probabilities (multi-scale TTA, one pass each), e.g. 384x576 448x672 512x768 for a "
                             "model trained at 384x576")
    parser.add_argument("--postprocess", action="store_true",
                        help="binary models: keep only each mask's largest region and fill its holes (one car a "
                             "photo; evaluate.py's 'one region' rows measure it)")
    parser.add_argument("--submission", type=Path, metavar="FILE",
                        help="also write a Kaggle submission (img,rle_mask) here, gzip'ed for .gz (binary models)")
    parser.add_argument("--overwrite", action="store_true",
                        help="predict every image again (default: skip those whose outputs OUTPUT already holds)")
    parser.add_argument("--batch-size", type=int, default=8, metavar="N", help="images a pass (default: %(default)s)")
    parser.add_argument("--device", default="auto", metavar="NAME",
                        help="auto (default: cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    parser.add_argument("--workers", type=int, default=min(4, utils.usable_cpus()), metavar="N",
                        help="processes decoding images, 0: the main process (default: min(4, CPUs))")
    args = parser.parse_args(argv)
    if not 0 <= args.threshold <= 1:
        parser.error(f"--threshold must be between 0 and 1, got {args.threshold}")
    if args.batch_size < 1 or args.workers < 0:
        parser.error("--batch-size must be at least 1 and --workers 0 or more")
    return args


def run(args: argparse.Namespace) -> None:
    """Predict every input image and write masks, overlays and the submission."""
    paths = find_images(args.input)
    check_output_names(paths)
    # An ONNX file runs with ONNX Runtime on the CPU, whatever --device says.
    device = torch.device("cpu") if utils.is_onnx_file(args.checkpoint) else utils.select_device(args.device)
    model, training_size = load_segmentation_model(args.checkpoint, device)
    sizes = args.size or [training_size]
    utils.check_input_sizes(sizes, model.config)
    classes = model.config["out_channels"]
    if classes > 1 and args.submission is not None:
        raise UserError(f"{args.checkpoint}: --submission writes Kaggle's binary run-length encoding, but this "
                         f"model segments {classes} classes; leave out --submission (the class masks are PNGs)")
    if classes > 1 and args.postprocess:
        raise UserError(f"{args.checkpoint}: --postprocess keeps one region of a binary mask, but this model segments "
                        f"{classes} classes; leave out --postprocess")
    try:
        args.output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"{args.output}: cannot create the output folder ({e.strerror or e})") from None
    kind = ("" if model.config["in_channels"] == 3 else ", grayscale") + (f", {classes} classes" if classes > 1 else "")
    # Outputs are written atomically, so an earlier run's are complete: their images are skipped unless --overwrite.
    names = ("_mask.png", "_overlay.jpg")[:1 + args.overlay]
    done = {p for p in paths if not args.overwrite and all((args.output / (p.stem + n)).is_file() for n in names)}
    skipped = f"; {len(done)} already done, skipped (--overwrite predicts them again)" if done else ""
    device = next(model.parameters()).device  # an ONNX model runs on the CPU whatever --device says
    print(f"{len(paths)} image(s) -> {args.output}: model input {utils.describe_sizes(sizes)}{kind} on {device}"
          f"{', TTA' if args.tta else ''}{', one region a mask' if args.postprocess else ''}{skipped}")
    predictions = predict_paths(model, [p for p in paths if p not in done], sizes, batch_size=args.batch_size,
                                workers=args.workers, threshold=args.threshold, tta=args.tta, amp=args.amp,
                                postprocess=args.postprocess)
    failures = []
    with open_submission(args.submission) as submission:
        for path in tqdm(paths, unit="img", desc="predict"):
            mask, problem = None, ""
            if path not in done:
                predicted, mask, problem = next(predictions)  # predict_paths keeps the order of its paths
                assert predicted == path, (predicted, path)
                if mask is not None:
                    save_outputs(path, mask, args.output, overlay=args.overlay, classes=classes)
            elif submission is not None:  # its row comes from the mask written before
                try:
                    mask = load_mask(args.output / f"{path.stem}_mask.png")
                except Exception as e:  # not predict.py's mask after all
                    problem = f"{path}: cannot read back its mask ({e}); delete the mask to predict the image again"
            if problem:
                failures.append(problem)
            elif submission is not None:
                submission.writerow([path.name, rle_encode(mask)])
        if failures:  # raised inside the block, so that no submission is written without their rows
            print(*(f"error: {line}" for line in failures), sep="\n", file=sys.stderr)
            raise UserError(f"{len(failures)} of {len(paths)} image(s) failed (listed above)"
                            f"{f' and {args.submission} was not written' if args.submission else ''}: replace or "
                            f"remove them and run again, which predicts only what is missing")
    if args.submission is not None:
        print(f"submission: {args.submission} ({len(paths)} rows)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a user error, reported as one line)."""
    args = parse_args(argv)
    return utils.run_program(lambda: run(args), status=2)


# --- Kaggle's run-length encoding, for the submission -----------------------------------------
# Kaggle numbers pixels from 1, row by row (row-major over the (1280, 1918) array, as in
# train_masks.csv), and writes "start length" pairs separated by spaces; an empty mask is "".

def rle_encode(mask: np.ndarray) -> str:
    """Kaggle's run-length encoding of a 2-D mask (nonzero = foreground); "" for an empty mask."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"rle_encode expects a 2-D (height, width) mask, got shape {mask.shape}")
    # Pad with background on both ends so every run has a start and an end transition.
    pixels = np.zeros(mask.size + 2, dtype=bool)
    np.not_equal(mask.ravel(), 0, out=pixels[1:-1])
    # A transition pixels[i] != pixels[i + 1] sits at 0-based mask pixel i; + 1 makes it the 1-based
    # number of a run's first pixel (a start) or of the pixel just past its last (an end).
    runs = np.flatnonzero(pixels[1:] != pixels[:-1]) + 1
    runs[1::2] -= runs[::2]  # ends -> lengths
    return " ".join(map(str, runs.tolist()))


def rle_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """uint8 {0, 1} mask of shape (height, width) from Kaggle's run-length encoding; ValueError unless the
    runs are integer 'start length' pairs, sorted, disjoint and inside the mask, as Kaggle requires."""
    height, width = (int(v) for v in shape)
    n = height * width
    try:
        starts, lengths = np.array(rle.split(), dtype=np.int64).reshape(-1, 2).T
    except (ValueError, OverflowError):  # an odd count, or a value that is no 64-bit integer
        raise ValueError(f"RLE must be 'start length' pairs of 64-bit integers, got {rle[:60]!r}") from None
    # In this order, each test keeps the next one's arithmetic within int64.
    if height <= 0 or width <= 0 or (starts < 1).any() or (lengths < 1).any() or (lengths > n - starts + 1).any() \
            or (starts[1:] < starts[:-1] + lengths[:-1]).any():
        raise ValueError(f"RLE runs must be sorted, disjoint and inside the {height}x{width} mask (pixels 1 to {n}), "
                         f"got {rle[:60]!r}")
    # +1 at each run's first pixel, -1 one past its last (0-based); the running sum is the mask.
    delta = np.zeros(n + 1, dtype=np.int8)
    np.add.at(delta, starts - 1, 1)
    np.add.at(delta, starts - 1 + lengths, -1)
    return np.cumsum(delta[:-1], dtype=np.int8).view(np.uint8).reshape(height, width)


if __name__ == "__main__":
    sys.exit(main())
