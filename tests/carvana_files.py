"""Tiny Carvana-layout datasets written with PIL, for tests that must not depend on the generator."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image

import dataset as ds


def write_tiny_carvana(root: Path, cars: int = 3, size: tuple[int, int] = (48, 32), val_views: int = 16,
                       seed: int = 0) -> Path:
    """Kaggle's layout with random photos and blob masks, 16 views a car, except that the car which
    `train.py --val-cars 1 --seed SEED` holds out keeps only its first val_views views."""
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
    if val_views == 16:
        return root
    _, (val_car,) = ds.split_by_group(ds.find_pairs(root), 1, seed)  # as train.py splits
    for view in range(val_views + 1, 17):
        (root / ds.IMAGE_DIR / f"{val_car}_{view:02d}.jpg").unlink()
        (root / ds.MASK_DIR / f"{val_car}_{view:02d}{ds.MASK_SUFFIX}").unlink()
    return root


def write_blob_photos(folder: Path, sizes: dict[str, tuple[int, int]], seed: int = 0) -> Path:
    """Photos {name: (width, height)} of a bright blob on a noisy background, so that masks have some structure."""
    rng = np.random.default_rng(seed)
    for name, (width, height) in sizes.items():
        y, x = np.ogrid[:height, :width]
        blob = ((y - height / 2) / (height / 3)) ** 2 + ((x - width / 2) / (width / 3)) ** 2 <= 1
        pixels = rng.integers(0, 100, (height, width, 3)) + 150 * blob[..., None]
        Image.fromarray(pixels.astype(np.uint8)).save(folder / name)
    return folder
