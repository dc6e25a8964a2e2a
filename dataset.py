"""Carvana data: pairing photos with masks, the car-wise split, augmentations, the Dataset,
a synthetic Carvana-format generator, the dataset check and the Kaggle download.

Kaggle's layout, once `train.zip` and `train_masks.zip` are extracted into DIR:
    DIR/train/{car_id}_{view:02d}.jpg          1918x1280 RGB photos, 16 views per car
    DIR/train_masks/{car_id}_{view:02d}_mask.gif  palette GIFs holding 0 (background) and 1 (car)

Command line:
    python dataset.py synthetic --out data/synthetic      # generate the synthetic default
    python dataset.py download --out data/carvana         # fetch Carvana from Kaggle
"""
from __future__ import annotations

import argparse
import random
import sys
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

IMAGE_DIR = "train"
MASK_DIR = "train_masks"
MASK_SUFFIX = "_mask.gif"
IMAGE_EXTENSIONS = (".jpg", ".jpeg")


# ---------------------------------------------------------------------------------------------
# Carvana files, pairing and the car-wise split
# ---------------------------------------------------------------------------------------------

def is_hidden(path: Path) -> bool:
    """True for files the OS leaves behind (.DS_Store, macOS '._X.jpg' forks)."""
    return path.name.startswith(".")


def car_id(image_path: str | Path) -> str:
    """The car a Carvana photo shows: '0cdf5b5d0ce1_07.jpg' -> '0cdf5b5d0ce1'."""
    return Path(image_path).stem.rsplit("_", 1)[0]


def mask_path_for(image_path: Path, data_dir: Path) -> Path:
    """Where Kaggle puts the mask of a photo: train/X.jpg -> train_masks/X_mask.gif."""
    return data_dir / MASK_DIR / f"{image_path.stem}{MASK_SUFFIX}"


def list_images(data_dir: str | Path) -> list[Path]:
    """The photos in DIR/train, sorted by name, hidden files ignored."""
    image_dir = Path(data_dir) / IMAGE_DIR
    if not image_dir.is_dir():
        return []
    return sorted(p for p in image_dir.iterdir()
                  if p.suffix.lower() in IMAGE_EXTENSIONS and not is_hidden(p))


def find_pairs(data_dir: str | Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs matched by name, never by position; a photo without its mask is an error."""
    data_dir = Path(data_dir)
    pairs, missing = [], []
    for image in list_images(data_dir):
        mask = mask_path_for(image, data_dir)
        (pairs if mask.is_file() else missing).append((image, mask))
    if missing:
        names = ", ".join(str(m) for _, m in missing[:5])
        raise FileNotFoundError(
            f"{len(missing)} photo(s) in {data_dir / IMAGE_DIR} have no mask, e.g. {names}. "
            f"Each X.jpg needs {MASK_DIR}/X{MASK_SUFFIX}: re-extract train_masks.zip or remove the photos.")
    return pairs


def split_by_car(pairs: Sequence[tuple[Path, Path]], val_cars: float, seed: int) -> tuple[list[str], list[str]]:
    """Split car ids into (train, val) so that all views of a car fall on one side.

    val_cars >= 1 is a number of cars, 0 < val_cars < 1 a fraction of them; at least one car is held
    out and at least one kept for training. Deterministic for a given seed and set of cars.
    """
    cars = sorted({car_id(image) for image, _ in pairs})
    if len(cars) < 2:
        raise ValueError(f"need at least 2 cars to split into train and validation, found {len(cars)}")
    n_val = round(val_cars * len(cars)) if 0 < val_cars < 1 else int(val_cars)
    n_val = min(max(n_val, 1), len(cars) - 1)
    shuffled = cars[:]
    random.Random(seed).shuffle(shuffled)
    return sorted(shuffled[n_val:]), sorted(shuffled[:n_val])


def pairs_of_cars(pairs: Sequence[tuple[Path, Path]], cars: Sequence[str]) -> list[tuple[Path, Path]]:
    """The pairs whose car is in `cars`, in their original order."""
    keep = set(cars)
    return [pair for pair in pairs if car_id(pair[0]) in keep]


# ---------------------------------------------------------------------------------------------
# Loading and augmentations
# ---------------------------------------------------------------------------------------------

def load_image(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """An RGB photo as uint8 (H, W, 3); with size=(height, width), resized to it.

    JPEGs are decoded at a reduced scale when the target is small (PIL's draft mode lets libjpeg skip
    most of the work: about 8x faster for Carvana photos at 160x240).
    """
    with Image.open(path) as img:
        if size is not None:
            img.draft("RGB", (size[1], size[0]))  # keeps at least the requested size
        img = img.convert("RGB")
        if size is not None and img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.BILINEAR)
        return np.array(img)  # a writable copy: torch warns on read-only arrays


def load_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """A binary mask as uint8 {0, 1} (H, W); with size=(height, width), resized to it (area-weighted)."""
    with Image.open(path) as img:
        foreground = _foreground(img)
    if size is not None and foreground.size != (size[1], size[0]):
        # Resize coverage 0..255 with antialiasing, then threshold at half coverage. reducing_gap
        # box-averages by an integer factor first: about 2x cheaper at 1918x1280 -> 240x160.
        coverage = foreground.convert("L").resize((size[1], size[0]), Image.BILINEAR, reducing_gap=2.0)
        return (np.asarray(coverage) >= 128).astype(np.uint8)
    return np.asarray(foreground).astype(np.uint8)


def _foreground(img: Image.Image) -> Image.Image:
    """A mode-"1" image of the non-black pixels.

    A palette image (Kaggle's GIFs) is mapped through its palette with a 256-entry table instead of
    converting every pixel to grey: half the cost of decoding a Carvana mask at 160x240.
    """
    if img.mode not in ("P", "L"):
        img = img.convert("L")
    levels: Sequence[int] = range(256)
    if img.mode == "P":
        swatch = Image.frombytes("P", (256, 1), bytes(range(256)))  # every palette index once
        swatch.putpalette(img.getpalette() or [])
        levels = swatch.convert("L").tobytes()  # the grey level convert("L") would give each index
    return img.point([255 if level > 0 else 0 for level in levels], "1")


def train_transforms(height: int, width: int):
    """Training augmentations: resize, horizontal flip, small shift/scale/rotate, colour jitter."""
    import albumentations as A
    return A.Compose([
        A.Resize(height, width),
        A.HorizontalFlip(p=0.5),
        A.Affine(translate_percent=(-0.05, 0.05), scale=(0.9, 1.1), rotate=(-5, 5),
                 border_mode=0, fill=0, fill_mask=0, p=0.5),
        A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5),
    ])


def val_transforms(height: int, width: int):
    """Validation: resize only, no augmentation."""
    import albumentations as A
    return A.Compose([A.Resize(height, width)])


def to_tensors(image: np.ndarray, mask: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (H, W, 3) image and {0,1} (H, W) mask -> float (3, H, W) in [0, 1] and float (1, H, W)."""
    image_t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)
    mask_t = torch.from_numpy(np.ascontiguousarray(mask)).unsqueeze(0).float()
    return image_t, mask_t


# ---------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------

class CarvanaDataset(Dataset):
    """Photo/mask pairs, decoded straight to the training size, then augmented together."""

    def __init__(self, pairs: Sequence[tuple[Path, Path]], height: int, width: int, transform=None,
                 cache: bool = False):
        self.pairs = list(pairs)
        self.size = (height, width)
        self.transform = transform
        # Decoded pairs at the training size, in memory shared by the DataLoader workers: after the
        # first epoch no worker decodes again (about 10x less work than decoding a full-size JPEG
        # and GIF), whichever worker an index lands on, and the memory is held once, not per worker.
        self.cache = SharedPairCache(len(self.pairs), height, width) if cache else None

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
        """item is an index, or (index, seed) to make its augmentation reproducible."""
        index, seed = item if isinstance(item, tuple) else (item, None)
        image, mask = self.load(index)
        if self.transform is not None:
            if seed is not None:
                self.transform.set_random_seed(seed)
            out = self.transform(image=image, mask=mask)
            image, mask = out["image"], out["mask"]
        return to_tensors(image, mask)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The un-augmented (image, mask) pair at the training size, from the cache when it is there."""
        cached = self.cache.get(index) if self.cache is not None else None
        if cached is not None:
            return cached
        image_path, mask_path = self.pairs[index]
        pair = load_image(image_path, self.size), load_mask(mask_path, self.size)
        if self.cache is not None:
            self.cache.put(index, *pair)
        return pair


class SharedPairCache:
    """n (image, mask) pairs of one size in shared memory, allocated up front (4 bytes a pixel).

    Workers forked or spawned by a DataLoader map the same memory, so what one decodes all see.
    """

    def __init__(self, n: int, height: int, width: int):
        self.images = torch.empty((n, height, width, 3), dtype=torch.uint8).share_memory_()
        self.masks = torch.empty((n, height, width), dtype=torch.uint8).share_memory_()
        self.filled = torch.zeros(n, dtype=torch.bool).share_memory_()

    def get(self, index: int) -> tuple[np.ndarray, np.ndarray] | None:
        """Copies of the stored pair (augmentations never write into the cache), or None."""
        if not self.filled[index]:
            return None
        return self.images[index].numpy().copy(), self.masks[index].numpy().copy()

    def put(self, index: int, image: np.ndarray, mask: np.ndarray) -> None:
        self.images[index] = torch.from_numpy(image)
        self.masks[index] = torch.from_numpy(mask)
        self.filled[index] = True  # last: a reader never sees a half-written pair


# ---------------------------------------------------------------------------------------------
# Synthetic Carvana-format generator
# ---------------------------------------------------------------------------------------------

def generate_synthetic(out_dir: str | Path, cars: int = 24, size: tuple[int, int] = (480, 320),
                       seed: int = 0) -> Path:
    """Write a synthetic dataset in Kaggle's layout; size is (width, height). Returns out_dir."""
    raise NotImplementedError  # SYNTHETIC: filled in by the synthetic-generator work


def add_synthetic_args(parser: argparse.ArgumentParser) -> None:
    """Flags of `python dataset.py synthetic`."""
    parser.add_argument("--out", default="data/synthetic", help="folder to write (default: %(default)s)")
    parser.add_argument("--cars", type=int, default=24, help="number of cars, 16 views each (default: %(default)s)")
    parser.add_argument("--size", default="480x320", help="image size WxH (default: %(default)s; Kaggle's is 1918x1280)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")


def synthetic_main(args: argparse.Namespace) -> int:
    """Entry point of `python dataset.py synthetic`."""
    width, height = parse_size(args.size)
    generate_synthetic(args.out, cars=args.cars, size=(width, height), seed=args.seed)
    return 0


def parse_size(text: str) -> tuple[int, int]:
    """'480x320' -> (480, 320)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 480x320 (width x height), got {text!r}")
    return width, height


# ---------------------------------------------------------------------------------------------
# Kaggle download
# ---------------------------------------------------------------------------------------------

def add_download_args(parser: argparse.ArgumentParser) -> None:
    """Flags of `python dataset.py download`."""
    parser.add_argument("--out", default="data/carvana", help="folder to extract into (default: %(default)s)")
    parser.add_argument("--hq", action="store_true", help="download train_hq.zip instead of train.zip")
    parser.add_argument("--with-test", action="store_true", help="also download test.zip (8 GB)")


def download_main(args: argparse.Namespace) -> int:
    """Entry point of `python dataset.py download`."""
    raise NotImplementedError  # DOWNLOAD: filled in by the Kaggle-download work


# ---------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------

def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    add_synthetic_args(commands.add_parser(
        "synthetic", help="write a synthetic Carvana-format dataset",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter))
    add_download_args(commands.add_parser("download", help="download Carvana from Kaggle"))
    args = parser.parse_args(argv)
    return {"synthetic": synthetic_main, "download": download_main}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
