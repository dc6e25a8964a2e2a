"""Segmentation data: the two folder layouts, pairing images with masks, the split, augmentations, the
Dataset, a synthetic Carvana-format generator, the dataset check and the Kaggle download.

Kaggle's layout, once `train.zip` and `train_masks.zip` are extracted into DIR:
    DIR/train/{car_id}_{view:02d}.jpg          1918x1280 RGB photos, 16 views per car
    DIR/train_masks/{car_id}_{view:02d}_mask.gif  palette GIFs holding 0 (background) and 1 (car)

The generic layout, for any other dataset:
    DIR/images/X.jpg (or .jpeg, .png, .tif, .tiff, .bmp)
    DIR/masks/X.png (or .gif, .tif, .tiff, .bmp): binary 0/1 or 0/255, or class indices with --classes

Command line:
    python dataset.py synthetic --out data/synthetic      # generate the synthetic default
    python dataset.py synthetic --classes 3 --out data/synthetic-3class   # a multi-class one, generic layout
    python dataset.py download --out data/carvana         # fetch Carvana from Kaggle
    python dataset.py check DIR                           # report bad files before training
"""
from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import random
import re
import shlex
import shutil
import sys
import tempfile
import time
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFilter, UnidentifiedImageError
from torch.utils.data import Dataset
from tqdm import tqdm

IMAGE_DIR = "train"
MASK_DIR = "train_masks"
MASK_SUFFIX = "_mask.gif"
IMAGE_EXTENSIONS = (".jpg", ".jpeg")
IMAGE_FIX = f"replace it from Kaggle's {IMAGE_DIR}.zip or delete it"
MASK_FIX = f"replace it from Kaggle's {MASK_DIR}.zip or delete it and its photo"
CARVANA_NAME = re.compile(r"[0-9a-f]{12}_\d{2}")  # '0cdf5b5d0ce1_07': a car id and a view


# ---------------------------------------------------------------------------------------------
# Folder layouts, pairing and the split
# ---------------------------------------------------------------------------------------------

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
                f"DIR/{IMAGE_DIR}/*.jpg and DIR/{MASK_DIR}/*{MASK_SUFFIX}", IMAGE_FIX, MASK_FIX)
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
    """({image: its mask or None}, {file: why it is left out}) matching names, never positions.

    Two images (or two masks) with one stem cannot be told apart: the later ones are left out.
    """
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
    """Split the groups (group_of: cars, or images) into (train, val) so that no group straddles the split.

    val_groups >= 1 is a number of groups, 0 < val_groups < 1 a fraction of them; at least one group is
    held out and at least one kept for training. Deterministic for a given seed and set of groups.
    """
    groups = groups_of(pairs)
    if len(groups) < 2:
        raise ValueError(f"need at least 2 cars or images to split into train and validation, found "
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


# ---------------------------------------------------------------------------------------------
# Dataset check
# ---------------------------------------------------------------------------------------------

CHECK_CACHE_NAME = ".check_cache.json"
CHECK_CACHE_VERSION = 1  # bump when the verdicts change meaning, so old caches are ignored
# How each format ends; a file cut short (an interrupted copy or unzip) misses it.
END_MARKERS = {"JPEG": (b"\xff\xd9", "FF D9 end marker"), "GIF": (b"\x3b", "3B trailer"),
               "PNG": (b"IEND\xaeB`\x82", "IEND chunk")}
TAIL_BYTES = 4096
TAIL_PADDING = b"\x00 \t\r\n"  # some writers pad after the end marker
MASK_VALUE_SETS = ({0, 1}, {0, 255})
# Photo modes load_image converts to RGB: mode -> (what the photo is, what load_image does to it).
MODE_NOTES = {
    "L": ("grayscale", "copies the grey to 3 channels"),
    "LA": ("grayscale with alpha", "drops the alpha and copies the grey to 3 channels"),
    "RGBA": ("RGBA", "drops the alpha (no compositing), keeping the colours"),
    "CMYK": ("CMYK", "converts the inks to RGB with PIL"),
    "P": ("palette", "looks its colours up in the palette"),
    "1": ("1-bit", "turns it into black-and-white RGB"),
}
SIXTEEN_BIT_NOTE = ("16-bit grayscale",
                    "scales it to 8 bits (value / 257, not clipped) and copies the grey to 3 channels")
OTHER_MODE_NOTE = ("unusual", "converts it to RGB with PIL")
# With --in-channels 1 every photo is loaded as 8-bit grey: only the modes that are not already that are noted.
GREY_SIXTEEN_BIT_NOTE = ("16-bit grayscale", "scales it to 8 bits (value / 257, not clipped)")
GREY_OTHER_MODE_NOTE = "converts it to grayscale with PIL (RGB: 0.299 R + 0.587 G + 0.114 B)"


@dataclass
class CheckReport:
    """What check_dataset found: the usable pairs, the errors, the notes."""

    pairs: list[tuple[Path, Path]]  # the good pairs, sorted by image name, usable for training
    errors: list[str]               # one line per problem, each naming the file and the fix
    notes: list[str]                # non-fatal: conversions load_image applies (grayscale, RGBA, CMYK, 16-bit)
    skipped: int                    # images left out because of an error

    @property
    def ok(self) -> bool:
        """True when nothing is wrong (notes allowed)."""
        return not self.errors

    def summary(self) -> str:
        """'512 pairs checked: 510 good, 2 errors, 1 note'."""
        return (f"{plural(len(self.pairs) + self.skipped, 'pair')} checked: {len(self.pairs)} good, "
                f"{plural(len(self.errors), 'error')}, {plural(len(self.notes), 'note')}")


@dataclass
class Verdict:
    """What the check found in one file: its size (width, height) and mode, and its problem if any."""

    size: tuple[int, int] | None = None
    mode: str | None = None
    problem: str | None = None


def plural(n: int, word: str) -> str:
    """plural(1, 'note') -> '1 note', plural(2, 'note') -> '2 notes'."""
    return f"{n} {word}{'' if n == 1 else 's'}"


def check_dataset(data_dir: str | Path, cache: bool = True, progress: bool = True, classes: int = 1,
                  ignore_index: int = 255, in_channels: int = 3) -> CheckReport:
    """Scan a dataset in either layout for files that would break or silently spoil training.

    Photos are checked from their header and last bytes, masks are decoded once for their values
    (binary for classes=1, class indices below `classes` or ignore_index otherwise); verdicts are
    cached by (name, size, mtime) so that re-checking an unchanged dataset is instant.
    """
    data_dir = Path(data_dir)
    layout = detect_layout(data_dir)
    images, masks = list_images(data_dir, layout), list_masks(data_dir, layout)
    layout_error = check_layout(data_dir, layout, images, masks)
    if layout_error:
        return CheckReport(pairs=[], errors=[layout_error], notes=[], skipped=len(images))
    mask_of, duplicates = pair_up(images, masks, layout)
    # Orphan masks need no decoding: only photos and the masks that pair with them are inspected.
    paired = {mask for mask in mask_of.values() if mask}
    verdicts = inspect_files(data_dir, images, paired, cache, progress, mask_rule(classes, ignore_index))

    pairs, notes = [], []
    errors = [f"{path}: {why}" for path, why in duplicates.items()]
    for image, mask in mask_of.items():
        problems = pair_problems(image, mask, verdicts, layout, data_dir)
        errors += problems
        if not problems:
            pairs.append((image, mask))
            notes += [f"{image}: {note}"] if (note := mode_note(verdicts[image].mode, in_channels)) else []
    errors += [orphan_mask_error(mask, layout, data_dir) for mask in masks
               if mask not in paired and mask not in duplicates]
    return CheckReport(pairs=pairs, errors=errors, notes=notes, skipped=len(images) - len(pairs))


def check_layout(data_dir: Path, layout: Layout | None, images: list[Path], masks: list[Path]) -> str | None:
    """One error for a folder in neither layout, or a missing or empty folder (rather than one per photo), or None."""
    if layout is None:
        found = "is missing" if not data_dir.is_dir() else "holds neither train/ nor images/"
        return f"{data_dir} {found}: expected {LAYOUTS}, with DIR={data_dir}"
    empty = [f"{data_dir / folder} {'is empty' if (data_dir / folder).is_dir() else 'is missing'}"
             for folder, files in ((layout.image_dir, images), (layout.mask_dir, masks)) if not files]
    if not empty:
        return None
    hint = f" (extract {IMAGE_DIR}.zip and {MASK_DIR}.zip into it)" if layout is KAGGLE else ""
    return f"{' and '.join(empty)}: expected {LAYOUTS}, with DIR={data_dir}{hint}"


def pair_problems(image: Path, mask: Path | None, verdicts: dict[Path, Verdict], layout: Layout,
                  data_dir: Path) -> list[str]:
    """The errors of one photo and its mask, each naming the file and the fix; empty when the pair is good."""
    problems = []
    if verdicts[image].problem:
        problems.append(f"{image}: {verdicts[image].problem}; {layout.image_fix}")
    if mask is None:
        return problems + [f"{image}: no mask (expected {layout.expected_mask(image, data_dir)}); "
                           f"add the mask or delete the photo"]
    if verdicts[mask].problem:
        problems.append(f"{mask}: {verdicts[mask].problem}; {layout.mask_fix}")
    elif verdicts[image].size and verdicts[mask].size != verdicts[image].size:
        problems.append(f"{mask}: mask is {size_text(verdicts[mask].size)} but its photo {image} is "
                        f"{size_text(verdicts[image].size)}; {layout.mask_fix}")
    return problems


def orphan_mask_error(mask: Path, layout: Layout, data_dir: Path) -> str:
    """The error for a mask whose photo is missing."""
    return f"{mask}: no photo (expected {layout.expected_image(mask, data_dir)}); add the photo or delete the mask"


def size_text(size: Sequence[int]) -> str:
    """(1918, 1280) -> '1918x1280'."""
    return f"{size[0]}x{size[1]}"


def mode_note(mode: str | None, in_channels: int = 3) -> str | None:
    """The note for a photo mode that load_image converts (to RGB, or to grey with in_channels=1), or None."""
    if mode is None or mode == ("RGB" if in_channels == 3 else "L"):
        return None
    if mode.startswith("I"):
        what, how = SIXTEEN_BIT_NOTE if in_channels == 3 else GREY_SIXTEEN_BIT_NOTE
    elif in_channels == 3:
        what, how = MODE_NOTES.get(mode, OTHER_MODE_NOTE)
    else:
        what, how = MODE_NOTES.get(mode, (mode,))[0], GREY_OTHER_MODE_NOTE
    return f"{what} photo (mode {mode}): load_image {how}"


def mask_rule(classes: int, ignore_index: int) -> list[int] | None:
    """What a mask's values must be, stored with its cached verdict: None for binary masks, else
    [classes, ignore_index] (a list, as it comes back from JSON)."""
    return None if classes == 1 else [classes, ignore_index]


def inspect_files(data_dir: Path, images: list[Path], masks: set[Path], cache: bool, progress: bool,
                  rule: list[int] | None = None, workers: int | None = None) -> dict[Path, Verdict]:
    """The verdict of every image and mask, from the cache when its name, size, mtime (and mask rule) are unchanged.

    Files not in the cache are inspected in `workers` threads (default: one per core; PIL decodes
    without the GIL): decoding the 5088 masks of Carvana takes about 30 s on one core, the wait
    before a first training run.
    """
    cache_path = check_cache_path(data_dir) if cache else None
    cached = load_check_cache(cache_path) if cache_path else {}
    paths = images + sorted(masks)
    keys = [path.relative_to(data_dir).as_posix() for path in paths]
    entries, todo = {}, []
    for path, key in zip(paths, keys):
        stat = path.stat()
        entry = cached.get(key)
        is_mask = path in masks  # masks are decoded (against the rule), photos only opened
        if entry and entry["bytes"] == stat.st_size and entry["mtime_ns"] == stat.st_mtime_ns \
                and entry.get("rule") == (rule if is_mask else None):
            entries[key] = entry
        else:
            todo.append((key, path, stat, is_mask))
    jobs = [(path, stat.st_size, is_mask, rule) for _, path, stat, is_mask in todo]
    found = tqdm(_parallel_map(_inspect_job, jobs, workers, chunk=16, threads=True), total=len(jobs),
                 desc="checking", unit="file", disable=not progress, leave=False)
    for (key, _, stat, is_mask), verdict in zip(todo, found):
        entries[key] = cache_entry(stat, verdict, rule if is_mask else None)
    verdicts = {path: verdict_of(entries[key]) for path, key in zip(paths, keys)}
    if cache_path and entries != cached:
        save_check_cache(cache_path, entries)
    return verdicts


def _inspect_job(job: tuple[Path, int, bool, list[int] | None]) -> Verdict:
    path, nbytes, decode, rule = job
    return inspect_file(path, nbytes, decode=decode, rule=rule)


def usable_cpus() -> int:
    """The CPUs this process may run on (fewer than the machine's under taskset or a container's cpuset)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _parallel_map(function, jobs: list, workers: int | None = None, chunk: int = 32, threads: bool = False):
    """function over jobs, in order, in `workers` threads or spawned processes (default: one per core)
    when there are at least `chunk` jobs for each, else in this process.

    Threads suit work that releases the GIL (PIL's decoders do); processes are spawned, never forked,
    because a fork can copy a lock that another thread (torch's, tqdm's) holds and hang forever.
    """
    workers = min(usable_cpus() if workers is None else workers, len(jobs) // chunk)
    if workers < 2:
        yield from map(function, jobs)
    elif threads:
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            yield from pool.map(function, jobs)
    else:
        with multiprocessing.get_context("spawn").Pool(workers) as pool:
            yield from pool.imap(function, jobs, chunksize=chunk)


def verdict_of(entry: dict) -> Verdict:
    """The verdict a cache entry holds (cache_entry's inverse)."""
    return Verdict(tuple(entry["size"]) if entry["size"] else None, entry["mode"], entry["problem"])


def cache_entry(stat: os.stat_result, verdict: Verdict, rule: list[int] | None = None) -> dict:
    """A file's verdict as JSON-ready data, keyed to its size and mtime (and, for a mask, the rule it was checked by)."""
    size = list(verdict.size) if verdict.size else None  # a list, as it comes back from JSON
    entry = {"bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns, "size": size, "mode": verdict.mode,
             "problem": verdict.problem}
    return entry if rule is None else {**entry, "rule": rule}


def inspect_file(path: Path, nbytes: int, decode: bool, rule: list[int] | None = None) -> Verdict:
    """Check one file from its header and last bytes; decode=True (masks) also decodes its values against the rule."""
    if nbytes == 0:
        return Verdict(problem="empty file (0 bytes)")
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            f.seek(max(nbytes - TAIL_BYTES, 0))
            tail = f.read().rstrip(TAIL_PADDING)
            f.seek(0)
            try:
                img = Image.open(f)  # reads the header only
            except UnidentifiedImageError:
                return Verdict(problem=not_an_image(head))
            with img:
                verdict = Verdict(size=img.size, mode=img.mode)
                marker, marker_name = END_MARKERS.get(img.format, (b"", ""))
                if not tail.endswith(marker):
                    verdict.problem = f"truncated {img.format} (it does not end with the {marker_name})"
                elif decode:
                    verdict.problem = mask_values_problem(img, rule)
                return verdict
    # PIL's plugins raise OSError, SyntaxError, ValueError, EOFError, struct.error... on malformed files;
    # whatever it is, the file is reported, never a traceback.
    except Exception as exc:
        return Verdict(problem=f"unreadable, truncated or corrupt ({type(exc).__name__}: {exc})")


def not_an_image(head: bytes) -> str:
    """Why PIL cannot identify a file, quoting it when it is text (a saved error page, say)."""
    if all(32 <= b < 127 or b in b"\t\r\n" for b in head):
        return f"not an image, it holds text: {head.decode('ascii').strip()[:40]!r}"
    return "not an image (PIL cannot identify its format)"


def decode_mask_values(img: Image.Image) -> list[int]:
    """The distinct values of a mask: palette indices for mode 'P', grey levels (as load_mask sees) otherwise."""
    if img.mode not in ("P", "L"):
        img = img.convert("L")
    # PIL counts the raw indices in C without copying the pixels out: about 2x faster than np.bincount.
    return [value for value, count in enumerate(img.histogram()[:256]) if count]


def mask_values_problem(img: Image.Image, rule: list[int] | None = None) -> str | None:
    """Why a mask's values are not what the rule (mask_rule) asks and load_mask reads correctly, or None."""
    if rule is not None:
        return class_values_problem(img, *rule)
    values = decode_mask_values(img)
    if not any(set(values) <= allowed for allowed in MASK_VALUE_SETS):
        kind = "palette indices" if img.mode == "P" else "grey levels"
        return f"values {{{', '.join(map(str, values))}}} ({kind}); a mask must hold {{0, 1}} or {{0, 255}}"
    return palette_problem(img, values) if img.mode == "P" else None


def class_values_problem(img: Image.Image, classes: int, ignore_index: int) -> str | None:
    """Why a mask does not hold class indices below `classes` (or the ignore index), or None."""
    if img.mode not in ("P", "L"):
        return (f"mode {img.mode}: a class mask must be single-channel (L) or palette (P), each value a "
                f"class index")
    values = decode_mask_values(img)
    bad = [v for v in values if v >= classes and v != ignore_index]
    if not bad:
        return None
    kind = "palette indices" if img.mode == "P" else "values"
    return (f"class index {bad[0]} is not below --classes {classes} ({kind} {{{', '.join(map(str, values))}}}; "
            f"{ignore_index} marks unlabelled pixels)")


def palette_problem(img: Image.Image, indices: list[int]) -> str | None:
    """Why a palette would make load_mask misread the mask, or None.

    load_mask keeps grey > 0 as car, so index 0 must look black and the other index must not.
    """
    palette = img.getpalette()
    if palette is None:
        return None
    probe = Image.frombytes("P", (len(indices), 1), bytes(indices))
    probe.putpalette(palette)
    for index, grey in zip(indices, np.asarray(probe.convert("L"))[0].tolist()):
        if (index > 0) != (grey > 0):
            return (f"its palette turns index {index} into grey {grey}, "
                    f"so load_mask would read it as {'car' if grey else 'background'}")
    return None


def check_cache_path(data_dir: Path) -> Path:
    """DIR/.check_cache.json when DIR is writable, else a file per dataset under ~/.cache/carvana-unet."""
    if is_writable(data_dir):
        return data_dir / CHECK_CACHE_NAME
    digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:16]
    return Path.home() / ".cache" / "carvana-unet" / f"check-{digest}.json"


def is_writable(folder: Path) -> bool:
    """True when we may write into folder."""
    # root passes os.access everywhere; a folder without write bits was made read-only on purpose
    # (a shared copy of the dataset), so leave it alone.
    return os.access(folder, os.W_OK) and bool(folder.stat().st_mode & 0o222)


def load_check_cache(path: Path) -> dict[str, dict]:
    """The cached verdicts by file name relative to DIR; empty when missing, unreadable or outdated."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict) or data.get("version") != CHECK_CACHE_VERSION:
        return {}
    return data.get("files", {})


def save_check_cache(path: Path, entries: dict[str, dict]) -> None:
    """Write the cache atomically (temp file, then os.replace); a failure only costs the next run time."""
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            json.dump({"version": CHECK_CACHE_VERSION, "files": entries}, f, separators=(",", ":"))
        os.chmod(tmp, 0o644)  # mkstemp makes it private; others checking the same folder may read it
        os.replace(tmp, path)
    except OSError:
        if tmp:
            Path(tmp).unlink(missing_ok=True)


def add_check_args(parser: argparse.ArgumentParser) -> None:
    """Flags of `python dataset.py check`."""
    parser.add_argument("data_dir", metavar="DIR", help=f"dataset folder in {LAYOUTS}")
    parser.add_argument("--no-cache", dest="cache", action="store_false",
                        help=f"re-check every file; neither read nor write the cache ({CHECK_CACHE_NAME})")
    parser.add_argument("--classes", type=int, default=1,
                        help="1: binary masks (0/1 or 0/255); N >= 2: masks hold class indices 0..N-1")
    parser.add_argument("--ignore-index", type=int, default=255,
                        help="with --classes N: the mask value of unlabelled pixels")
    parser.add_argument("--in-channels", type=int, choices=(1, 3), default=3,
                        help="3: photos are loaded as RGB, 1: as grey (decides which photos get a note)")


def check_main(args: argparse.Namespace) -> int:
    """Entry point of `python dataset.py check`: 0 when the dataset is fine (notes allowed), 1 on errors."""
    report = check_dataset(args.data_dir, cache=args.cache, progress=sys.stderr.isatty(), classes=args.classes,
                           ignore_index=args.ignore_index, in_channels=args.in_channels)
    print(report.summary())
    for line in report.errors:
        print(f"error: {line}")
    for line in report.notes:
        print(f"note: {line}")
    return 0 if report.ok else 1


# ---------------------------------------------------------------------------------------------
# Loading and augmentations
# ---------------------------------------------------------------------------------------------

def load_image(path: str | Path, size: tuple[int, int] | None = None, channels: int = 3) -> np.ndarray:
    """A photo as uint8 (H, W, channels), RGB for 3 channels, grey for 1; with size=(height, width), resized to it.

    JPEGs are decoded at a reduced scale when the target is small (PIL's draft mode lets libjpeg skip
    most of the work: about 8x faster for Carvana photos at 160x240). The resize then reads the photo's
    own extent in the reduced image (draft's box): at 1/4 scale a 1918-pixel width makes 480 columns, the
    last only half photo, and resizing all 480 as photo put the right side of a car up to a quarter of
    a pixel (at 160x240) away from its mask, which is resized from the full size.
    """
    mode = "RGB" if channels == 3 else "L"
    with Image.open(path) as img:
        box = None
        if size is not None:
            drafted = img.draft(mode, (size[1], size[0]))  # keeps at least the requested size
            box = drafted[1] if drafted else None  # (0, 0, width, height) of the photo in the reduced image
        img = to_rgb(img, mode)
        if size is not None and (img.size != (size[1], size[0]) or box not in (None, (0, 0, *img.size))):
            img = img.resize((size[1], size[0]), Image.BILINEAR, box=box)
        array = np.array(img)  # a writable copy: torch warns on read-only arrays
        return array if channels == 3 else array[:, :, None]


def to_rgb(img: Image.Image, mode: str = "RGB") -> Image.Image:
    """Any photo as 8-bit RGB (or grey, mode 'L'): 16-bit grey scaled (not clipped) to 8 bits, alpha dropped, CMYK via PIL."""
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
    pixels at least half covered become 255. Trained on soft targets, the model predicts coverage,
    and its probabilities upsampled to the photo's size put the edge where it really is: a perfect
    160x240 mask upsampled scores Dice 0.998 on Carvana when soft, 0.994 when binary.
    """
    with Image.open(path) as img:
        foreground = _foreground(img, "L")  # 0/255
    if foreground.size == (size[1], size[0]):
        return np.array(foreground)
    # reducing_gap box-averages by an integer factor first (exact coverage): about 2x cheaper at
    # 1918x1280 -> 240x160 than a bilinear resize of every pixel.
    coverage = np.array(foreground.resize((size[1], size[0]), Image.BILINEAR, reducing_gap=2.0))
    return coverage if soft else np.where(coverage >= 128, 255, 0).astype(np.uint8)


def _foreground(img: Image.Image, mode: str) -> Image.Image:
    """The non-black pixels as a mode-"1" image, or as 0/255 in mode "L".

    A palette image (Kaggle's GIFs) is mapped through its palette with a 256-entry table in one pass
    instead of converting every pixel to grey first: half the cost of decoding a Carvana mask at 160x240.
    """
    if img.mode not in ("P", "L"):
        img = img.convert("L")
    levels: Sequence[int] = range(256)
    if img.mode == "P":
        swatch = Image.frombytes("P", (256, 1), bytes(range(256)))  # every palette index once
        swatch.putpalette(img.getpalette() or [])
        levels = swatch.convert("L").tobytes()  # the grey level convert("L") would give each index
    return img.point([255 if level > 0 else 0 for level in levels], mode)


def load_class_mask(path: str | Path) -> np.ndarray:
    """A class mask at its own size as uint8 (H, W): palette indices of a 'P' image, grey values of an 'L' one."""
    with Image.open(path) as img:
        return np.array(img if img.mode in ("P", "L") else img.convert("L"))


def classes_to_size(labels: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """A class mask resized to size=(height, width) by nearest neighbour: indices are never blended."""
    if labels.shape == tuple(size):
        return labels
    return np.array(Image.fromarray(labels).resize((size[1], size[0]), Image.NEAREST))


def single_threaded_opencv() -> None:
    """OpenCV (albumentations' engine) without its own thread pool, here and in the loader workers forked after.

    A worker is one core's worth of loading; OpenCV's pool, a thread per CPU in every worker,
    oversubscribes the cores the other workers use: on 2 cores one thread augments a 160x240 pair in
    about half the CPU time. It is set in the parent before the workers fork, since setting it inside a
    forked worker deadlocks once the parent has used the pool.
    """
    import cv2
    cv2.setNumThreads(1)


def train_transforms(height: int, width: int, channels: int = 3, mask_fill: int = 0):
    """Training augmentations: resize, horizontal flip, small shift/scale/rotate, colour (or brightness) jitter.

    mask_fill labels the border an affine move brings in: background for binary masks, the ignore index
    for class masks (the black border is not any class).
    """
    import albumentations as A
    # ColorJitter needs 3 channels; on grey images brightness and contrast are what varies.
    jitter = (A.ColorJitter(brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02, p=0.5) if channels == 3
              else A.RandomBrightnessContrast(brightness_limit=0.2, contrast_limit=0.2, p=0.5))
    return A.Compose([
        A.Resize(height, width),
        A.HorizontalFlip(p=0.5),
        A.Affine(translate_percent=(-0.05, 0.05), scale=(0.9, 1.1), rotate=(-5, 5),
                 border_mode=0, fill=0, fill_mask=mask_fill, p=0.5),
        jitter,
    ])


def val_transforms(height: int, width: int):
    """Validation: resize only, no augmentation."""
    import albumentations as A
    return A.Compose([A.Resize(height, width)])


def to_tensors(image: np.ndarray, mask: np.ndarray, classes: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """uint8 (H, W, C) image -> float (C, H, W) in [0, 1]; uint8 (H, W) mask -> float coverage (1, H, W)
    in [0, 1], or with classes=True the class indices as int64 (H, W), as cross-entropy takes them."""
    image_t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1).float().div_(255)
    mask_t = torch.from_numpy(np.ascontiguousarray(mask))
    return image_t, (mask_t.long() if classes else mask_t.unsqueeze(0).float().div_(255))


# ---------------------------------------------------------------------------------------------
# Dataset
# ---------------------------------------------------------------------------------------------

class CarvanaDataset(Dataset):
    """Image/mask pairs (Carvana's or any other) decoded straight to the training size, then augmented together.

    Items are (image, mask): a float (in_channels, H, W) image in [0, 1] and, for binary masks
    (classes=1), a float (1, H, W) mask in [0, 1] holding the car's coverage of each pixel (soft_masks)
    or 0/1; for classes >= 2, an int64 (H, W) map of class indices (resized by nearest neighbour).
    """

    def __init__(self, pairs: Sequence[tuple[Path, Path]], height: int, width: int, transform=None,
                 cache: bool = False, soft_masks: bool = True, classes: int = 1, in_channels: int = 3):
        self.pairs = list(pairs)
        self.size = (height, width)
        self.transform = transform
        self.soft_masks = soft_masks
        self.classes, self.in_channels = classes, in_channels
        # Decoded pairs at the training size, in memory shared by the DataLoader workers: after the
        # first epoch no worker decodes again (about 10x less work than decoding a full-size JPEG
        # and GIF), whichever worker an index lands on, and the memory is held once, not per worker.
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
            mask = classes_to_size(load_class_mask(mask_path), self.size)
        else:
            mask = load_mask_resized(mask_path, self.size, self.soft_masks)
        if self.cache is not None:
            self.cache.put(index, image, mask)
        return image, mask

    def original_mask(self, index: int) -> np.ndarray:
        """The mask of item `index` at its own size: {0, 1} for binary masks, class indices otherwise."""
        mask_path = self.pairs[index][1]
        return load_class_mask(mask_path) if self.classes > 1 else load_mask(mask_path)


class SharedPairCache:
    """n (image, mask) pairs of one size in shared memory, allocated up front (4 bytes a pixel).

    Workers forked or spawned by a DataLoader map the same memory, so what one decodes all see.
    """

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


# ---------------------------------------------------------------------------------------------
# Synthetic Carvana-format generator
# ---------------------------------------------------------------------------------------------

# A car is a few convex prisms (lower body, cabin, door mirrors) and four wheel cylinders, in car
# coordinates: x forward, y to the car's left, z up, in metres, origin on the floor under its middle.
# It turns on the spot in front of an orthographic camera looking down at a small angle, and is drawn
# with the painter's algorithm in a fixed order instead of a depth sort: with the camera above the
# floor, of two points on one line of sight the higher one is the nearer, so the wheels' parts below
# the body lie behind it, and the cabin and mirrors, all above the body, lie in front of it. Inside one
# convex prism, drawing only the faces turned towards the camera is enough.

SYNTHETIC_VIEWS = 16
SYNTHETIC_MANIFEST = "synthetic.json"
# The car's parts, as render(parts=True) labels its pixels, and the classes each --classes N groups them into.
_BODY, _WINDOW, _WHEEL = 1, 2, 3  # the body includes lights, grille, plate and mirrors; wheels their arches
SYNTHETIC_CLASSES = {2: ("background", "car"), 3: ("background", "body", "windows and wheels"),
                     4: ("background", "body", "windows", "wheels")}
_PART_CLASS = {2: (0, 1, 1, 1), 3: (0, 1, 2, 2), 4: (0, 1, 2, 3)}  # part label -> class, per --classes
SYNTHETIC_VERSION = 1  # bump when the drawing changes, so an older folder is not reused as current
_LIGHT = np.array([-0.35, -0.55, 0.76]) / np.linalg.norm([-0.35, -0.55, 0.76])  # camera frame (right, away, up)
_AMBIENT, _DIFFUSE = 0.55, 0.5
_TYRE = (30.0, 30.0, 32.0)
_WHEEL_WELL = (14.0, 14.0, 16.0)
_GLASS = (38.0, 45.0, 54.0)
_PAINTS = ((160, 25, 30), (115, 20, 28), (25, 55, 140), (20, 30, 70), (30, 90, 55), (215, 175, 40),
           (210, 95, 30), (110, 80, 55), (200, 190, 160), (70, 110, 150))
_BODY_STYLES = {  # (low, high) ranges in metres; rear_rake is the rear window's run over the cabin's rise
    "sedan": dict(length=(4.4, 5.0), clearance=(0.14, 0.2), belt=(0.85, 0.98), roof=(0.42, 0.52),
                  boot=(0.7, 1.0), rear_rake=(1.0, 1.6), wheel=(0.3, 0.35)),
    "hatchback": dict(length=(3.8, 4.4), clearance=(0.14, 0.2), belt=(0.85, 0.98), roof=(0.46, 0.58),
                      boot=(0.0, 0.1), rear_rake=(0.25, 0.6), wheel=(0.29, 0.34)),
    "suv": dict(length=(4.3, 4.9), clearance=(0.22, 0.3), belt=(1.0, 1.12), roof=(0.5, 0.62),
                boot=(0.0, 0.08), rear_rake=(0.1, 0.35), wheel=(0.34, 0.4)),
    "coupe": dict(length=(4.2, 4.7), clearance=(0.12, 0.16), belt=(0.8, 0.9), roof=(0.36, 0.45),
                  boot=(0.4, 0.7), rear_rake=(1.5, 2.2), wheel=(0.31, 0.35)),
}


class _Face:
    """A flat convex polygon of a car part, with the polygons painted on it (windows, lights, wheels)."""

    __slots__ = ("points", "normal", "color", "decals", "decal_parts")

    def __init__(self, points: np.ndarray, normal: np.ndarray, color: np.ndarray) -> None:
        self.points = points  # (k, 3), car coordinates
        self.normal = normal  # outward, unit length
        self.color = color
        self.decals: list[tuple[np.ndarray, np.ndarray]] = []
        self.decal_parts: list[int] = []  # the part each decal shows (_BODY, _WINDOW, _WHEEL)

    def paint(self, points: np.ndarray, color: Sequence[float], part: int = _BODY) -> None:
        """Add a polygon drawn over the face, in the face's shade."""
        self.decals.append((points, np.asarray(color, dtype=float)))
        self.decal_parts.append(part)


def _prism(profile: Sequence[tuple[float, float]], y0: float, y1: float, color: np.ndarray) -> list[_Face]:
    """The faces of a convex counter-clockwise (x, z) profile extruded from y0 to y1 > y0.

    Returns the caps at y1 and y0, then one rectangle per profile edge i -> i+1 with corners
    (p_i, y0), (p_i, y1), (p_i+1, y1), (p_i+1, y0), the order `_patch` relies on.
    """
    xz = np.asarray(profile, dtype=float)
    faces = [_Face(_at_y(xz, y1), np.array([0.0, 1.0, 0.0]), color),
             _Face(_at_y(xz, y0), np.array([0.0, -1.0, 0.0]), color)]
    for (ax, az), (bx, bz) in zip(xz, np.roll(xz, -1, axis=0)):
        normal = np.array([bz - az, 0.0, ax - bx])  # right of a counter-clockwise edge is outside
        corners = np.array([[ax, y0, az], [ax, y1, az], [bx, y1, bz], [bx, y0, bz]])
        faces.append(_Face(corners, normal / np.linalg.norm(normal), color))
    return faces


def _patch(face: _Face, u: tuple[float, float], v: tuple[float, float]) -> np.ndarray:
    """The part u x v of a prism's edge face; u runs across the car (y0 -> y1), v along the edge."""
    origin, across, along = face.points[0], face.points[1] - face.points[0], face.points[3] - face.points[0]
    corners = ((u[0], v[0]), (u[1], v[0]), (u[1], v[1]), (u[0], v[1]))
    return np.array([origin + a * across + b * along for a, b in corners])


def _at_y(xz: np.ndarray, y: float) -> np.ndarray:
    """(k, 2) profile points (x, z) -> (k, 3) points in the plane at y."""
    return np.column_stack([xz[:, 0], np.full(len(xz), y), xz[:, 1]])


def _disc(x: float, z: float, radius: float, y: float, floor: float | None = None) -> np.ndarray:
    """A circle in the plane at y, as a polygon; with floor, its points below z=floor are raised to it."""
    angles = np.linspace(0.0, 2 * np.pi, 48, endpoint=False)
    zs = z + radius * np.sin(angles)
    if floor is not None:
        zs = np.maximum(zs, floor)
    return _at_y(np.column_stack([x + radius * np.cos(angles), zs]), y)


def _convex_hull(points: np.ndarray) -> np.ndarray:
    """The convex hull of (n, 2) points, counter-clockwise (Andrew's monotone chain)."""
    pts = sorted(map(tuple, points.tolist()))

    def half(sequence: list[tuple[float, float]]) -> list[tuple[float, float]]:
        chain: list[tuple[float, float]] = []
        for p in sequence:
            while len(chain) >= 2 and ((chain[-1][0] - chain[-2][0]) * (p[1] - chain[-2][1])
                                       - (chain[-1][1] - chain[-2][1]) * (p[0] - chain[-2][0])) <= 0:
                chain.pop()
            chain.append(p)
        return chain[:-1]

    return np.array(half(pts) + half(pts[::-1]))


def _body_colour(rng: np.random.Generator, grey: float) -> np.ndarray:
    """A car's paint: often a grey whose lit faces come out near the backdrop's, else white, black, a colour."""
    pick = rng.random()
    if pick < 0.3:
        base = np.full(3, grey / 0.85 + rng.uniform(-25, 10))  # 0.85: a typical face's shade
    elif pick < 0.45:
        base = np.full(3, rng.uniform(225, 250))
    elif pick < 0.6:
        base = np.full(3, rng.uniform(15, 60))
    else:
        base = np.array(_PAINTS[rng.integers(len(_PAINTS))], dtype=float)
    return np.clip(base + rng.normal(0, 6, 3), 0, 255)


def _backdrop(rng: np.random.Generator, width: int, height: int, horizon: float, grey: float) -> np.ndarray:
    """A studio backdrop as float32 (H, W, 3): a light grey gradient wall over the floor, faint noise."""
    y = (np.arange(height, dtype=np.float32) + 0.5) / height
    h0 = horizon / height
    wall = grey + 12 - 16 * y / h0                          # lit from above
    floor = grey - 18 + 20 * (y - h0) / (1 - h0)            # darkest where it meets the wall
    cove = 1 / (1 + np.exp(-(y - h0) / 0.01))               # the curved join, soft rather than a line
    column = wall * (1 - cove) + floor * cove
    x = (np.arange(width, dtype=np.float32) + 0.5) / width * 2 - 1
    light = column[:, None] * (1 - 0.08 * x[None, :] ** 2)  # a little darker towards the sides
    tint = 1 + rng.normal(0, 0.012, 3).astype(np.float32)
    noise = rng.standard_normal((height, width, 1), dtype=np.float32) * 1.5
    return light[:, :, None] * tint + noise


class _SyntheticCar:
    """One procedurally drawn car in its studio, seen by a fixed camera as it turns on the spot."""

    def __init__(self, rng: np.random.Generator, width: int, height: int) -> None:
        self.width, self.height = width, height
        style = _BODY_STYLES[list(_BODY_STYLES)[rng.integers(len(_BODY_STYLES))]]
        grey = rng.uniform(195, 228)  # the backdrop's
        paint = _body_colour(rng, grey)
        self._build_body(rng, style, paint)
        self._build_cabin(rng, style, paint)
        self._place_camera(rng)
        self.shadow_strength = rng.uniform(0.35, 0.55)
        self.backdrop = _backdrop(rng, width, height, self.horizon, grey)

    def _build_body(self, rng: np.random.Generator, style: dict, paint: np.ndarray) -> None:
        """The lower body with its lights, and the wheels painted on its sides."""
        u = rng.uniform
        self.car_length, self.car_width = u(*style["length"]), u(1.65, 1.95)
        half_l, half_w = self.car_length / 2, self.car_width / 2
        clearance, self.belt = u(*style["clearance"]), u(*style["belt"])
        bonnet_front = self.belt - u(0.03, 0.12)
        nose = clearance + (bonnet_front - clearance) * u(0.45, 0.65)
        tail = clearance + (self.belt - clearance) * u(0.4, 0.6)
        front_under, front_set, rear_under, rear_set = u(0.12, 0.3), u(0.08, 0.25), u(0.1, 0.25), u(0.05, 0.3)
        self.boot_back = -half_l + rear_set
        self.screen_base = half_l - front_set - u(0.8, 1.3)
        # Faces: 0, 1 the sides, then one per profile edge: 2 underside, 3 front bumper, 4 front (lamps,
        # grille), 5 bonnet, 6 top (under the cabin and boot), 7 back of the boot lid, 8 rear bumper.
        body = _prism([(-half_l + rear_under, clearance), (half_l - front_under, clearance), (half_l, nose),
                       (half_l - front_set, bonnet_front), (self.screen_base, self.belt),
                       (self.boot_back, self.belt), (-half_l, tail)], -half_w, half_w, paint)
        lamp_low = u(0.15, 0.3)
        for side in ((0.05, 0.27), (0.73, 0.95)):
            body[4].paint(_patch(body[4], side, (lamp_low, lamp_low + 0.5)), (235, 232, 215))  # headlights
            body[7].paint(_patch(body[7], side, (0.15, 0.65)), (165, 18, 24))  # tail lights
        body[4].paint(_patch(body[4], (0.34, 0.66), (0.15, 0.75)), (24, 24, 26))  # grille
        body[3].paint(_patch(body[3], (0.25, 0.75), (0.3, 0.7)), (30, 30, 32))  # air intake
        body[8].paint(_patch(body[8], (0.38, 0.62), (0.2, 0.6)), (225, 225, 215))  # number plate

        # Wheels (and their arches) fit under the bonnet and inside the flat underside, so the body hides
        # their upper half and what is painted on its sides stays inside the car's silhouette.
        radius = min(u(*style["wheel"]), (bonnet_front - 0.1) / 2)
        tread = u(0.2, 0.28)
        axles = (half_l - max(front_under, front_set) - radius - u(0.05, 0.25),
                 -half_l + max(rear_under, rear_set) + radius + u(0.1, 0.3))
        rim = np.full(3, u(150, 205)) if rng.random() < 0.7 else np.full(3, u(40, 70))
        self.wheels = []  # (outer circle, inner circle, centre)
        for side, cap in ((1, body[0]), (-1, body[1])):
            for x in axles:
                outer_y, inner_y = side * half_w, side * (half_w - tread)
                self.wheels.append((_disc(x, radius, radius, outer_y), _disc(x, radius, radius, inner_y),
                                    np.array([x, (outer_y + inner_y) / 2, radius])))
                cap.paint(_disc(x, radius, radius * 1.1, outer_y, floor=clearance), _WHEEL_WELL, _WHEEL)
                cap.paint(_disc(x, radius, radius, outer_y), _TYRE, _WHEEL)
                cap.paint(_disc(x, radius, radius * 0.62, outer_y), rim, _WHEEL)
                cap.paint(_disc(x, radius, radius * 0.16, outer_y), rim * 0.5, _WHEEL)
        self.body = body

    def _build_cabin(self, rng: np.random.Generator, style: dict, paint: np.ndarray) -> None:
        """The cabin with its windows, and the door mirrors."""
        u = rng.uniform
        base_rear = self.boot_back + u(*style["boot"])
        rise = u(*style["roof"])
        self.roof = self.belt + rise
        runs = np.array([rise * u(1.2, 1.9), rise * u(*style["rear_rake"])])  # windscreen, rear window
        runs *= min(1.0, (self.screen_base - base_rear - 0.7) / runs.sum())  # keep a roof >= 0.7 m long
        top_front, top_rear = self.screen_base - runs[0], base_rear + runs[1]
        half_w = self.car_width * u(0.78, 0.9) / 2
        # Faces: 0, 1 the sides, 2 floor, 3 windscreen, 4 roof, 5 rear window.
        cabin = _prism([(base_rear, self.belt), (self.screen_base, self.belt), (top_front, self.roof),
                        (top_rear, self.roof)], -half_w, half_w, paint)
        cabin[3].paint(_patch(cabin[3], (0.06, 0.94), (0.06, 0.93)), _GLASS, _WINDOW)  # windscreen
        cabin[5].paint(_patch(cabin[5], (0.07, 0.93), (0.07, 0.9)), _GLASS, _WINDOW)   # rear window

        def front_x(z: float) -> float:
            return self.screen_base - runs[0] * (z - self.belt) / rise

        def rear_x(z: float) -> float:
            return base_rear + runs[1] * (z - self.belt) / rise

        low, high, inset, pillar = self.belt + 0.12 * rise, self.roof - 0.1 * rise, 0.06, 0.05
        middle = top_rear + (top_front - top_rear) * u(0.35, 0.55)
        windows = [np.array([(middle + pillar, low), (front_x(low) - inset, low), (front_x(high) - inset, high),
                             (middle + pillar, high)]),
                   np.array([(rear_x(low) + inset, low), (middle - pillar, low), (middle - pillar, high),
                             (rear_x(high) + inset, high)])]
        for cap, y in ((cabin[0], half_w), (cabin[1], -half_w)):
            for window in windows:
                cap.paint(_at_y(window, y), _GLASS, _WINDOW)
        self.cabin = cabin

        # Door mirrors stand beside the cabin's front, above the belt line like the cabin.
        x = front_x(self.belt + 0.19) - 0.1 - u(0.0, 0.1)
        mirror = [(x - 0.1, self.belt + 0.06), (x + 0.08, self.belt + 0.05), (x + 0.06, self.belt + 0.19),
                  (x - 0.1, self.belt + 0.18)]
        reach = u(0.14, 0.2)
        colour = paint if rng.random() < 0.7 else np.array(_TYRE)
        self.mirrors = {1: _prism(mirror, half_w, half_w + reach, colour),
                        -1: _prism(mirror, -half_w - reach, -half_w, colour)}

    def _place_camera(self, rng: np.random.Generator) -> None:
        """Elevation, scale and centre so that every view fits the frame, and where the floor meets the wall."""
        u = rng.uniform
        self.elevation = np.radians(u(8, 17))
        cos_e, sin_e = np.cos(self.elevation), np.sin(self.elevation)
        diagonal = np.hypot(self.car_length, self.car_width)  # the widest the car gets on screen
        self.scale = float(min(u(0.78, 0.9) * self.width / diagonal,
                               0.82 * self.height / (self.roof * cos_e + diagonal * sin_e)))  # pixels a metre
        # The floor point under the car's middle; the car's middle half a roof higher lands mid-frame.
        self.centre = np.array([self.width * (0.5 + u(-0.02, 0.02)),
                                self.height * (0.5 + u(-0.03, 0.03)) + self.scale * self.roof / 2 * cos_e])
        horizon = self.centre[1] - self.scale * u(2.5, 4.5) * sin_e  # the wall stands a few metres behind
        self.horizon = float(np.clip(horizon, 0.12 * self.height, 0.7 * self.height))
        half_l, half_w = self.car_length * 0.53, self.car_width * 0.56  # the shadow reaches past the car
        self.footprint = np.array([[half_l, half_w, 0], [half_l, -half_w, 0], [-half_l, -half_w, 0],
                                   [-half_l, half_w, 0]], dtype=float)

    def render(self, view: int, supersample: int, parts: bool = False) -> tuple[np.ndarray, np.ndarray]:
        """View 1..16 as a uint8 (H, W, 3) photo and its uint8 {0, 1} (H, W) mask.

        With parts=True the mask labels each car pixel with the part most of it shows (_BODY, _WINDOW,
        _WHEEL) instead of 1; its non-zero pixels are exactly the binary mask's.
        """

        angle = -np.pi / 2 + 2 * np.pi * (view - 1) / SYNTHETIC_VIEWS  # view 1 shows the front, as in Carvana
        cos_a, sin_a = np.cos(angle), np.sin(angle)
        turn = np.array([[cos_a, -sin_a, 0.0], [sin_a, cos_a, 0.0], [0.0, 0.0, 1.0]])  # car -> camera frame
        cos_e, sin_e = np.cos(self.elevation), np.sin(self.elevation)
        to_screen = np.array([[self.scale, 0.0, 0.0], [0.0, -self.scale * sin_e, -self.scale * cos_e]]) @ turn
        towards_camera = turn.T @ np.array([0.0, -cos_e, sin_e])  # in car coordinates, like the normals
        light = turn.T @ _LIGHT

        def project(points: np.ndarray) -> np.ndarray:
            return points @ to_screen.T + self.centre

        # (polygon in pixels, colour, part of the silhouette?, part label) in drawing order
        polygons: list[tuple[np.ndarray, np.ndarray, bool, int]] = []
        for outer, inner, _ in sorted(self.wheels, key=lambda wheel: wheel[2] @ towards_camera):  # far first
            polygons.append((_convex_hull(project(np.vstack([outer, inner]))), np.array(_TYRE), True, _WHEEL))
        near = 1 if towards_camera[1] > 0 else -1
        for part in (self.body, self.mirrors[-near], self.cabin, self.mirrors[near]):
            for face in part:
                if face.normal @ towards_camera <= 1e-9:
                    continue
                shade = _AMBIENT + _DIFFUSE * max(0.0, float(face.normal @ light))
                polygons.append((project(face.points), face.color * shade, True, _BODY))
                polygons.extend((project(points), color * shade, False, part)
                                for (points, color), part in zip(face.decals, face.decal_parts))

        # Draw at `supersample` times the resolution, only over the car's bounding box.
        outline = np.vstack([points for points, _, silhouette, _ in polygons if silhouette])
        x0, y0 = np.maximum(np.floor(outline.min(axis=0)).astype(int) - 1, 0)
        x1, y1 = np.minimum(np.ceil(outline.max(axis=0)).astype(int) + 1, (self.width, self.height))
        box_w, box_h = x1 - x0, y1 - y0
        paint = Image.new("RGB", (box_w * supersample, box_h * supersample))
        cover = Image.new("L", paint.size)
        draw_paint, draw_cover = ImageDraw.Draw(paint), ImageDraw.Draw(cover)
        labels = Image.new("L", paint.size) if parts else None
        draw_labels = ImageDraw.Draw(labels) if labels is not None else None
        fine_pixels = supersample ** 2
        for points, color, silhouette, part in polygons:
            # -0.5: PIL's pixel k is centred on k, the fine pixel k covers [k, k+1) / supersample
            xy = ((points - (x0, y0)) * supersample - 0.5).ravel().tolist()
            draw_paint.polygon(xy, fill=tuple(min(255, max(0, round(c))) for c in color.tolist()))
            if silhouette:
                draw_cover.polygon(xy, fill=fine_pixels)  # so that averaging counts the covered ones
            if draw_labels is not None:
                draw_labels.polygon(xy, fill=part)
        # A decal can round a fine pixel past the edge of its face: keep the paint inside the silhouette.
        outside = cover.point([255] + [0] * 255)
        paint.paste((0, 0, 0), mask=outside)

        # The car's fine pixels are averaged into the photo (colour premultiplied by coverage, black
        # elsewhere) and counted into the mask, so that a pixel is car exactly when it is mostly car.
        counts = np.asarray(cover.reduce(supersample))
        coverage = counts.astype(np.float32) / fine_pixels
        photo = self._backdrop_with_shadow(project(self.footprint))
        region = photo[y0:y1, x0:x1]
        region *= 1 - coverage[:, :, None]
        region += np.asarray(paint.reduce(supersample), dtype=np.float32)
        mask = np.zeros((self.height, self.width), dtype=np.uint8)
        mask[y0:y1, x0:x1] = 2 * counts >= fine_pixels
        if labels is not None:
            labels.paste(0, mask=outside)
            mask[y0:y1, x0:x1] *= _majority_part(np.asarray(labels), supersample)
        return np.clip(np.rint(photo), 0, 255).astype(np.uint8), mask

    def _backdrop_with_shadow(self, footprint: np.ndarray) -> np.ndarray:
        """The backdrop darkened by a soft shadow of the (k, 2) footprint polygon, float32 (H, W, 3)."""

        factor = 4  # a blurred shadow needs no detail: draw and blur it at a quarter of the resolution
        small = Image.new("L", (-(-self.width // factor), -(-self.height // factor)))
        ImageDraw.Draw(small).polygon((footprint / factor - 0.5).ravel().tolist(), fill=255)
        small = small.filter(ImageFilter.GaussianBlur(0.2 * self.scale / factor))  # 20 cm of penumbra
        shadow = small.resize((self.width, self.height), Image.BILINEAR,
                              box=(0, 0, self.width / factor, self.height / factor))
        darken = 1 - np.asarray(shadow, dtype=np.float32) * (self.shadow_strength / 255)
        return self.backdrop * darken[:, :, None]


def _majority_part(fine: np.ndarray, supersample: int) -> np.ndarray:
    """uint8 (h, w): the part label covering most of each pixel's fine pixels, from fine labels (h*s, w*s)."""
    h, w = fine.shape[0] // supersample, fine.shape[1] // supersample
    blocks = fine.reshape(h, supersample, w, supersample)
    votes = np.stack([(blocks == part).sum(axis=(1, 3)) for part in (_BODY, _WINDOW, _WHEEL)])
    return (votes.argmax(axis=0) + _BODY).astype(np.uint8)


def _save_mask(mask: np.ndarray, path: Path) -> None:
    """A {0, 1} mask as a palette GIF like Kaggle's: index 0 black (background), 1 white (car)."""
    image = Image.fromarray(mask)
    image.putpalette([0, 0, 0, 255, 255, 255])
    image.save(path, optimize=False)  # optimize renumbers the palette, e.g. an all-car mask to index 0


def _synthetic_params(cars: int, width: int, height: int, seed: int, classes: int | None = None) -> dict:
    """What synthetic.json records: the arguments and generator version that determine every byte."""
    if cars < 1:
        raise ValueError(f"cars must be at least 1, got {cars}")
    if width < 32 or height < 32:
        raise ValueError(f"size must be at least 32x32, got {width}x{height}")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if classes is not None and classes not in SYNTHETIC_CLASSES:
        raise ValueError(f"classes must be one of {', '.join(map(str, SYNTHETIC_CLASSES))}, got {classes}")
    params = {"cars": cars, "width": width, "height": height, "seed": seed, "views": SYNTHETIC_VIEWS,
              "generator": "dataset.py synthetic", "version": SYNTHETIC_VERSION}
    # Only multi-class datasets record their classes, so binary ones keep the synthetic.json they had.
    return params if classes is None else {**params, "classes": classes}


def _is_complete_synthetic(out: Path, params: dict) -> bool:
    """True if out holds a complete synthetic dataset made with params; False if it is absent or empty.

    Raises FileExistsError for anything else, so that no other data is overwritten or mistaken for it.
    """

    if not out.exists():
        return False
    if not out.is_dir():
        raise FileExistsError(f"{out} exists and is not a folder; choose another --out")
    manifest = out / SYNTHETIC_MANIFEST
    if not manifest.is_file():
        if any(out.iterdir()):
            raise FileExistsError(f"{out} already holds files but no {SYNTHETIC_MANIFEST}, so it is not a "
                                  f"synthetic dataset; choose another --out or empty it")
        return False
    try:
        found = json.loads(manifest.read_text())
    except ValueError:
        found = None
    if found != params:
        if isinstance(found, dict):
            keys = [key for key in {**params, **found} if found.get(key) != params.get(key)]
            made = ", ".join(f"{key}={found.get(key)}" for key in keys)
            detail = f"made with {made}, not {', '.join(f'{key}={params.get(key)}' for key in keys)}"
        else:
            detail = f"whose {SYNTHETIC_MANIFEST} is unreadable"
        raise FileExistsError(f"{out} holds a synthetic dataset {detail}; choose another --out or delete it "
                              f"to regenerate")
    layout = GENERIC if params.get("classes") else KAGGLE
    masks = out / layout.mask_dir
    n_masks = sum(1 for p in masks.iterdir() if not is_hidden(p)) if masks.is_dir() else 0
    n_images, n_pairs = len(list_images(out, layout)), params["cars"] * params["views"]
    if n_images != n_pairs or n_masks != n_pairs:
        raise FileExistsError(f"{out} is incomplete: {n_images} photos and {n_masks} masks where "
                              f"{SYNTHETIC_MANIFEST} promises {n_pairs} of each; delete it to regenerate")
    return True


def _car_ids(streams: Sequence[np.random.SeedSequence]) -> list[tuple[str, int]]:
    """Each car's id, drawn first from its own stream (redrawn on a clash), and how many draws that took."""
    ids: list[tuple[str, int]] = []
    seen: set[str] = set()
    for stream in streams:
        rng = np.random.default_rng(stream)
        draws = 1
        car = f"{int(rng.integers(1 << 48)):012x}"
        while car in seen:
            car, draws = f"{int(rng.integers(1 << 48)):012x}", draws + 1
        seen.add(car)
        ids.append((car, draws))
    return ids


def _write_synthetic_car(job: tuple) -> str:
    """Render one car's 16 views into folder `tmp` (a worker's job, so it takes one tuple)."""
    from utils import save_class_png
    stream, car, draws, tmp, layout, width, height, supersample, classes = job
    rng = np.random.default_rng(stream)
    rng.integers(1 << 48, size=draws)  # the id draws, so the scene gets the same stream as before
    scene = _SyntheticCar(rng, width, height)
    for view in range(1, SYNTHETIC_VIEWS + 1):
        photo, mask = scene.render(view, supersample, parts=classes is not None)
        image_path = tmp / layout.image_dir / f"{car}_{view:02d}.jpg"
        Image.fromarray(photo).save(image_path, quality=90)
        if classes is None:
            _save_mask(mask, mask_path_for(image_path, tmp))
        else:
            labels = np.asarray(_PART_CLASS[classes], dtype=np.uint8)[mask]
            save_class_png(labels, tmp / layout.mask_dir / f"{image_path.stem}.png", classes)
    return car


def generate_synthetic(out_dir: str | Path, cars: int = 24, size: tuple[int, int] = (480, 320),
                       seed: int = 0, classes: int | None = None, workers: int = 1) -> Path:
    """Write a synthetic dataset in Kaggle's layout; size is (width, height). Returns out_dir.

    Each car gets 16 views as it turns on a studio backdrop, as JPEGs with exact palette-GIF masks.
    With classes (2, 3 or 4; SYNTHETIC_CLASSES names them) it is a multi-class dataset in the generic
    layout instead: images/X.jpg with masks/X.png, palette PNGs whose indices are the classes.
    The same arguments give byte-identical files. The files are written into a temporary sibling folder
    renamed into place at the end, with synthetic.json recording the arguments; when out_dir already
    holds the same dataset it is returned as is, anything else in out_dir is refused.
    workers > 1 renders cars in that many processes (the files are the same).
    """
    out = Path(out_dir)
    width, height = size
    params = _synthetic_params(cars, width, height, seed, classes)
    layout = KAGGLE if classes is None else GENERIC
    pairs = cars * SYNTHETIC_VIEWS
    if _is_complete_synthetic(out, params):
        print(f"synthetic dataset already in {out} ({pairs} pairs, {width}x{height}, seed {seed})")
        return out

    start = time.perf_counter()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f"{out.name}.tmp-", dir=out.parent))
    try:
        os.chmod(tmp, 0o755)  # mkdtemp makes it private; the dataset is not
        (tmp / layout.image_dir).mkdir()
        (tmp / layout.mask_dir).mkdir()
        supersample = 4 if width * height <= 1_000_000 else 2  # 2x keeps Kaggle's size to ~2 s a car
        # One independent stream per car: the first cars don't depend on how many are generated.
        streams = np.random.SeedSequence(seed).spawn(cars)
        jobs = [(stream, car, draws, tmp, layout, width, height, supersample, classes)
                for stream, (car, draws) in zip(streams, _car_ids(streams))]
        for _ in tqdm(_parallel_map(_write_synthetic_car, jobs, workers, chunk=1), total=cars,
                      desc="synthetic cars", unit="car"):
            pass
        (tmp / SYNTHETIC_MANIFEST).write_text(json.dumps(params, indent=2) + "\n")
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # an empty folder (made by hand, say) is replaced
        try:
            tmp.rename(out)
        except OSError:
            if not _is_complete_synthetic(out, params):  # a run started alongside finished first
                raise
            shutil.rmtree(tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    kind = "" if classes is None else f", classes {', '.join(f'{i} {n}' for i, n in enumerate(SYNTHETIC_CLASSES[classes]))}"
    print(f"wrote {pairs} synthetic image/mask pairs ({cars} cars x {SYNTHETIC_VIEWS} views, "
          f"{width}x{height}, seed {seed}{kind}) to {out} in {time.perf_counter() - start:.1f} s")
    return out


def add_synthetic_args(parser: argparse.ArgumentParser) -> None:
    """Flags of `python dataset.py synthetic`."""
    parser.add_argument("--out", default=None,
                        help="folder to write (default: data/synthetic, or data/synthetic-Nclass with --classes N)")
    parser.add_argument("--cars", type=int, default=24, help="number of cars, 16 views each (default: %(default)s)")
    parser.add_argument("--size", default="480x320", help="image size WxH (default: %(default)s; Kaggle's is 1918x1280)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    parser.add_argument("--workers", type=int, default=usable_cpus(),
                        help="processes rendering cars; the files do not depend on it (default: the usable cores, %(default)s)")
    parser.add_argument("--classes", type=int, default=None, choices=sorted(SYNTHETIC_CLASSES),
                        help="write a multi-class dataset in the generic layout (images/, masks/ of class indices): "
                             + "; ".join(f"{n}: {', '.join(names)}" for n, names in SYNTHETIC_CLASSES.items()))


def synthetic_main(args: argparse.Namespace) -> int:
    """Entry point of `python dataset.py synthetic`."""
    try:
        width, height = parse_size(args.size)
        _synthetic_params(args.cars, width, height, args.seed, args.classes)  # bad arguments: a message, not a traceback
    except (argparse.ArgumentTypeError, ValueError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    try:
        out = args.out or ("data/synthetic" if args.classes is None else f"data/synthetic-{args.classes}class")
        generate_synthetic(out, cars=args.cars, size=(width, height), seed=args.seed, classes=args.classes,
                           workers=args.workers)
    except FileExistsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    return 0


def parse_size(text: str) -> tuple[int, int]:
    """'480x320' -> (480, 320)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"size must look like 480x320 (width x height), got {text!r}")
    if width <= 0 or height <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return width, height


# ---------------------------------------------------------------------------------------------
# Kaggle download
# ---------------------------------------------------------------------------------------------

COMPETITION = "carvana-image-masking-challenge"
RULES_URL = f"https://www.kaggle.com/competitions/{COMPETITION}/rules"
CARVANA_TRAIN_PAIRS = 5088
TEST_DIR = "test"
ZIP_CACHE = ".zips"                     # OUT/.zips: downloads, kept until extracted
EXTRACT_PREFIX = ".extract-"            # OUT/.extract-train-*: extraction in progress
COMPLETE_MARKER = ".download-complete"  # in OUT/train etc.: names the zip it was fully extracted from
KAGGLE_PARTIAL_SUFFIX = ".kaggle-partial"  # the kaggle package's resume marker next to a partial file
TOKEN_HELP = (
    "Create an API token: sign in at kaggle.com -> Settings -> API -> Create New Token, save the "
    "downloaded kaggle.json as ~/.kaggle/kaggle.json and run `chmod 600 ~/.kaggle/kaggle.json` "
    "(or export KAGGLE_API_TOKEN=<token>).")


class DownloadError(Exception):
    """A failure reported as one 'error: ...' line, without a traceback."""


def add_download_args(parser: argparse.ArgumentParser) -> None:
    """Flags of `python dataset.py download`."""
    parser.add_argument("--out", default="data/carvana", help="folder to extract into (default: %(default)s)")
    parser.add_argument("--hq", action="store_true", help="download train_hq.zip instead of train.zip")
    parser.add_argument("--with-test", action="store_true", help="also download test.zip (8 GB)")
    parser.add_argument("--force", action="store_true",
                        help="extract again even when a folder is complete, replacing it (valid zips are reused)")
    parser.add_argument("--keep-zips", action="store_true",
                        help=f"keep the downloaded zips in OUT/{ZIP_CACHE} after extraction")


def carvana_parts(hq: bool = False, with_test: bool = False) -> list[tuple[str, str]]:
    """(zip on Kaggle, folder in OUT) for each part to fetch."""
    parts = [("train_hq.zip" if hq else "train.zip", IMAGE_DIR), ("train_masks.zip", MASK_DIR)]
    return parts + [("test.zip", TEST_DIR)] if with_test else parts


# --- credentials and the Kaggle API ----------------------------------------------------------

def read_text(path: Path) -> str:
    """The stripped contents of a file, or '' when it is missing or unreadable."""
    try:
        return path.read_text().strip()
    except OSError:
        return ""


def kaggle_config_file() -> Path:
    """Where the kaggle package looks for kaggle.json: KAGGLE_CONFIG_DIR, ~/.kaggle, or the XDG folder."""
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        return Path(os.environ["KAGGLE_CONFIG_DIR"]) / "kaggle.json"
    config_dir = Path.home() / ".kaggle"
    # Same fallback as kaggle 2.x: XDG config folder on Linux when ~/.kaggle does not exist.
    if sys.platform.startswith("linux") and not config_dir.exists():
        config_dir = Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "kaggle"
    return config_dir / "kaggle.json"


def legacy_key_source() -> str | None:
    """Where a username and key come from (kaggle.json merged with KAGGLE_* variables), or None."""
    config = kaggle_config_file()
    values = {}
    if config.is_file():
        try:
            values = json.loads(config.read_text()) or {}
        except (OSError, ValueError) as e:
            raise DownloadError(f"cannot read {config} ({e}). {TOKEN_HELP}") from None
    values.update({key[len("KAGGLE_"):].lower(): value for key, value in os.environ.items()
                   if key.startswith("KAGGLE_")})
    if not (values.get("username") and values.get("key")):
        return None
    return str(config) if config.is_file() else "KAGGLE_USERNAME/KAGGLE_KEY"


def kaggle_credentials() -> str | None:
    """Where the kaggle package will find credentials (its own lookup order), or None when nowhere."""
    if os.environ.get("KAGGLE_API_TOKEN"):
        return "KAGGLE_API_TOKEN"
    home_kaggle = Path.home() / ".kaggle"
    for token in (home_kaggle / "access_token", home_kaggle / "access_token.txt"):
        if read_text(token):
            return str(token)
    legacy = legacy_key_source()
    if legacy:
        return legacy
    oauth = home_kaggle / "credentials.json"  # written by `kaggle auth login`
    return str(oauth) if oauth.is_file() else None


def kaggle_api() -> object:
    """An authenticated KaggleApi; DownloadError when no credentials are set up or Kaggle refuses them."""
    source = kaggle_credentials()
    if source is None:
        raise DownloadError(f"no Kaggle API credentials found. {TOKEN_HELP}")
    try:
        # Importing kaggle authenticates and prints its own help on failure: we authenticate below
        # and report in our words instead.
        with contextlib.redirect_stdout(io.StringIO()):
            from kaggle.api.kaggle_api_extended import KaggleApi
    except ImportError as e:
        raise DownloadError(f"the kaggle package is missing ({e}); install it: pip install kaggle==2.2.5") from None
    api = KaggleApi()
    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            api.authenticate()
    except SystemExit:  # authenticate() prints its help and calls exit(1) when nothing is accepted
        raise DownloadError(f"Kaggle did not accept the credentials in {source}. {TOKEN_HELP}") from None
    except Exception as e:  # e.g. no network while it checks an access token
        raise DownloadError(describe_kaggle_error(e, "checking your Kaggle credentials")) from None
    sys.stdout.write(printed.getvalue())  # keeps its warnings, e.g. a kaggle.json readable by others
    return api


def describe_kaggle_error(error: Exception, action: str) -> str:
    """One line for an exception the kaggle package raised (requests' HTTPError carries the status)."""
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status == 403:
        return (f"{action}: Kaggle answered 403 Forbidden: accept the competition's rules first at {RULES_URL} "
                f"(signed in as the owner of your API token), then rerun")
    if status == 401:
        return f"{action}: Kaggle answered 401 Unauthorized: your API token is invalid or expired. {TOKEN_HELP}"
    if status is not None:
        return f"{action}: Kaggle answered HTTP {status}; try again later"
    detail = (str(error).splitlines() or [""])[0]
    detail = detail if len(detail) <= 120 else detail[:117] + "..."
    # requests' ConnectionError and Timeout, matched by name: requests comes with kaggle, not with us.
    if any(cls.__name__ in ("ConnectionError", "Timeout") for cls in type(error).__mro__):
        return (f"{action}: cannot reach Kaggle ({type(error).__name__}: {detail}); check your internet "
                f"connection, then rerun (downloads resume)")
    return f"{action}: {type(error).__name__}: {detail}"


class LazyKaggleApi:
    """The Kaggle API, created on first use so that runs with nothing to fetch need no credentials."""

    def __init__(self, api: object | None = None):
        self._api = api

    def get(self) -> object:
        """The API object, authenticating on the first call."""
        if self._api is None:
            self._api = kaggle_api()
        return self._api


# --- zips: reuse, fetch, test -----------------------------------------------------------------

def zip_problem(path: Path) -> str | None:
    """Why `path` is not a sound zip (bad format, bad CRC, empty), or None when it is."""
    try:
        with zipfile.ZipFile(path) as archive:
            if not archive.namelist():
                return "empty archive"
            bad = archive.testzip()
    # Truncated or garbled files fail in several ways depending on where the damage is.
    except (zipfile.BadZipFile, OSError, EOFError, zlib.error, ValueError, NotImplementedError) as e:
        return f"{type(e).__name__}: {e}"
    return f"bad CRC in {bad}" if bad else None


def unwrap_zip(path: Path) -> Path:
    """A zip whose only member is a zip (Kaggle wraps large files, e.g. X.zip.zip) -> that inner zip."""
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            if len(names) != 1 or not names[0].lower().endswith(".zip"):
                return path
            inner = path.with_name(path.name + ".unwrapped")
            with archive.open(names[0]) as source, open(inner, "wb") as target:
                shutil.copyfileobj(source, target, 1 << 20)
    except zipfile.BadZipFile:
        return path  # not a zip at all: zip_problem reports it
    path.unlink()
    return inner


def delivered_file(staging: Path, zip_name: str) -> Path:
    """The file the kaggle package left in `staging`: it names it after the download URL, not the request."""
    files = [p for p in staging.iterdir() if p.is_file() and not p.name.endswith(KAGGLE_PARTIAL_SUFFIX)]
    for expected in (zip_name, zip_name + ".zip"):
        if staging / expected in files:
            return staging / expected
    if len(files) == 1:
        return files[0]
    found = ", ".join(sorted(p.name for p in files)) or "nothing"
    raise DownloadError(f"downloading {zip_name} left {found} in {staging}; expected one file")


def fetch_zip(api: object, out: Path, zip_name: str) -> Path:
    """Download one competition file into OUT/.zips and return the zip (unwrapped when Kaggle wrapped it)."""
    # One staging folder per file, kept across runs so the kaggle package can resume a partial download.
    staging = out / ZIP_CACHE / f"{zip_name}.part"
    staging.mkdir(parents=True, exist_ok=True)
    print(f"{zip_name}: downloading from Kaggle ({COMPETITION})")
    try:
        api.competition_download_file(COMPETITION, zip_name, path=str(staging), quiet=False)
    except Exception as e:  # the package raises requests' HTTPError, ConnectionError, ValueError...
        raise DownloadError(describe_kaggle_error(e, f"downloading {zip_name}")) from None
    path = out / ZIP_CACHE / zip_name
    unwrap_zip(delivered_file(staging, zip_name)).replace(path)
    shutil.rmtree(staging)
    return path


def obtain_zip(api: LazyKaggleApi, out: Path, zip_name: str) -> Path:
    """A tested zip: one already in OUT/ or OUT/.zips, else downloaded (again, once, if corrupt)."""
    for path in (out / zip_name, out / ZIP_CACHE / zip_name):
        if path.is_file():
            print(f"{zip_name}: testing {path}")
            problem = zip_problem(path)
            if problem is None:
                return path
            print(f"warning: {path} is corrupt ({problem}); deleting it", file=sys.stderr)
            path.unlink()
    for attempt in range(2):
        path = fetch_zip(api.get(), out, zip_name)
        print(f"{zip_name}: testing {path}")
        problem = zip_problem(path)
        if problem is None:
            return path
        path.unlink()
        if attempt == 0:
            print(f"warning: the downloaded {zip_name} is corrupt ({problem}); downloading it again", file=sys.stderr)
    raise DownloadError(f"{zip_name} was corrupt twice in a row ({problem}); check disk space and rerun")


# --- extraction -------------------------------------------------------------------------------

def is_extracted(target: Path, zip_name: str, force: bool = False) -> bool:
    """True when `target` is a finished extraction of `zip_name`; DownloadError when it holds something else."""
    if force or not target.exists():
        return False
    source = read_text(target / COMPLETE_MARKER)
    if source == zip_name:
        return True
    if source:
        raise DownloadError(f"{target} holds the files of {source}, not {zip_name}; rerun with --force to replace them")
    raise DownloadError(f"{target} exists but no finished extraction is recorded in it (unzipped by hand?); "
                        f"remove it, or rerun with --force to replace it")


def remove_stale_extractions(out: Path, folder: str) -> None:
    """Delete temporary folders a killed run left behind for `folder`."""
    for stale in out.glob(f"{EXTRACT_PREFIX}{folder}-*"):
        shutil.rmtree(stale, ignore_errors=True)


def is_junk(member_name: str) -> bool:
    """Archive members to skip: macOS resource forks and hidden files."""
    return member_name.startswith("__MACOSX/") or Path(member_name).name.startswith(".")


def extracted_root(tmp: Path) -> Path:
    """The folder holding the files: the zip's single top folder (train/, train_hq/...) or tmp itself."""
    entries = list(tmp.iterdir())
    if not entries:
        raise DownloadError(f"the archive extracted into {tmp} held no files")
    return entries[0] if len(entries) == 1 and entries[0].is_dir() else tmp


def replace_folder(source: Path, target: Path) -> None:
    """Rename `source` to `target`, moving an existing `target` out of the way first."""
    if target.exists():
        old = target.with_name(f"{EXTRACT_PREFIX}{target.name}-old")
        shutil.rmtree(old, ignore_errors=True)
        target.replace(old)
        source.replace(target)
        shutil.rmtree(old)
    else:
        source.replace(target)


def extract_zip(zip_path: Path, target: Path, zip_name: str) -> None:
    """Extract into a temporary folder next to `target`, mark it complete, then rename it into place."""
    out = target.parent
    remove_stale_extractions(out, target.name)
    # Same filesystem as the target, so the final rename is atomic: a run interrupted at any point
    # leaves either no target or a complete one.
    tmp = Path(tempfile.mkdtemp(prefix=f"{EXTRACT_PREFIX}{target.name}-", dir=out))
    try:
        with zipfile.ZipFile(zip_path) as archive:
            members = [m for m in archive.infolist() if not is_junk(m.filename)]
            with tqdm(total=sum(m.file_size for m in members), unit="B", unit_scale=True, unit_divisor=1024,
                      desc=f"extracting {zip_name}") as progress:
                for member in members:
                    archive.extract(member, tmp)
                    progress.update(member.file_size)
        root = extracted_root(tmp)
        (root / COMPLETE_MARKER).write_text(zip_name + "\n")
        replace_folder(root, target)
    except (OSError, zipfile.BadZipFile) as e:
        raise DownloadError(f"extracting {zip_path} into {target} failed: {e}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- the whole download -------------------------------------------------------------------------

def prepare_part(api: LazyKaggleApi, out: Path, zip_name: str, folder: str,
                 force: bool = False, keep_zips: bool = False) -> None:
    """Make OUT/folder a complete extraction of zip_name, downloading only what is missing."""
    target = out / folder
    if is_extracted(target, zip_name, force):
        print(f"{target}: already extracted from {zip_name}, skipping")
        return
    zip_path = obtain_zip(api, out, zip_name)
    print(f"{zip_name}: extracting into {target}")
    extract_zip(zip_path, target, zip_name)
    if zip_path.parent == out / ZIP_CACHE and not keep_zips:
        zip_path.unlink()  # only our own downloads: a zip the user put in OUT/ stays


def check_download(out: Path, with_test: bool = False) -> list[tuple[Path, Path]]:
    """Check that every photo has its mask and report the counts; returns the pairs."""
    try:
        pairs = find_pairs(out)
    except (FileNotFoundError, ValueError) as e:
        raise DownloadError(str(e)) from None
    if not pairs:
        raise DownloadError(f"no photos found in {out / IMAGE_DIR} after extraction")
    print(f"{len(pairs)} photo/mask pairs in {out}")
    if len(pairs) != CARVANA_TRAIN_PAIRS:
        print(f"warning: the full Carvana train set has {CARVANA_TRAIN_PAIRS} pairs, found {len(pairs)}",
              file=sys.stderr)
    if with_test:
        tests = [p for p in (out / TEST_DIR).iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS and not is_hidden(p)]
        print(f"{len(tests)} test photos in {out / TEST_DIR}")
    return pairs


def download_carvana(out: str | Path, hq: bool = False, with_test: bool = False, api: object | None = None,
                     force: bool = False, keep_zips: bool = False) -> list[tuple[Path, Path]]:
    """Download and extract Carvana into OUT/train, OUT/train_masks (and OUT/test); returns the pairs.

    `api` stands in for kaggle's KaggleApi (anything with competition_download_file); None means
    check the credentials, then import kaggle and authenticate, and only if something must be fetched.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lazy_api = LazyKaggleApi(api)
    for zip_name, folder in carvana_parts(hq, with_test):
        prepare_part(lazy_api, out, zip_name, folder, force=force, keep_zips=keep_zips)
    with contextlib.suppress(OSError):
        (out / ZIP_CACHE).rmdir()  # only when empty
    return check_download(out, with_test)


def download_main(args: argparse.Namespace, api: object | None = None) -> int:
    """Entry point of `python dataset.py download`; `api` replaces the Kaggle API in tests."""
    try:
        download_carvana(args.out, hq=args.hq, with_test=args.with_test, api=api,
                         force=args.force, keep_zips=args.keep_zips)
    except (DownloadError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("error: interrupted; rerun the same command to continue (finished parts are kept)", file=sys.stderr)
        return 130
    print(f"Done. Train with:\n    python train.py --data-dir {shlex.quote(str(args.out))}")
    return 0


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
    add_check_args(commands.add_parser("check", help="report bad files in a dataset before training"))
    args = parser.parse_args(argv)
    return {"synthetic": synthetic_main, "download": download_main, "check": check_main}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
