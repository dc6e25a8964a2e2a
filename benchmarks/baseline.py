"""The plain baseline's decode: full-size PIL decode, then resize (no JPEG draft mode, no palette table).

    python benchmarks/baseline.py TRAIN_FLAGS...   # train.py, decoding this way (bench_epoch.py's baseline)

Everything else the baseline changes is a train.py flag (--amp off --no-channels-last --workers 0
--no-cache --no-fused-adamw --bn-images 0), so only the decode is swapped here, by replacing
dataset.load_image/load_mask_resized.
"""
from __future__ import annotations

import contextlib
import sys
from pathlib import Path
from typing import Iterator

import numpy as np
from PIL import Image

import common  # noqa: F401  (puts the repo on sys.path)
import dataset as ds

BASELINE_FLAGS = ["--amp", "off", "--no-channels-last", "--workers", "0", "--no-cache", "--no-fused-adamw",
                  "--bn-images", "0"]  # running averages, as a plain loop has: explicit, whatever train.py's default


def plain_load_image(path: str | Path, size: tuple[int, int] | None = None, channels: int = 3) -> np.ndarray:
    """Decode the whole JPEG, then resize: what `Image.open(path).convert('RGB')` code usually does."""
    with Image.open(path) as img:
        img = img.convert("RGB" if channels == 3 else "L")
    if size is not None and img.size != (size[1], size[0]):
        img = img.resize((size[1], size[0]), Image.BILINEAR)
    array = np.array(img)
    return array if channels == 3 else array[:, :, None]


def plain_load_mask_resized(path: str | Path, size: tuple[int, int], soft: bool = True) -> np.ndarray:
    """Convert every GIF pixel to grey, then resize the full-size mask (coverage 0..255, as the project's)."""
    with Image.open(path) as img:
        mask = np.where(np.asarray(img.convert("L")) > 0, 255, 0).astype(np.uint8)
    coverage = np.array(Image.fromarray(mask).resize((size[1], size[0]), Image.BILINEAR))
    return coverage if soft else np.where(coverage >= 128, 255, 0).astype(np.uint8)


@contextlib.contextmanager
def plain_decode() -> Iterator[None]:
    """Within the block, CarvanaDataset (in this process and workers forked from it) decodes plainly."""
    saved = ds.load_image, ds.load_mask_resized
    ds.load_image, ds.load_mask_resized = plain_load_image, plain_load_mask_resized
    try:
        yield
    finally:
        ds.load_image, ds.load_mask_resized = saved


if __name__ == "__main__":
    import train
    with plain_decode():
        sys.exit(train.main(sys.argv[1:]))
