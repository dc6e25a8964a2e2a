"""One whole training epoch of train.py, end to end, timed by wall clock: plain baseline vs project.

    python benchmarks/bench_epoch.py --repeats 3 --json epoch.json   # 9 real cars: 8 train, 1 validation

Both sides are train.py itself, run as a subprocess for one epoch (start-up, data loading,
training, validation, checkpoint and plots included) on the same symlinked subset of cars:
  project:  python train.py --epochs 1 ...                            (its defaults)
  baseline: python benchmarks/baseline.py --epochs 1 ... --amp off --no-channels-last --workers 0 --no-cache
            (baseline.py is train.py with the decode swapped for a full-size PIL decode + resize,
             the one baseline setting train.py has no flag for)
Runs alternate, baseline first; the table gives medians and the median of the per-repeat ratios,
and each run's validation Dice after its epoch: same seed, data and sample order on both sides, so
it shows whether the project's mixed precision and reduced-size decode cost accuracy.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
from baseline import BASELINE_FLAGS
import dataset as ds
import train
import utils

EPOCH_LINE = re.compile(r"epoch 1/1 .*?([\d.]+)s")


def link_subset(data_dir: Path, out: Path, cars: int) -> Path:
    """out/ in Kaggle's layout with symlinks to the first `cars` cars of data_dir (0: all)."""
    pairs = ds.find_pairs(data_dir)
    keep = sorted({ds.car_id(image) for image, _ in pairs})
    keep = set(keep[:cars] if cars else keep)
    for sub in (ds.IMAGE_DIR, ds.MASK_DIR):
        (out / sub).mkdir(parents=True, exist_ok=True)
    for image, mask in ds.pairs_of_groups(pairs, keep):
        (out / ds.IMAGE_DIR / image.name).symlink_to(image.resolve())
        (out / ds.MASK_DIR / mask.name).symlink_to(mask.resolve())
    return out


def run_epoch(command: list[str], log: Path) -> dict[str, Any]:
    """Wall seconds of one train.py run, and the epoch time train.py itself printed."""
    start = time.perf_counter()
    result = subprocess.run(command, cwd=common.ROOT, capture_output=True, text=True)
    wall = time.perf_counter() - start
    log.write_text(result.stdout + result.stderr)
    if result.returncode != 0:
        sys.exit(f"error: {' '.join(command)} failed ({result.returncode}); see {log}:\n{result.stderr[-2000:]}")
    match = EPOCH_LINE.search(result.stdout)
    return {"wall_s": wall, "epoch_s": float(match.group(1)) if match else None}


def validation_dice(run_dir: Path) -> float | None:
    """The validation Dice the run wrote to its metrics.csv after its (last) epoch."""
    rows = utils.read_metrics_csv(run_dir / "metrics.csv")
    return rows[-1]["val_dice"] if rows else None


def commands(opts: argparse.Namespace, data: Path, out: Path, repeat: int) -> dict[str, list[str]]:
    """The two command lines of one repeat; each writes its own run folder."""
    common_flags = ["--data-dir", str(data), "--epochs", "1", "--val-cars", str(opts.val_cars),
                    "--batch-size", str(opts.batch_size), "--height", str(opts.height), "--width", str(opts.width),
                    "--device", opts.device, "--features", *map(str, opts.features), *opts.train_flags]
    project = [sys.executable, "train.py", *common_flags, "--out-dir", str(out / f"project-{repeat}")]
    if opts.workers is not None:
        project += ["--workers", str(opts.workers)]
    baseline = [sys.executable, "benchmarks/baseline.py", *common_flags, "--out-dir", str(out / f"baseline-{repeat}"),
                *BASELINE_FLAGS]
    return {"baseline": baseline, "project": project}


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=common.DEFAULT_DATA_DIR)
    p.add_argument("--cars", type=int, default=9, help="cars to use, the first N by id (0: all)")
    p.add_argument("--val-cars", type=int, default=1, help="of which held out for validation")
    p.add_argument("--height", type=int, default=160)
    p.add_argument("--width", type=int, default=240)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--features", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--device", default="cpu")
    p.add_argument("--workers", type=int, default=None, help="project's workers (default: train.py's)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--skip-baseline", action="store_true", help="time the project's epoch only")
    p.add_argument("--train-flags", nargs=argparse.REMAINDER, default=[],
                   help="more train.py flags for both sides, e.g. --train-flags --compile (must come last)")
    p.add_argument("--json", default=None, metavar="OUT.json")
    return p.parse_args()


def main() -> None:
    opts = parse_args()
    info = common.machine(utils.select_device(opts.device))  # the load average as the runs start
    sides = ["project"] if opts.skip_baseline else ["baseline", "project"]
    with tempfile.TemporaryDirectory(prefix="bench-epoch-") as tmp:
        data = link_subset(Path(opts.data_dir), Path(tmp) / "data", opts.cars)
        n_images = len(ds.find_pairs(data))
        runs = []
        for repeat in range(opts.repeats):
            lines = commands(opts, data, Path(tmp), repeat)
            runs.append({side: run_epoch(lines[side], Path(tmp) / f"{side}-{repeat}.log") for side in sides})
            for side in sides:  # same seed, data and order on both sides: precision must not cost accuracy
                runs[-1][side]["val_dice"] = validation_dice(Path(tmp) / f"{side}-{repeat}")
        shown = {side: " ".join(lines[side][1:]) for side in sides}
    rows = []
    for key, label in (("wall_s", "whole run, wall clock (s)"), ("epoch_s", "epoch as train.py reports it (s)")):
        values = [common.median([r[side][key] for r in runs]) for side in sides]
        ratio = common.median_ratio(runs, key) if "baseline" in sides else None
        speedup = f"{1 / ratio:.2f}x" if ratio else "–"
        rows.append([label, *(common.fmt(v) for v in values), *([speedup] if "baseline" in sides else [])])
    dice = [[r[side]["val_dice"] for r in runs] for side in sides]
    rows.append(["validation Dice after the epoch (per repeat)",
                 *(" / ".join("–" if d is None else f"{d:.4f}" for d in values) for values in dice),
                 *(["–"] if "baseline" in sides else [])])
    header = ["measurement", *sides, *(["speed-up: baseline / project (median of repeats)"] if "baseline" in sides else [])]
    info["load_average_end"] = common.load_average()
    print(f"one epoch on {n_images} images ({opts.cars or 'all'} cars, {opts.val_cars} for validation) at "
          f"{opts.height}x{opts.width}, batch {opts.batch_size}, UNet {opts.features}; median of {opts.repeats}\n"
          f"machine: {info}\n")
    print(common.markdown_table(header, rows))
    for side in sides:
        print(f"\n{side}: python {shown[side]}")
    common.write_json({"machine": info, "settings": vars(opts), "images": n_images,
                       "commands": shown, "runs": runs}, opts.json)


if __name__ == "__main__":
    main()
