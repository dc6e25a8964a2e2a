"""The dataset check: every file that would break or silently spoil training, named with its problem and the fix.

    python check_dataset.py data/carvana               # exit status 0 when fine (notes allowed), 1 on errors
    python check_dataset.py mydata --classes 3         # masks of class indices 0..2

train.py runs the same check before it trains. Photos are checked from their header and last bytes,
masks are decoded for their values; the verdicts are cached by file size and mtime under ~/.cache, so
that checking an unchanged dataset again takes a moment, and the dataset folder is only read.
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple, Sequence

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from dataset import (IMAGE_DIR, KAGGLE, LAYOUTS, MASK_DIR, Layout, dataset_above, detect_layout, list_images,
                     list_masks, pair_up, upright)
from utils import UserError, atomic_write, parallel_map, plural

CACHE_VERSION = 4  # bump when verdicts change meaning, so that older caches are ignored
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
        """'512 images checked: 510 good pairs, 2 errors, 1 note'."""
        return (f"{plural(len(self.pairs) + self.skipped, 'image')} checked: {plural(len(self.pairs), 'good pair')}, "
                f"{plural(len(self.errors), 'error')}, {plural(len(self.notes), 'note')}")


@dataclass
class Verdict:
    """One file's verdict: its size (width, height; a photo's upright, as load_image turns it), mode and problem."""

    size: tuple[int, int] | None = None
    mode: str | None = None
    problem: str | None = None


def classes_problem(classes: int) -> str | None:
    """Why a --classes value cannot be, or None: masks are 8-bit, so class indices stop at 255."""
    if 1 <= classes <= 256:
        return None
    return f"--classes must be 1 (binary) or 2..256 (class indices fit in 8 bits), got {classes}"


class MaskRule(NamedTuple):
    """What a mask's values must be: binary for classes=1, else class indices below `classes` or ignore_index."""

    classes: int = 1
    ignore_index: int | None = None


def check_dataset(data_dir: str | Path, progress: bool = True, classes: int = 1, ignore_index: int = 255,
                  in_channels: int = 3, cache: bool = True) -> CheckReport:
    """Scan a dataset in either layout for files that would break or silently spoil training; masks must be
    binary for classes=1, else class indices below `classes` or ignore_index."""
    data_dir = Path(data_dir)
    layout = detect_layout(data_dir)
    images, masks = list_images(data_dir, layout), list_masks(data_dir, layout)
    layout_error = check_layout(data_dir, layout, images, masks)
    if layout_error:
        return CheckReport(pairs=[], errors=[layout_error], notes=[], skipped=len(images))
    mask_of, duplicates = pair_up(images, masks, layout)
    # Orphan masks need no decoding: only photos and the masks that pair with them are inspected.
    paired = {mask for mask in mask_of.values() if mask}
    rule = MaskRule() if classes == 1 else MaskRule(classes, ignore_index)  # binary masks: any --ignore-index
    verdicts = inspect_files(data_dir, images, paired, progress, rule, cache)

    pairs, notes = [], []
    errors = [f"{path}: {why}" for path, why in duplicates.items()]
    for image, mask in mask_of.items():
        problems = pair_problems(image, mask, verdicts, layout, data_dir)
        errors += problems
        if not problems:
            pairs.append((image, mask))
            notes += [f"{image}: {note}"] if (note := mode_note(verdicts[image].mode, in_channels)) else []
    errors += [f"{mask}: no photo (expected {layout.expected_image(mask, data_dir)}); add the photo or delete the mask"
               for mask in masks if mask not in paired and mask not in duplicates]
    return CheckReport(pairs=pairs, errors=errors, notes=notes, skipped=len(images) - len(pairs))


def usable_pairs(data_dir: str | Path, skip_bad: bool = False, classes: int = 1, ignore_index: int = 255,
                 in_channels: int = 3, announce: bool = True) -> list[tuple[Path, Path]]:
    """The good pairs to train on, after the check (its first errors and notes on stderr with announce); a
    UserError when none is usable, or when some files have errors and not skip_bad: leaving them out is the
    user's call, never a silent one."""
    report = check_dataset(data_dir, progress=announce and sys.stderr.isatty(), classes=classes,
                           ignore_index=ignore_index, in_channels=in_channels)
    if announce:
        print_findings(report.errors, "error", data_dir)
        print_findings(report.notes, "note", data_dir)
    if not report.pairs:
        raise UserError(f"{report.summary()}: no usable image/mask pairs in {data_dir}; fix the files above")
    if not report.ok:
        if not skip_bad:
            raise UserError(f"{report.summary()}. Fix or remove the files above, or pass --skip-bad "
                            f"to train on the {len(report.pairs)} good pairs.")
        if announce:
            print(f"using the {len(report.pairs)} good pairs, leaving out {report.skipped} image(s) with the "
                  f"errors above", file=sys.stderr)
    return report.pairs


def check_layout(data_dir: Path, layout: Layout | None, images: list[Path], masks: list[Path]) -> str | None:
    """One error for a folder in neither layout, or a missing or empty folder (rather than one per photo), or None."""
    if layout is None:
        found = "is missing" if not data_dir.is_dir() else "holds neither train/ nor images/"
        return f"{data_dir} {found}" + (dataset_above(data_dir) or f": expected {LAYOUTS}, with DIR={data_dir}")
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
        (mask_w, mask_h), (image_w, image_h) = verdicts[mask].size, verdicts[image].size
        problems.append(f"{mask}: mask is {mask_w}x{mask_h} but its photo {image} is {image_w}x{image_h}; "
                        f"{layout.mask_fix}")
    return problems


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


# --- one file's verdict -----------------------------------------------------------------------

def inspect_files(data_dir: Path, images: list[Path], masks: set[Path], progress: bool,
                  rule: MaskRule = MaskRule(), cache: bool = True, workers: int | None = None) -> dict[Path, Verdict]:
    """The verdict of every photo, and of every mask under `rule`.

    A verdict comes from the cache while its file's size and mtime (and the rule) are unchanged; the other
    files are inspected in `workers` threads (default: one per core), since PIL decodes without the GIL.
    """
    jobs = [(path, None) for path in images] + [(path, rule) for path in sorted(masks)]  # None: a photo
    stats = {path: path.stat() for path, _ in jobs}
    stamps = {path: [stats[path].st_size, stats[path].st_mtime_ns, job_rule and list(job_rule)]
              for path, job_rule in jobs}
    keys = {path: path.relative_to(data_dir).as_posix() for path, _ in jobs}  # however DIR was spelled
    cached = load_cache(data_dir) if cache else {}
    verdicts = {}
    for path, _ in jobs:
        entry = cached.get(keys[path], {})
        if entry.get("stamp") == stamps[path]:
            verdicts[path] = Verdict(entry["size"] and tuple(entry["size"]), entry["mode"], entry["problem"])
    todo = [job for job in jobs if job[0] not in verdicts]
    found = tqdm(parallel_map(lambda job: inspect_file(*job), todo, workers, chunk=16, threads=True), total=len(todo),
                 desc="checking", unit="file", disable=not progress, leave=False)
    verdicts.update(zip([path for path, _ in todo], found))
    if cache and todo:
        save_cache(data_dir, {keys[path]: {"stamp": stamps[path], **asdict(v)} for path, v in verdicts.items()})
    return {path: verdicts[path] for path, _ in jobs}


def inspect_file(path: Path, rule: MaskRule | None = None) -> Verdict:
    """One file's verdict from its header and last bytes; a mask (rule given) is also decoded, its values
    checked against the rule."""
    try:
        with open(path, "rb") as f:
            head = f.read(64)
            if not head:
                return Verdict(problem="empty file (0 bytes)")
            f.seek(max(f.seek(0, os.SEEK_END) - TAIL_BYTES, 0))
            tail = f.read().rstrip(TAIL_PADDING)
            f.seek(0)
            try:
                img = Image.open(f)  # reads the header only
            except UnidentifiedImageError:
                return Verdict(problem=not_an_image(head))
            with img:
                verdict = Verdict(size=upright(img)[0] if rule is None else img.size, mode=img.mode)
                marker, marker_name = END_MARKERS.get(img.format, (b"", ""))
                if not tail.endswith(marker):
                    verdict.problem = f"truncated {img.format} (it does not end with the {marker_name})"
                elif rule is not None:
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
    # PIL's histogram counts the values in C without copying the pixels into an array.
    return [value for value, count in enumerate(img.histogram()[:256]) if count]


def mask_values_problem(img: Image.Image, rule: MaskRule = MaskRule()) -> str | None:
    """Why a mask's values break the rule, or would be misread by load_mask; None when they are fine."""
    if rule.classes > 1:
        return class_values_problem(img, rule)
    values = decode_mask_values(img)
    if not any(set(values) <= allowed for allowed in MASK_VALUE_SETS):
        kind = "palette indices" if img.mode == "P" else "grey levels"
        return f"values {{{', '.join(map(str, values))}}} ({kind}); a mask must hold {{0, 1}} or {{0, 255}}"
    return palette_problem(img, values) if img.mode == "P" else None


def class_values_problem(img: Image.Image, rule: MaskRule) -> str | None:
    """Why a mask does not hold class indices below rule.classes (or the ignore index), or None."""
    if img.mode not in ("P", "L"):
        return (f"mode {img.mode}: a class mask must be single-channel (L) or palette (P), each value a "
                f"class index")
    values = decode_mask_values(img)
    bad = [v for v in values if v >= rule.classes and v != rule.ignore_index]
    if not bad:
        return None
    kind = "palette indices" if img.mode == "P" else "values"
    return (f"class index {bad[0]} is not below --classes {rule.classes} "
            f"({kind} {{{', '.join(map(str, values))}}}; {rule.ignore_index} marks unlabelled pixels)")


def palette_problem(img: Image.Image, indices: list[int]) -> str | None:
    """Why a palette would make load_mask, which keeps grey > 0 as car, misread the mask; or None."""
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


# --- the check's cache: {"version": N, "files": {path: {"stamp": [bytes, mtime_ns, rule], verdict}}} -------

def cache_path(data_dir: Path) -> Path:
    """The dataset's verdict cache, under ~/.cache (or $XDG_CACHE_HOME), so that the dataset folder is only read."""
    digest = hashlib.sha256(str(data_dir.resolve()).encode()).hexdigest()[:16]
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "carvana-unet" / f"check-{digest}.json"


def load_cache(data_dir: Path) -> dict[str, dict]:
    """The cached verdicts by file; empty when missing, unreadable or of another version."""
    try:
        data = json.loads(cache_path(data_dir).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data.get("files", {}) if isinstance(data, dict) and data.get("version") == CACHE_VERSION else {}


def save_cache(data_dir: Path, entries: dict[str, dict]) -> None:
    """Write the cache atomically; a failure only costs the next check the time to inspect again."""
    path = cache_path(data_dir)
    with contextlib.suppress(OSError):
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path) as f:
            json.dump({"version": CACHE_VERSION, "files": entries}, f, separators=(",", ":"))


# --- command line -----------------------------------------------------------------------------

def print_findings(lines: Sequence[str], kind: str, data_dir: str | Path, limit: int = 10) -> None:
    """The first `limit` errors or notes on stderr, so that they do not bury training's output; check_dataset.py
    lists them all."""
    for line in lines[:limit]:
        print(f"{kind}: {line}", file=sys.stderr)
    if len(lines) > limit:
        print(f"... and {len(lines) - limit} more {kind}s: python check_dataset.py {data_dir} lists them all",
              file=sys.stderr)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """check_dataset.py's command line."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("data_dir", metavar="DIR", help=f"dataset folder in {LAYOUTS}")
    parser.add_argument("--no-cache", dest="cache", action="store_false",
                        help="inspect every file again, without the check's cache (~/.cache/carvana-unet)")
    parser.add_argument("--classes", type=int, default=1,
                        help="1 (default): binary masks (0/1 or 0/255); N >= 2: masks hold class indices 0..N-1")
    parser.add_argument("--ignore-index", type=int, default=255,
                        help="with --classes N: the mask value of unlabelled pixels (default: %(default)s)")
    parser.add_argument("--in-channels", type=int, choices=(1, 3), default=3,
                        help="3 (default): photos are loaded as RGB, 1: as grey (decides which photos get a note)")
    args = parser.parse_args(argv)
    if problem := classes_problem(args.classes):
        parser.error(problem)
    return args


def main(argv: Sequence[str] | None = None) -> int:
    """Print the check's summary, then every error and note: exit status 0 when fine (notes allowed), 1 on errors."""
    args = parse_args(argv)
    report = check_dataset(args.data_dir, progress=sys.stderr.isatty(), classes=args.classes, cache=args.cache,
                           ignore_index=args.ignore_index, in_channels=args.in_channels)
    print(report.summary())
    for line in report.errors:
        print(f"error: {line}")
    for line in report.notes:
        print(f"note: {line}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
