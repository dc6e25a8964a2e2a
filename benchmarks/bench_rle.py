"""Time predict.rle_encode on a Carvana-size (1280x1918) car-like mask: median of 20 runs, in ms.

    python benchmarks/bench_rle.py
"""
from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere
from predict import rle_encode  # noqa: E402

HEIGHT, WIDTH = 1280, 1918
RUNS = 20


def car_mask(height: int = HEIGHT, width: int = WIDTH) -> np.ndarray:
    """A bool mask shaped roughly like a car seen from the side: body, cabin and two wheels."""
    y, x = np.ogrid[:height, :width]

    def ellipse(cy: float, cx: float, ry: float, rx: float) -> np.ndarray:
        return ((y - cy * height) / (ry * height)) ** 2 + ((x - cx * width) / (rx * width)) ** 2 <= 1

    body = ellipse(0.58, 0.50, 0.16, 0.42)
    cabin = ellipse(0.42, 0.48, 0.14, 0.22) & (y < 0.58 * height)
    wheels = ellipse(0.72, 0.25, 0.08, 0.06) | ellipse(0.72, 0.76, 0.08, 0.06)
    return body | cabin | wheels


def main() -> None:
    mask = car_mask()
    rle_encode(mask)  # warm-up
    times = []
    for _ in range(RUNS):
        start = time.perf_counter()
        rle_encode(mask)
        times.append(time.perf_counter() - start)
    print(f"rle_encode {HEIGHT}x{WIDTH} car-like mask ({mask.mean():.0%} car): "
          f"median {statistics.median(times) * 1e3:.2f} ms over {RUNS} runs")


if __name__ == "__main__":
    main()
