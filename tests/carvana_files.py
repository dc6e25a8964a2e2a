"""Tiny Carvana-layout datasets written with PIL, for tests that must not depend on the generator."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

import dataset as ds


def write_tiny_carvana(root: Path, cars: int = 3, size: tuple[int, int] = (48, 32),
                       odd_val_car_seed: int | None = None) -> Path:
    """Kaggle's layout with random photos and blob masks, 16 views a car.

    With odd_val_car_seed, the car that `--val-cars 1 --seed SEED` holds out keeps only 15 views, so
    the validation set has an odd number of images.
    """
    rng = np.random.default_rng(0)
    (root / ds.IMAGE_DIR).mkdir(parents=True)
    (root / ds.MASK_DIR).mkdir()
    width, height = size
    yy, xx = np.mgrid[:height, :width]
    for car in range(cars):
        for view in range(1, 17):
            name = f"{car:012x}_{view:02d}"
            cx, cy = rng.uniform(0.3, 0.7) * width, rng.uniform(0.3, 0.7) * height
            mask = (((xx - cx) / (0.3 * width)) ** 2 + ((yy - cy) / (0.3 * height)) ** 2 < 1).astype(np.uint8)
            photo = rng.integers(0, 120, (height, width, 3), dtype=np.uint8) + mask[..., None] * 120
            Image.fromarray(photo).save(root / ds.IMAGE_DIR / f"{name}.jpg", quality=95)
            gif = Image.fromarray(mask, mode="P")
            gif.putpalette([0, 0, 0, 255, 255, 255])
            gif.save(root / ds.MASK_DIR / f"{name}{ds.MASK_SUFFIX}")
    if odd_val_car_seed is not None:
        _, (val_car,) = ds.split_by_car(ds.find_pairs(root), 1, odd_val_car_seed)  # as train.py splits
        (root / ds.IMAGE_DIR / f"{val_car}_16.jpg").unlink()
        (root / ds.MASK_DIR / f"{val_car}_16{ds.MASK_SUFFIX}").unlink()
    return root
