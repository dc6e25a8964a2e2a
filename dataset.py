"""Segmentation data: the two folder layouts, pairing images with masks, the split by car, decoding,
the albumentations transforms, the Dataset with its shared cache, and the sampler that serves it.

Kaggle's layout, once `train.zip` and `train_masks.zip` are extracted into DIR:
    DIR/train/{car_id}_{view:02d}.jpg          1280x1918 RGB photos, 16 views per car
    DIR/train_masks/{car_id}_{view:02d}_mask.gif  palette GIFs holding 0 (background) and 1 (car)

The generic layout, for any other dataset:
    DIR/images/X.jpg (or .jpeg, .png, .tif, .tiff, .bmp)
    DIR/masks/X.png (or .gif, .tif, .tiff, .bmp): binary 0/1 or 0/255, or class indices with --classes
"""
from __future__ import annotations

import multiprocessing
import os
import random
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Sequence

import numpy as np
import torch
from PIL import ExifTags, Image
from PIL.Image import Transpose
from torch.utils.data import Dataset, Sampler

from utils import UserError, plural, usable_cpus

IMAGE_DIR = "train"
MASK_DIR = "train_masks"
MASK_SUFFIX = "_mask.gif"
IMAGE_EXTENSIONS = (".jpg", ".jpeg")
CARVANA_NAME = re.compile(r"[0-9a-f]{12}_\d{2}")  # '0cdf5b5d0ce1_07': a car id and a view
# EXIF orientation -> the turn that shows a photo upright, as viewers (and ImageOps.exif_transpose) do
UPRIGHT = {2: Transpose.FLIP_LEFT_RIGHT, 3: Transpose.ROTATE_180, 4: Transpose.FLIP_TOP_BOTTOM, 5: Transpose.TRANSPOSE,
           6: Transpose.ROTATE_270, 7: Transpose.TRANSVERSE, 8: Transpose.ROTATE_90}
SIDEWAYS = {UPRIGHT[orientation] for orientation in (5, 6, 7, 8)}  # the turns that swap width and height


# --- folder layouts, pairing and the split ----------------------------------------------------

@dataclass(frozen=True)
class Layout:
    """Where a dataset keeps its images and masks, and how a mask's file name pairs it with its image."""

    name: str                          # for messages: "Kaggle's", "the generic"
    image_dir: str
    mask_dir: str
    image_extensions: tuple[str, ...]  # lower case
    mask_suffixes: tuple[str, ...]     # what follows the image's stem in its mask's name, lower case
    pattern: str                       # the layout in one line, for messages
    image_fix: str
    mask_fix: str

    def mask_stem(self, mask: Path) -> str | None:
        """The stem of the image a mask belongs to ('X_mask.gif' -> 'X'), or None for other files."""
        for suffix in self.mask_suffixes:
            if mask.name.lower().endswith(suffix):
                return mask.name[:-len(suffix)]
        return None

    def expected_mask(self, image: Path, data_dir: Path) -> str:
        """Where the mask of an image should be: 'DIR/train_masks/X_mask.gif', 'DIR/masks/X.png (or ...)'."""
        return _one_of(data_dir / self.mask_dir, image.stem, self.mask_suffixes)

    def expected_image(self, mask: Path, data_dir: Path) -> str:
        """Where the image of a mask should be."""
        return _one_of(data_dir / self.image_dir, self.mask_stem(mask) or mask.stem, self.image_extensions)


def _one_of(folder: Path, stem: str, endings: Sequence[str]) -> str:
    """'folder/X.png' or 'folder/X.png (or .gif, .bmp)'."""
    others = f" (or {', '.join(endings[1:])})" if len(endings) > 1 else ""
    return f"{folder / (stem + endings[0])}{others}"


KAGGLE = Layout("Kaggle's", IMAGE_DIR, MASK_DIR, IMAGE_EXTENSIONS, (MASK_SUFFIX,),
                f"DIR/{IMAGE_DIR}/*.jpg and DIR/{MASK_DIR}/*{MASK_SUFFIX}",
                f"replace it from Kaggle's {IMAGE_DIR}.zip or delete it",
                f"replace it from Kaggle's {MASK_DIR}.zip or delete it and its photo")
GENERIC = Layout("the generic", "images", "masks", (".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp"),
                 (".png", ".gif", ".tif", ".tiff", ".bmp"),
                 "DIR/images/* and DIR/masks/*, paired by file stem (images/X.jpg with masks/X.png)",
                 "replace it or delete it", "replace it or delete it and its image")
LAYOUTS = f"{KAGGLE.name} layout {KAGGLE.pattern}, or {GENERIC.name} layout {GENERIC.pattern}"


def detect_layout(data_dir: str | Path) -> Layout | None:
    """Kaggle's layout when DIR has train/ or train_masks/, else the generic one when it has images/ or masks/."""
    data_dir = Path(data_dir)
    for layout in (KAGGLE, GENERIC):
        if (data_dir / layout.image_dir).is_dir() or (data_dir / layout.mask_dir).is_dir():
            return layout
    return None


def dataset_above(data_dir: str | Path) -> str:
    """The hint '; it is the train/ folder of the dataset in D: pass D' when data_dir is a folder of a dataset's
    layout rather than the dataset (the common slip of --data-dir data/carvana/train), else ''."""
    data_dir = Path(data_dir)
    layout = detect_layout(data_dir.parent) if detect_layout(data_dir) is None else None
    if layout is None or data_dir.name not in (layout.image_dir, layout.mask_dir):
        return ""
    return f"; it is the {data_dir.name}/ folder of the dataset in {data_dir.parent}: pass {data_dir.parent}"


def is_hidden(path: Path) -> bool:
    """True for files the OS leaves behind (.DS_Store, macOS '._X.jpg' forks)."""
    return path.name.startswith(".")


def car_id(image_path: str | Path) -> str:
    """The car a Carvana photo shows: '0cdf5b5d0ce1_07.jpg' -> '0cdf5b5d0ce1'."""
    return Path(image_path).stem.rsplit("_", 1)[0]


def is_carvana_name(image_path: str | Path) -> bool:
    """True for Carvana's (and the synthetic generator's) names: a 12-hex-digit car id, '_', a 2-digit view."""
    return CARVANA_NAME.fullmatch(Path(image_path).stem) is not None


def group_of(image_path: str | Path) -> str:
    """What the split keeps together: the car for Carvana-named photos (all views on one side), else the image."""
    return car_id(image_path) if is_carvana_name(image_path) else Path(image_path).stem


def groups_of(pairs: Sequence[tuple[Path, Path]]) -> list[str]:
    """The sorted distinct groups (cars, or image stems) of some pairs."""
    return sorted({group_of(image) for image, _ in pairs})


def cars_on_both_sides(train_pairs: Sequence[tuple[Path, Path]], val_pairs: Sequence[tuple[Path, Path]]) -> list[str]:
    """The Carvana-named cars with photos in both sets: a validation folder must hold all of a car's views or none."""
    def cars(pairs: Sequence[tuple[Path, Path]]) -> set[str]:
        return {car_id(image) for image, _ in pairs if is_carvana_name(image)}
    return sorted(cars(train_pairs) & cars(val_pairs))


def describe_pairs(pairs: Sequence[tuple[Path, Path]]) -> str:
    """'64 images (4 cars)' for Carvana-named images, else '40 images'."""
    text = plural(len(pairs), "image")
    if pairs and all(is_carvana_name(image) for image, _ in pairs):
        text += f" ({plural(len({car_id(image) for image, _ in pairs}), 'car')})"
    return text


def mask_path_for(image_path: Path, data_dir: Path) -> Path:
    """Where Kaggle puts the mask of a photo: train/X.jpg -> train_masks/X_mask.gif."""
    return data_dir / MASK_DIR / f"{image_path.stem}{MASK_SUFFIX}"


def list_images(data_dir: str | Path, layout: Layout | None = None) -> list[Path]:
    """The images of DIR in its layout (detected when not given), sorted by name, hidden files ignored."""
    layout = layout or detect_layout(data_dir)
    return _files_in(data_dir, layout and layout.image_dir, lambda p: p.suffix.lower() in layout.image_extensions)


def list_masks(data_dir: str | Path, layout: Layout | None = None) -> list[Path]:
    """The masks of DIR in its layout (detected when not given), sorted by name, hidden files ignored."""
    layout = layout or detect_layout(data_dir)
    return _files_in(data_dir, layout and layout.mask_dir, lambda p: bool(layout.mask_stem(p)))


def _files_in(data_dir: str | Path, sub: str | None, wanted: Callable[[Path], bool]) -> list[Path]:
    """The visible files of data_dir/sub that wanted() accepts, sorted; none when there is no such folder."""
    folder = Path(data_dir) / sub if sub else None
    if folder is None or not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if wanted(p) and not is_hidden(p) and p.is_file())


def pair_up(images: Sequence[Path], masks: Sequence[Path],
            layout: Layout) -> tuple[dict[Path, Path | None], dict[Path, str]]:
    """({image: its mask or None}, {file: why it is left out}) matching names, never positions; of two images
    (or masks) with one stem, which cannot be told apart, the later is left out."""
    mask_by_stem: dict[str, Path] = {}
    duplicates: dict[Path, str] = {}
    for mask in masks:
        stem = layout.mask_stem(mask)
        if stem in mask_by_stem:
            duplicates[mask] = f"same name stem as {mask_by_stem[stem]}; keep one mask per image"
        else:
            mask_by_stem[stem] = mask
    mask_of: dict[Path, Path | None] = {}
    image_by_stem: dict[str, Path] = {}
    for image in images:
        if image.stem in image_by_stem:
            duplicates[image] = (f"same name stem as {image_by_stem[image.stem]}, so both would pair with "
                                 f"one mask; rename or delete one")
            continue
        image_by_stem[image.stem] = image
        mask_of[image] = mask_by_stem.get(image.stem)
    return mask_of, duplicates


def find_pairs(data_dir: str | Path) -> list[tuple[Path, Path]]:
    """(image, mask) pairs matched by name, never by position; an image without its mask is an error."""
    data_dir = Path(data_dir)
    layout = detect_layout(data_dir)
    if layout is None:
        return []
    mask_of, duplicates = pair_up(list_images(data_dir, layout), list_masks(data_dir, layout), layout)
    if duplicates:
        path, why = next(iter(duplicates.items()))
        raise ValueError(f"{path}: {why}")
    missing = [image for image, mask in mask_of.items() if mask is None]
    if missing:
        names = ", ".join(layout.expected_mask(image, data_dir) for image in missing[:5])
        raise FileNotFoundError(
            f"{len(missing)} image(s) in {data_dir / layout.image_dir} have no mask, e.g. {names}. "
            f"Each {layout.image_dir}/X{layout.image_extensions[0]} needs {layout.mask_dir}/X"
            f"{layout.mask_suffixes[0]}: {'re-extract train_masks.zip' if layout is KAGGLE else 'add the masks'} "
            f"or remove the images.")
    return list(mask_of.items())


def split_by_group(pairs: Sequence[tuple[Path, Path]], val_groups: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded (train, val) lists of groups (cars, or images), so that no group straddles the split.

    val_groups >= 1 is a number of groups, below 1 a fraction of them; at least one is held out and one kept.
    """
    groups = groups_of(pairs)
    if len(groups) < 2:
        raise UserError(f"need at least 2 cars or images to split into train and validation, found "
                        f"{len(groups)}; add images or pass --val-dir")
    n_val = round(val_groups * len(groups)) if 0 < val_groups < 1 else int(val_groups)
    n_val = min(max(n_val, 1), len(groups) - 1)
    shuffled = groups[:]
    random.Random(seed).shuffle(shuffled)
    return sorted(shuffled[n_val:]), sorted(shuffled[:n_val])


def pairs_of_groups(pairs: Sequence[tuple[Path, Path]], groups: Sequence[str]) -> list[tuple[Path, Path]]:
    """The pairs whose group is in `groups`, in their original order."""
    keep = set(groups)
    return [pair for pair in pairs if group_of(pair[0]) in keep]


# --- loading and augmentations ----------------------------------------------------------------

def load_image(path: str | Path, size: tuple[int, int] | None = None, channels: int = 3) -> np.ndarray:
    """A photo as uint8 (H, W, channels), RGB for 3 channels, grey for 1; with size=(height, width), resized to it.
    Turned upright as its EXIF orientation says, as viewers show it, since that is how its mask is drawn.

    JPEGs are decoded at a reduced scale when the target is small (PIL's draft mode: libjpeg skips most
    of the work), then resized from the photo's own extent in the reduced image (draft's box), so that
    the photo stays aligned with its mask; both in the stored orientation, before the photo is turned.
    """
    mode = "RGB" if channels == 3 else "L"
    with Image.open(path) as img:
        turn = upright(img)[1]
        stored = size and ((size[0], size[1]) if turn in SIDEWAYS else (size[1], size[0]))  # (width, height)
        drafted = stored and img.draft(mode, stored)  # keeps at least the requested size
        box = drafted[1] if drafted else None  # (0, 0, width, height) of the photo in the reduced image
        img = to_rgb(img, mode)
        if stored and (img.size != stored or box not in (None, (0, 0, *img.size))):
            img = img.resize(stored, Image.BILINEAR, box=box)
        array = np.array(img if turn is None else img.transpose(turn))  # a writable copy, as torch wants
        return array if channels == 3 else array[:, :, None]


def upright(img: Image.Image) -> tuple[tuple[int, int], Transpose | None]:
    """A just-opened photo's (width, height) as viewers show it and the turn that shows it so (or None), from the EXIF
    orientation in its header (PIL's PNG getexif would decode the pixels); PIL turns TIFFs itself, on open and load."""
    turn = None if img.format == "TIFF" else UPRIGHT.get(Image.Image.getexif(img).get(ExifTags.Base.Orientation))
    return (img.size[::-1] if turn in SIDEWAYS else img.size), turn


def to_rgb(img: Image.Image, mode: str = "RGB") -> Image.Image:
    """Any photo as 8-bit RGB (or grey, mode 'L'): 16-bit grey scaled to 8 bits, alpha dropped, CMYK via PIL."""
    if img.mode.startswith("I"):  # 16-bit PNGs open as 'I;16' or 'I' depending on PIL's version
        grey = np.clip(np.asarray(img), 0, 65535).astype(np.uint32)
        img = Image.fromarray(((grey + 128) // 257).astype(np.uint8))  # 65535 -> 255, rounded
    return img.convert(mode)


def load_mask(path: str | Path) -> np.ndarray:
    """A binary mask at its own size as uint8 {0, 1} (H, W): any non-zero grey level is car."""
    with Image.open(path) as img:
        return np.asarray(_foreground(img, "1"), dtype=np.uint8)


def load_mask_resized(path: str | Path, size: tuple[int, int], soft: bool = True) -> np.ndarray:
    """A binary mask resized to size=(height, width) as uint8 coverage: 255 is all car, 0 none.

    soft keeps the fraction of each small pixel the car covers (area-weighted resize); otherwise
    pixels at least half covered become 255. Trained on soft targets, the model predicts coverage, so
    its probabilities upsampled to the photo's size put the edge where it really is.
    """
    with Image.open(path) as img:
        foreground = _foreground(img, "L")  # 0/255
    if foreground.size == (size[1], size[0]):
        return np.array(foreground)
    # reducing_gap box-averages by an integer factor first: exact coverage, and cheaper than bilinear alone.
    coverage = np.array(foreground.resize((size[1], size[0]), Image.BILINEAR, reducing_gap=2.0))
    return coverage if soft else np.where(coverage >= 128, 255, 0).astype(np.uint8)


def _foreground(img: Image.Image, mode: str) -> Image.Image:
    """The non-black pixels as a mode-"1" image, or as 0/255 in mode "L"; a palette image (Kaggle's GIFs) is
    mapped through its palette's grey levels in one pass, not converted to grey first."""
    if img.mode not in ("P", "L"):
        img = img.convert("L")
    levels: Sequence[int] = range(256)
    if img.mode == "P":
        swatch = Image.frombytes("P", (256, 1), bytes(range(256)))  # every palette index once
        swatch.putpalette(img.getpalette() or [])
        levels = swatch.convert("L").tobytes()  # the grey level convert("L") would give each index
    return img.point([255 if level > 0 else 0 for level in levels], mode)


def load_class_mask(path: str | Path, size: tuple[int, int] | None = None) -> np.ndarray:
    """A class mask as uint8 (H, W): palette indices of a 'P' image, grey values of an 'L' one; with size=(height,
    width), resized to it by nearest neighbour, since indices must never be blended."""
    with Image.open(path) as img:
        img = img if img.mode in ("P", "L") else img.convert("L")
        if size is not None and img.size != (size[1], size[0]):
            img = img.resize((size[1], size[0]), Image.NEAREST)
        return np.array(img)


def default_workers(device_name: str) -> int:
    """Loader workers from this process's share of the CPUs: on a GPU all but two, since it trains faster than a
    few workers decode; on the CPU half, at most 4, since the rest compute."""
    cpus = max(1, usable_cpus() // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    if device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available()):
        return max(1, min(16, cpus - 2))
    return min(4, max(1, cpus // 2))


def single_threaded_opencv() -> None:
    """OpenCV (albumentations' engine) without a thread pool, as each loader worker is one core's worth of work."""
    import cv2
    cv2.setNumThreads(1)


def prepare_workers() -> Callable[[int], None] | None:
    """single_threaded_opencv here, before the loader's workers start, and the DataLoader's worker_init_fn (or None)
    that gives workers which are not forked what forked ones inherit.

    A forked worker inherits OpenCV's setting, and must: set inside it, it deadlocks once the parent used the pool.
    A spawned one (macOS, Windows; forkserver, Python 3.14's default on Linux) starts with a thread per core, and
    with Python's Ctrl-C handler, whose KeyboardInterrupt would end it while train.py stops the run cleanly.
    """
    single_threaded_opencv()
    return None if multiprocessing.get_start_method() == "fork" else _spawned_worker


def _spawned_worker(worker_id: int) -> None:
    """worker_init_fn of a loader worker that was not forked: one OpenCV thread; Ctrl-C is the main process's."""
    single_threaded_opencv()
    signal.signal(signal.SIGINT, signal.SIG_IGN)


@dataclass(frozen=True)
class Augmentation:
    """The training augmentation's ranges (train.py's --shift, --zoom, --rotate, --grey, --crop)."""

    shift: float = 0.05                      # largest move, a fraction of the size, each way
    zoom: tuple[float, float] = (0.9, 1.1)   # scale range
    rotate: float = 5.0                      # largest turn in degrees, each way
    grey: float = 0.0                        # probability of a grey photo
    crop: tuple[int, int] | None = None      # (height, width) of the random crop, None: the whole image


def train_transforms(height: int, width: int, channels: int = 3, mask_fill: int = 0,
                     augmentation: Augmentation = Augmentation()):
    """Resize, horizontal flip, shift/scale/rotate, a random crop, colour (or brightness) jitter; mask_fill labels
    the border an affine move brings in (background for binary masks, the ignore index for class masks)."""
    import albumentations as A
    aug = augmentation
    # ColorJitter needs 3 channels; on grey images brightness and contrast are what varies.
    jitter = (A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5) if channels == 3
              else A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5))
    steps = [A.Resize(height, width), A.HorizontalFlip(p=0.5)]
    if aug.shift or aug.zoom != (1.0, 1.0) or aug.rotate:
        steps.append(A.Affine(translate_percent=(-aug.shift, aug.shift), scale=aug.zoom,
                              rotate=(-aug.rotate, aug.rotate), border_mode=0, fill=0, fill_mask=mask_fill, p=0.5))
    if aug.crop is not None:  # after the affine move, so a crop's edges are photo, not fill
        steps.append(A.RandomCrop(*aug.crop))
    steps.append(jitter)
    if aug.grey and channels == 3:
        steps.append(A.ToGray(num_output_channels=3, p=aug.grey))
    return A.Compose(steps)


def val_transforms(height: int, width: int):
    """Validation: resize only, no augmentation."""
    import albumentations as A
    return A.Compose([A.Resize(height, width)])


def image_tensor(image: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, C) image -> float (C, H, W) in [0, 1], the model's input."""
    return torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)


def to_tensors(image: np.ndarray, mask: np.ndarray, classes: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (H, W, C) image -> float (C, H, W) in [0, 1]; uint8 (H, W) mask -> float coverage (1, H, W)
    in [0, 1], or with classes=True the class indices as int64 (H, W), as cross-entropy takes them."""
    mask_t = torch.from_numpy(np.ascontiguousarray(mask))
    return image_tensor(image), (mask_t.long() if classes else mask_t.unsqueeze(0).float().div_(255))


# --- dataset ----------------------------------------------------------------------------------

class SegmentationDataset(Dataset):
    """Image/mask pairs decoded straight to the training size, then augmented together.

    Items are a float (in_channels, H, W) image in [0, 1] and, for binary masks, a float (1, H, W) mask
    of each pixel's car coverage (or 0/1); for classes >= 2, an int64 (H, W) map of class indices.
    """

    def __init__(self, pairs: Sequence[tuple[Path, Path]], height: int, width: int, transform=None,
                 cache: bool = False, soft_masks: bool = True, classes: int = 1, in_channels: int = 3):
        self.pairs, self.size, self.transform = list(pairs), (height, width), transform
        self.soft_masks, self.classes, self.in_channels = soft_masks, classes, in_channels
        # Shared by the DataLoader workers: after the first epoch no worker decodes again.
        self.cache = SharedPairCache(len(self.pairs), height, width, in_channels) if cache else None

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
        return to_tensors(image, mask, classes=self.classes > 1)

    def load(self, index: int) -> tuple[np.ndarray, np.ndarray]:
        """The un-augmented (image, mask) pair at the training size, from the cache when it is there."""
        cached = self.cache.get(index) if self.cache is not None else None
        if cached is not None:
            return cached
        image_path, mask_path = self.pairs[index]
        image = load_image(image_path, self.size, self.in_channels)
        if self.classes > 1:
            mask = load_class_mask(mask_path, self.size)
        else:
            mask = load_mask_resized(mask_path, self.size, self.soft_masks)
        if self.cache is not None:
            self.cache.put(index, image, mask)
        return image, mask

    def original_mask(self, index: int) -> np.ndarray:
        """The mask of item `index` at its own size: {0, 1} for binary masks, class indices otherwise."""
        mask_path = self.pairs[index][1]
        return load_class_mask(mask_path) if self.classes > 1 else load_mask(mask_path)


UNKNOWN_MEMORY = 16 * 2**30  # what cache_fits assumes where the OS does not say


def cache_fits(images: int, height: int, width: int, channels: int = 3, announce: bool = True) -> bool:
    """Whether --cache's shared memory (allocated up front) takes at most a quarter of this machine's RAM."""
    need = SharedPairCache.bytes_needed(images, height, width, channels)
    total = physical_memory()
    if need <= (total or UNKNOWN_MEMORY) // 4:
        return True
    if announce:
        machine = (f"this machine's {total / 2**30:.0f} GiB" if total else
                   f"{UNKNOWN_MEMORY / 2**30:.0f} GiB (this OS does not say its RAM)")
        print(f"note: --cache would hold {need / 2**30:.1f} GiB of decoded images, over a quarter of {machine}; "
              f"decoding every epoch instead", file=sys.stderr)
    return False


def physical_memory() -> int | None:
    """This machine's RAM in bytes, or None where os.sysconf cannot say (it is Unix-only: not on Windows)."""
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (AttributeError, ValueError, OSError):
        return None


class SharedPairCache:
    """n (image, mask) pairs of one size in shared memory (channels + 1 bytes a pixel, allocated up front): what one
    DataLoader worker decodes, all see."""

    @staticmethod
    def bytes_needed(n: int, height: int, width: int, channels: int = 3) -> int:
        """The images' and masks' bytes: one a pixel for each channel and one for the mask."""
        return n * height * width * (channels + 1)

    def __init__(self, n: int, height: int, width: int, channels: int = 3):
        self.images = torch.empty((n, height, width, channels), dtype=torch.uint8).share_memory_()
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


class SeededSampler(Sampler):
    """Yields (index, augmentation seed) for this process's share of an epoch; SegmentationDataset takes both.

    Order and augmentation are a pure function of (seed, epoch), independent of workers and of
    restarts. This is what makes resuming exact: a run stopped by a signal saves how many steps of the
    epoch it finished, and the resumed run skips that many items (set_epoch's skip) and sees exactly the
    batches an uninterrupted run would. With several processes each takes every world_size-th item;
    training pads to equal shares, validation does not (so every image is scored exactly once).
    """

    def __init__(self, n: int, seed: int, shuffle: bool, rank: int = 0, world_size: int = 1):
        self.n, self.seed, self.shuffle = n, seed, shuffle
        self.rank, self.world_size = rank, world_size
        self.epoch, self.skip = 0, 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Select the epoch's order; skip its first `skip` items (those an interrupted run already did)."""
        self.epoch, self.skip = epoch, skip

    def _order(self) -> tuple[list[int], list[int]]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        order = torch.randperm(self.n, generator=g).tolist() if self.shuffle else list(range(self.n))
        seeds = torch.randint(0, 2**31 - 1, (self.n,), generator=g).tolist()
        pad = self._padding()
        order, seeds = order + order[:pad], seeds + seeds[:pad]
        shard = slice(self.rank, None, self.world_size)
        return order[shard][self.skip:], seeds[shard][self.skip:]

    def _padding(self) -> int:
        """Items repeated at the end of a training epoch so that every process gets as many: equal shares keep DDP's
        collectives in step. Validation scores each image once, unpadded."""
        return -self.n % self.world_size if self.shuffle else 0

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(zip(*self._order()))

    def __len__(self) -> int:
        """The items _order yields, counted without drawing the order."""
        return max(0, len(range(self.rank, self.n + self._padding(), self.world_size)) - self.skip)
