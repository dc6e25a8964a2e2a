"""One whole training epoch of train.py, end to end, timed by wall clock: plain baseline vs project.

    python benchmarks/bench_epoch.py --repeats 3 --json epoch.json   # 9 real cars: 8 train, 1 validation

Both sides are train.py itself, run as a subprocess for one epoch (start-up, data loading,
training, validation, checkpoint and plots included) on the same symlinked subset of cars:
  project:  python train.py --epochs 1 ...                            (its defaults)
  baseline: python benchmarks/baseline.py --epochs 1 ... --amp off --no-channels-last --workers 0 --no-cache
            --no-fused-adamw --bn-images 0
            (baseline.py is train.py with the decode swapped for a full-size PIL decode + resize,
             the one baseline setting train.py has no flag for)
Runs alternate, baseline first; the table gives medians and the median of the per-repeat ratios,
the start-up (from launch to train.py's first line, after the data check and set-up), and each
run's validation Dice: same seed, data and sample order on both sides, so it shows whether the
project's mixed precision and reduced-size decode cost accuracy (--train-flags --bn-images N adds a
BatchNorm refresh to the project's side only). One pair is a coin flip (bf16 and fp32 runs drift apart
chaotically); --vary-seed gives repeat r the seed r (plus --first-seed) on both sides (another init, split
and order each repeat) and reports the mean of the paired differences:

    python benchmarks/bench_epoch.py --cars 10 --val-cars 2 --repeats 5 --vary-seed \
        --features 16 32 64 128 --train-flags --epochs 10 --lr 3e-3    # a fixed short training
"""
from __future__ import annotations

import argparse
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import common
from baseline import BASELINE_FLAGS
import dataset as ds
import report
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
    """Wall seconds of one train.py run, until its first line (start-up), and the epoch time it printed."""
    start = time.perf_counter()
    first_line_s, stdout = None, []
    with open(log, "w") as err, subprocess.Popen(command, cwd=common.ROOT, stdout=subprocess.PIPE, stderr=err,
                                                 text=True) as process:
        for line in process.stdout:  # train.py prints its first line once the data and model are ready
            first_line_s = first_line_s or time.perf_counter() - start
            stdout.append(line)
    wall = time.perf_counter() - start
    stderr = log.read_text()
    log.write_text("".join(stdout) + stderr)
    if process.returncode != 0:
        sys.exit(f"error: {' '.join(command)} failed ({process.returncode}); see {log}:\n{stderr[-2000:]}")
    match = EPOCH_LINE.search("".join(stdout))
    return {"wall_s": wall, "startup_s": first_line_s, "epoch_s": float(match.group(1)) if match else None}


def validation_dice(run_dir: Path) -> float | None:
    """The validation Dice the run wrote to its metrics.csv after its (last) epoch."""
    rows = report.read_metrics_csv(run_dir / "metrics.csv")
    return rows[-1]["val_dice"] if rows else None


def commands(opts: argparse.Namespace, data: Path, out: Path, repeat: int) -> dict[str, list[str]]:
    """The two command lines of one repeat; each writes its own run folder."""
    seed = ["--seed", str(opts.first_seed + repeat)] if opts.vary_seed else []
    common_flags = ["--data-dir", str(data), "--epochs", "1", "--val-cars", str(opts.val_cars),
                    "--batch-size", str(opts.batch_size), "--height", str(opts.height), "--width", str(opts.width),
                    "--device", opts.device, "--features", *map(str, opts.features), *seed, *opts.train_flags]
    workers = [] if opts.workers is None else ["--workers", str(opts.workers)]
    project = [sys.executable, "train.py", *common_flags, "--out-dir", str(out / f"project-{repeat}"), *workers]
    if opts.precision_only:  # the project itself in fp32: only the precision differs
        baseline = [sys.executable, "train.py", *common_flags, "--out-dir", str(out / f"baseline-{repeat}"),
                    *workers, "--amp", "off"]
    else:
        baseline = [sys.executable, "benchmarks/baseline.py", *common_flags, "--out-dir",
                    str(out / f"baseline-{repeat}"), *BASELINE_FLAGS]
    return {"baseline": baseline, "project": project}


def dice_summary_row(runs: list[dict[str, Any]]) -> list[str]:
    """Mean validation Dice of each side, and the mean paired difference (project - baseline) with its range."""
    paired = [(r["baseline"]["val_dice"], r["project"]["val_dice"]) for r in runs]
    paired = [(b, p) for b, p in paired if b is not None and p is not None]
    if not paired:
        return ["validation Dice, mean of repeats", "–", "–", "–"]
    diffs = [p - b for b, p in paired]
    mean = statistics.fmean(diffs)
    spread = f", s.e. {statistics.stdev(diffs) / len(diffs) ** 0.5:.4f}" if len(diffs) > 1 else ""
    return ["validation Dice, mean of repeats", f"{statistics.fmean(b for b, _ in paired):.4f}",
            f"{statistics.fmean(p for _, p in paired):.4f}",
            f"project - baseline: {mean:+.4f} mean{spread}, {min(diffs):+.4f} to {max(diffs):+.4f}"]


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
    p.add_argument("--vary-seed", action="store_true",
                   help="repeat r trains with --seed FIRST+r on both sides (default: train.py's seed every repeat)")
    p.add_argument("--first-seed", type=int, default=0, metavar="FIRST", help="with --vary-seed (default: 0)")
    p.add_argument("--precision-only", action="store_true",
                   help="baseline side: train.py itself with --amp off (same decode, workers and cache), "
                        "so that only the precision differs")
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
    for key, label in (("wall_s", "whole run, wall clock (s)"), ("startup_s", "start-up: launch to first line (s)"),
                       ("epoch_s", "epoch as train.py reports it (s)")):
        values = [common.median([r[side][key] for r in runs]) for side in sides]
        ratio = common.median_ratio(runs, key) if "baseline" in sides else None
        speedup = f"{1 / ratio:.2f}x" if ratio else "–"
        rows.append([label, *(common.fmt(v) for v in values), *([speedup] if "baseline" in sides else [])])
    dice = [[r[side]["val_dice"] for r in runs] for side in sides]
    rows.append(["validation Dice after the epoch (per repeat)",
                 *(" / ".join("–" if d is None else f"{d:.4f}" for d in values) for values in dice),
                 *(["–"] if "baseline" in sides else [])])
    if "baseline" in sides and len(runs) > 1:
        rows.append(dice_summary_row(runs))
    speed_up = ["speed-up: baseline / project (median of repeats)"] if "baseline" in sides else []
    header = ["measurement", *sides, *speed_up]
    info["load_average_end"] = common.load_average()
    epochs = train.parse_args(opts.train_flags)[0].epochs if "--epochs" in opts.train_flags else 1
    print(f"train.py for {epochs} epoch{'s' if epochs > 1 else ''} on {n_images} images ({opts.cars or 'all'} cars, "
          f"{opts.val_cars} for validation) at "
          f"{opts.height}x{opts.width}, batch {opts.batch_size}, UNet {opts.features}; median of {opts.repeats}\n"
          f"machine: {info}\n")
    print(common.markdown_table(header, rows))
    for side in sides:
        print(f"\n{side}: python {shown[side]}")
    common.write_json({"machine": info, "settings": vars(opts), "images": n_images,
                       "commands": shown, "runs": runs}, opts.json)


if __name__ == "__main__":
    main()
