"""Data-loader throughput on real Carvana files: the plain baseline vs the project's loader.

    python benchmarks/bench_loader.py --images 128 --pairs 3 --json loader.json

Per pair, back to back: the baseline (full PIL decode, workers=0, no cache), then the project's
train.make_loader with the configured workers: epoch 1 decodes from disk into the shared cache,
epoch 2 only augments. "per core" is images per CPU-second of the processes doing the loading
(the workers, or the main process with --workers 0), read from /proc: it is the number that
says how many cores a given rate needs, and other users of the CPU distort it less than wall time.
A stage profile (CPU ms per image) shows where the decode time goes.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path
from typing import Any, Callable, Sequence

import cv2
import torch

import common
from baseline import BASELINE_FLAGS, plain_decode, plain_load_image, plain_load_mask_resized
import dataset as ds
import train
import utils

TARGET_DISK_PER_CORE = 120.0    # img/s per core from JPEG + GIF files, training transforms included
TARGET_CACHED_PER_CORE = 300.0  # img/s per core once the cache holds every pair


def project_args(height: int, width: int, batch_size: int, workers: int | None,
                 features: Sequence[int] = (64, 128, 256, 512)) -> argparse.Namespace:
    """train.py's settings for this size, batch, width and workers, every other flag at its default."""
    workers_argv = [] if workers is None else ["--workers", str(workers)]
    return train.parse_args([*_shape_argv(height, width, batch_size, features), *workers_argv])[0]


def baseline_args(args: argparse.Namespace) -> argparse.Namespace:
    """The plain baseline: fp32, NCHW, loading in the main process, no cache (train.py's flags)."""
    return train.parse_args([*_shape_argv(args.height, args.width, args.batch_size, args.features), *BASELINE_FLAGS])[0]


def _shape_argv(height: int, width: int, batch_size: int, features: Sequence[int]) -> list[str]:
    return ["--height", str(height), "--width", str(width), "--batch-size", str(batch_size),
            "--features", *map(str, features)]


def setup_on(args: argparse.Namespace, device: torch.device) -> train.Setup:
    """train.py's set-up for these flags, on the benchmark's device."""
    return dataclasses.replace(train.Setup.create(args), device=device)


def children_cpu_seconds() -> float:
    """CPU seconds used so far by this process's living children (the DataLoader workers), from /proc."""
    total, tick, me = 0.0, os.sysconf("SC_CLK_TCK"), os.getpid()
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # the fields after "(command name)"
        except (OSError, IndexError):
            continue
        if int(fields[1]) == me:
            total += (int(fields[11]) + int(fields[12])) / tick  # utime + stime
    return total


def loading_cpu_seconds(workers: int) -> float:
    """CPU seconds of whatever loads: the workers, or this process when there are none."""
    return children_cpu_seconds() if workers > 0 else time.process_time()


def time_epoch(loader: torch.utils.data.DataLoader, epoch: int, workers: int) -> dict[str, float]:
    """One pass over the loader: img/s by wall clock and per CPU-second of the loading processes."""
    loader.sampler.set_epoch(epoch)
    images = 0
    cpu0, wall0 = loading_cpu_seconds(workers), time.perf_counter()
    for batch, _ in loader:
        images += batch.shape[0]
    wall = time.perf_counter() - wall0
    cpu = loading_cpu_seconds(workers) - cpu0
    return {"img_s": images / wall, "img_per_cpu_s": images / cpu if cpu > 0 else None,
            "seconds": wall, "images": images}


def measure_loaders(pairs: Sequence[tuple[Path, Path]], args: argparse.Namespace, device: torch.device,
                    n_pairs: int) -> list[dict[str, Any]]:
    """Alternating baseline / project measurements, one dict per pair."""
    plain = baseline_args(args)
    results = []
    for _ in range(n_pairs):
        with plain_decode():
            base = time_epoch(train.make_loader(pairs, plain, setup_on(plain, device), train=True), 1, 0)
        loader = train.make_loader(pairs, args, setup_on(args, device), train=True)
        disk = time_epoch(loader, 1, args.workers)
        cached = time_epoch(loader, 2, args.workers)  # the same workers, now reading the shared cache
        del loader  # ends the persistent workers before the next pair
        results.append({"baseline": base, "project": disk, "project_cached": cached})
    return results


def stage_profile(pairs: Sequence[tuple[Path, Path]], height: int, width: int) -> dict[str, float]:
    """CPU ms per image of each loading stage, in this process (one core, one torch thread)."""
    size = (height, width)
    transform = ds.train_transforms(height, width)
    image, mask = ds.load_image(pairs[0][0], size), ds.load_mask_resized(pairs[0][1], size)
    cache = ds.SharedPairCache(1, height, width)
    cache.put(0, image, mask)
    stages: dict[str, Callable[[tuple[Path, Path]], Any]] = {
        "JPEG decode, draft mode (load_image)": lambda p: ds.load_image(p[0], size),
        "  of which JPEG decode alone, at draft's scale": lambda p: _decode_only(p[0], size),
        "GIF decode + resize (load_mask_resized)": lambda p: ds.load_mask_resized(p[1], size),
        "  of which GIF decode alone": lambda p: _decode_only(p[1], None),
        "train transforms (albumentations)": lambda p: transform(image=image, mask=mask),
        "to_tensors": lambda p: ds.to_tensors(image, mask),
        "cache read (copy out)": lambda p: cache.get(0),
        "baseline: full JPEG decode + resize": lambda p: plain_load_image(p[0], size),
        "baseline: full GIF to grey + resize": lambda p: plain_load_mask_resized(p[1], size),
    }
    threads, cv2_threads = torch.get_num_threads(), cv2.getNumThreads()
    torch.set_num_threads(1)  # as in a DataLoader worker
    ds.single_threaded_opencv()
    try:
        return {name: _cpu_ms(stage, pairs) for name, stage in stages.items()}
    finally:
        torch.set_num_threads(threads)
        cv2.setNumThreads(cv2_threads)


def _decode_only(path: Path, size: tuple[int, int] | None) -> None:
    """Decode the file (a JPEG at the scale load_image drafts for size) and nothing more."""
    with ds.Image.open(path) as img:
        if size is not None:
            img.draft("RGB", (size[1], size[0]))
        img.load()


def _cpu_ms(stage: Callable[[tuple[Path, Path]], Any], pairs: Sequence[tuple[Path, Path]], repeats: int = 3) -> float:
    """Best of a few passes: CPU ms per item (the least disturbed pass by other users of the CPU)."""
    stage(pairs[0])  # warm-up: imports, file cache
    best = float("inf")
    for _ in range(repeats):
        start = time.process_time()
        for pair in pairs:
            stage(pair)
        best = min(best, (time.process_time() - start) / len(pairs) * 1e3)
    return best


def summarize(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Medians of each measurement over pairs, and the median of the per-pair ratios."""
    summary: dict[str, Any] = {}
    for run in ("baseline", "project", "project_cached"):
        for key in ("img_s", "img_per_cpu_s"):
            summary[f"{run}_{key}"] = common.median([r[run][key] for r in results])
    for run in ("project", "project_cached"):
        for key in ("img_s", "img_per_cpu_s"):
            summary[f"{run}_{key}_ratio"] = common.median_ratio(results, key, project=run)
    return summary


def loader_table(summary: dict[str, Any], workers: int) -> str:
    """Rows of the markdown report."""
    w = f"{workers} worker{'s' if workers != 1 else ''}" if workers else "main process"
    rows = [
        ["loader, disk: img/s (wall)", common.fmt(summary["baseline_img_s"]), common.fmt(summary["project_img_s"]),
         common.ratio_text(summary["project_img_s_ratio"])],
        ["loader, disk: img/s per core", common.fmt(summary["baseline_img_per_cpu_s"]),
         common.fmt(summary["project_img_per_cpu_s"]), common.ratio_text(summary["project_img_per_cpu_s_ratio"])],
        ["loader, cached (epoch 2): img/s (wall)", "–", common.fmt(summary["project_cached_img_s"]),
         common.ratio_text(summary["project_cached_img_s_ratio"])],
        ["loader, cached (epoch 2): img/s per core", "–", common.fmt(summary["project_cached_img_per_cpu_s"]),
         common.ratio_text(summary["project_cached_img_per_cpu_s_ratio"])],
    ]
    return common.markdown_table(["measurement", "baseline (main process)", f"project ({w})", "ratio"], rows)


def profile_table(profile: dict[str, float]) -> str:
    rows = [[name, f"{ms:.2f}", f"{1e3 / ms:,.0f}" if ms > 0 else "–"] for name, ms in profile.items()]
    return common.markdown_table(["stage", "CPU ms / image", "img/s per core"], rows)


def add_loader_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=common.DEFAULT_DATA_DIR, help="Carvana in Kaggle's layout")
    p.add_argument("--height", type=int, default=160)
    p.add_argument("--width", type=int, default=240)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--workers", type=int, default=None, help="project's loader workers (default: train.py's)")
    p.add_argument("--images", type=int, default=128, help="images per loader epoch (the first N pairs)")
    p.add_argument("--pairs", type=int, default=3, help="baseline/project pairs, alternated")
    p.add_argument("--device", default="auto")
    p.add_argument("--json", default=None, metavar="OUT.json")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_loader_args(p)
    opts = p.parse_args()
    device = utils.select_device(opts.device)
    args = project_args(opts.height, opts.width, opts.batch_size, opts.workers)
    pairs = ds.find_pairs(opts.data_dir)[:opts.images]
    results = measure_loaders(pairs, args, device, opts.pairs)
    summary = summarize(results)
    profile = stage_profile(pairs[:32], opts.height, opts.width)
    print(f"{len(pairs)} Carvana pairs at {opts.height}x{opts.width}, batch {opts.batch_size}, "
          f"median of {opts.pairs} pairs; {common.machine(device)}\n")
    print(loader_table(summary, args.workers) + "\n")
    print(profile_table(profile))
    per_core = summary["project_img_per_cpu_s"], summary["project_cached_img_per_cpu_s"]
    print(f"\ntargets per core: disk >= {TARGET_DISK_PER_CORE:.0f} ({common.fmt(per_core[0])}), "
          f"cached >= {TARGET_CACHED_PER_CORE:.0f} ({common.fmt(per_core[1])})")
    common.write_json({"machine": common.machine(device), "settings": vars(opts), "workers": args.workers,
                       "pairs": results, "summary": summary, "stage_cpu_ms": profile}, opts.json)


if __name__ == "__main__":
    main()
