"""Predict masks with a trained U-Net: full-resolution PNG masks, overlays and a Kaggle submission.

    python predict.py --checkpoint runs/NAME/best.pt --input data/carvana/test --output predictions
    python predict.py --checkpoint runs/NAME/best.pt --input a.jpg photos/ --output out \\
        --overlay --tta --submission out/submission.csv.gz

Each image is decoded at the checkpoint's training size (in grey for a model trained with
--in-channels 1) and run through the model; the probabilities are upsampled bilinearly to the image's
own resolution, then thresholded (binary models) or turned into the most likely class (multi-class).
For image X.jpg it writes OUTPUT/X_mask.png (binary: 0 background, 255 car; multi-class: a palette PNG
whose pixel values are the class indices) and, with --overlay, OUTPUT/X_overlay.jpg.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import gzip
import io
import os
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
from dataset import is_hidden, load_image, usable_cpus

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff")


class InputError(Exception):
    """A user error reported as one line with exit status 2 (a missing input, a folder without images...)."""


# ---------------------------------------------------------------------------------------------
# Inputs and outputs
# ---------------------------------------------------------------------------------------------

def find_images(inputs: Sequence[str | Path]) -> list[Path]:
    """The images named by inputs, in order: files as given, folders' images sorted by name; no repeats."""
    images: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            found = sorted(p for p in item.iterdir()
                           if p.suffix.lower() in IMAGE_EXTENSIONS and not is_hidden(p) and p.is_file())
            if not found:
                raise InputError(f"{item}: no images ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
            images += found
        elif item.is_file():
            if item.suffix.lower() not in IMAGE_EXTENSIONS:
                raise InputError(f"{item}: not an image file (expected {', '.join(IMAGE_EXTENSIONS)})")
            images.append(item)
        else:
            raise InputError(f"{item}: no such file or folder")
    # A file named both directly and through its folder is predicted once.
    unique, seen = [], set()
    for path in images:
        if (key := path.resolve()) not in seen:
            seen.add(key)
            unique.append(path)
    return unique


def check_output_names(paths: Sequence[Path]) -> None:
    """Refuse two images that would write the same X_mask.png (a/X.jpg and b/X.png, say)."""
    seen: dict[str, Path] = {}
    for path in paths:
        if path.stem in seen:
            raise InputError(f"{seen[path.stem]} and {path} would both write {path.stem}_mask.png: "
                             f"predict them into separate --output folders")
        seen[path.stem] = path


def save_outputs(path: Path, mask: np.ndarray, output: Path, overlay: bool = False, classes: int = 1) -> None:
    """Write OUTPUT/X_mask.png and, with overlay, OUTPUT/X_overlay.jpg for image X.

    mask is a boolean mask (classes=1, saved 0/255) or a map of class indices (saved as a palette PNG).
    """
    utils.save_labels_png(mask, output / f"{path.stem}_mask.png", classes)
    if overlay:
        photo = torch.tensor(load_image(path)).permute(2, 0, 1)  # full resolution (3, H, W), a writable copy
        tinted = utils.overlay_labels(photo, torch.from_numpy(mask), classes)
        Image.fromarray(tinted.permute(1, 2, 0).numpy()).save(output / f"{path.stem}_overlay.jpg", quality=90)


@contextlib.contextmanager
def open_submission(path: Path | None) -> Iterator[Any]:
    """A csv writer for Kaggle's `img,rle_mask` file (gzip for .gz), renamed into place only on success."""
    if path is None:
        yield None
        return
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        try:
            raw = open(tmp, "wb")
        except OSError as e:
            raise InputError(f"{path}: cannot write the submission ({e.strerror or e})") from None
        with raw:
            gzipped = path.name.lower().endswith(".gz")
            # filename= names the csv inside the gzip header (else it would be the temporary name).
            stream = gzip.GzipFile(filename=path.name, mode="wb", fileobj=raw, compresslevel=6) if gzipped else raw
            text = io.TextIOWrapper(stream, encoding="utf-8", newline="")
            try:
                writer = csv.writer(text, lineterminator="\n")
                writer.writerow(["img", "rle_mask"])
                yield writer
            finally:
                text.detach()  # flushes, and leaves closing the streams to us, innermost first
                if gzipped:
                    stream.close()  # writes the gzip trailer; raw stays open
            raw.flush()
            os.fsync(raw.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


# ---------------------------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------------------------

def load_segmentation_model(checkpoint: Path, device: torch.device) -> tuple[nn.Module, tuple[int, int]]:
    """(model in eval mode, channels_last, on device; its training size (height, width)) from a checkpoint.

    Its model_config says what it reads and writes: in_channels (3 RGB, 1 grey) and out_channels
    (1 for binary, N classes otherwise).
    """
    model, state = utils.load_model(checkpoint, device)
    config = state.get("config") or {}
    try:
        size = int(config["height"]), int(config["width"])
    except (KeyError, TypeError, ValueError):
        raise utils.CheckpointError(f"{checkpoint}: has no training size (config height and width, "
                                    f"as train.py writes)") from None
    return model.to(memory_format=torch.channels_last), size


def to_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Float32 probabilities of (N, C, h, w) logits: sigmoid for one channel (binary), softmax over C classes."""
    logits = logits.float()
    return logits.sigmoid() if logits.shape[1] == 1 else logits.softmax(dim=1)


def to_labels(probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """(N, h, w) decisions from (N, C, h, w) probabilities: bool above threshold (binary), else the likeliest class (uint8)."""
    return probs[:, 0] > threshold if probs.shape[1] == 1 else probs.argmax(dim=1).to(torch.uint8)


@torch.inference_mode()
def predict_probabilities(model: nn.Module, images: torch.Tensor, tta: bool = False) -> torch.Tensor:
    """Float32 probabilities (N, C, h, w) for float images (N, in_channels, h, w) in [0, 1]; model in eval mode.

    C is 1 (car probability) for a binary model, the number of classes otherwise.
    """
    if not tta:
        return to_probabilities(model(images))
    # Horizontal-flip TTA in one forward pass over both views (BatchNorm is in eval mode, so mixing
    # them in a batch changes nothing); the mirrored view's prediction is flipped back before averaging.
    plain, mirrored = to_probabilities(model(torch.cat([images, images.flip(-1)]))).chunk(2)
    return (plain + mirrored.flip(-1)) / 2


def upsample_to(probs: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(N, C, h, w) probabilities or logits resized bilinearly (align_corners=False) to size=(H, W)."""
    if tuple(probs.shape[-2:]) == tuple(size):
        return probs
    return F.interpolate(probs, size=tuple(size), mode="bilinear", align_corners=False)


class ImageFiles(Dataset):
    """Images decoded straight to the model's input size and channels, each with its original (height, width)."""

    def __init__(self, paths: Sequence[Path], size: tuple[int, int], channels: int = 3):
        self.paths = list(paths)
        self.size = size
        self.channels = channels

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, int, str]:
        """(uint8 (h, w, channels) image, original (H, W), index, error message or "")."""
        path = self.paths[index]
        try:
            with Image.open(path) as img:
                width, height = img.size  # reads the header only
            image = torch.tensor(load_image(path, self.size, self.channels))  # a copy: PIL's array is read-only
            return image, torch.tensor([height, width]), index, ""
        except (OSError, ValueError, Image.DecompressionBombError) as e:
            # Returned, not raised: a worker's exception would reach the user wrapped in its traceback.
            blank = torch.zeros(*self.size, self.channels, dtype=torch.uint8)
            return blank, torch.tensor([0, 0]), index, f"{path}: cannot read the image ({e})"


def predict_paths(model: nn.Module, paths: Sequence[Path], size: tuple[int, int], *, batch_size: int = 8,
                  workers: int = 0, threshold: float = 0.5,
                  tta: bool = False) -> Iterator[tuple[Path, np.ndarray]]:
    """(path, mask at the image's own resolution) for each path, in order, on the model's device.

    The mask is boolean for a binary model, uint8 class indices for a multi-class one.
    """
    device = next(model.parameters()).device
    dtype = utils.autocast_dtype(device)
    loader = DataLoader(ImageFiles(paths, size, model.config["in_channels"]), batch_size=batch_size,
                        num_workers=workers, pin_memory=device.type == "cuda")
    for images, sizes, indices, errors in loader:
        if bad := [e for e in errors if e]:
            raise InputError(bad[0])
        # (N, h, w, 3) uint8 permuted to (N, 3, h, w) is already channels_last in memory.
        x = images.to(device, non_blocking=True).permute(0, 3, 1, 2).float().div_(255)
        with utils.autocast(device, dtype):
            probs = predict_probabilities(model, x, tta)
        for prob, (height, width), index in zip(probs, sizes.tolist(), indices.tolist()):
            # Upsample the probabilities, not the decided mask, so edges are smooth at full size.
            mask = to_labels(upsample_to(prob[None], (height, width)), threshold)[0]
            yield paths[index], mask.cpu().numpy()


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _non_negative_int(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def _probability(text: str) -> float:
    value = float(text)
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1, got {value}")
    return value



def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """predict.py's command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=utils.HelpFormatter)
    required = {"required": True, "default": argparse.SUPPRESS}  # no "(default: None)" in the help
    parser.add_argument("--checkpoint", type=Path, metavar="FILE", **required,
                        help="checkpoint written by train.py (e.g. runs/NAME/best.pt), or a run folder "
                             "(its last.pt); it gives the architecture and the input size")
    parser.add_argument("--input", type=Path, nargs="+", metavar="PATH", **required,
                        help=f"images and/or folders of images ({', '.join(IMAGE_EXTENSIONS)}; "
                             f"hidden files skipped, taken in name order)")
    parser.add_argument("--output", type=Path, metavar="DIR", **required,
                        help="folder for X_mask.png (and X_overlay.jpg) per image X; created if needed")
    parser.add_argument("--threshold", type=_probability, default=0.5, metavar="P",
                        help="binary models: a pixel is car when its probability is above this "
                             "(multi-class models take the likeliest class)")
    parser.add_argument("--overlay", action="store_true",
                        help="also write X_overlay.jpg: the mask tinted over the full-resolution photo "
                             "(one colour per foreground class for multi-class models)")
    parser.add_argument("--tta", action="store_true",
                        help="average the probabilities of each image and its horizontal mirror (2x the compute)")
    parser.add_argument("--submission", type=Path, metavar="FILE",
                        help="also write a Kaggle submission (img,rle_mask) here; gzip-compressed if it ends "
                             "in .gz (binary models only)")
    parser.add_argument("--batch-size", type=_positive_int, default=8, metavar="N",
                        help="images per forward pass")
    parser.add_argument("--device", default="auto", metavar="NAME",
                        help="auto (cuda, then mps, then cpu), cpu, cuda, cuda:N or mps")
    parser.add_argument("--workers", type=_non_negative_int, default=min(4, usable_cpus()), metavar="N",
                        help="DataLoader processes decoding images; min(4, usable CPUs) by default, 0 decodes "
                             "in the main process")
    return parser.parse_args(argv)


def run(args: argparse.Namespace) -> None:
    """Predict every input image and write masks, overlays and the submission."""
    paths = find_images(args.input)
    check_output_names(paths)
    try:
        device = utils.select_device(args.device)
    except ValueError as e:
        raise InputError(str(e)) from None
    model, size = load_segmentation_model(args.checkpoint, device)
    classes = model.config["out_channels"]
    if classes > 1 and args.submission is not None:
        raise InputError(f"{args.checkpoint}: --submission writes Kaggle's binary run-length encoding, but this "
                         f"model segments {classes} classes; leave out --submission (the class masks are PNGs)")
    try:
        args.output.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise InputError(f"{args.output}: cannot create the output folder ({e.strerror or e})") from None
    kind = ("" if model.config["in_channels"] == 3 else ", grayscale") + ("" if classes == 1 else f", {classes} classes")
    print(f"{len(paths)} image(s) -> {args.output}: model input {size[0]}x{size[1]}{kind} on {device}"
          f"{', TTA' if args.tta else ''}")
    predictions = predict_paths(model, paths, size, batch_size=args.batch_size, workers=args.workers,
                                threshold=args.threshold, tta=args.tta)
    with open_submission(args.submission) as submission:
        for path, mask in tqdm(predictions, total=len(paths), unit="img", desc="predict"):
            save_outputs(path, mask, args.output, overlay=args.overlay, classes=classes)
            if submission is not None:
                submission.writerow([path.name, utils.rle_encode(mask)])
    if args.submission is not None:
        print(f"submission: {args.submission} ({len(paths)} rows)")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; returns the exit status (2 for a user error, reported as one line)."""
    args = parse_args(argv)
    try:
        run(args)
    except (InputError, utils.CheckpointError) as e:
        print(f"predict.py: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
