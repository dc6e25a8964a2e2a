"""The optimizer's share of a training step: gradient clipping + AdamW, torch's default kernels vs the fused one.

    python benchmarks/bench_optimizer.py                                   # train.py's UNet and the recipe's
    python benchmarks/bench_optimizer.py --features 64 128 256 512 --repeats 9

Both sides are train.Optimization as train.py builds it, with and without --no-fused-adamw, stepping the same
UNet's parameters with fixed random gradients (no forward or backward: only the clip and the update are timed).
The sides alternate step by step, so the machine's load falls on both alike; the table gives the median
milliseconds of each and the median of the per-pair ratios.
"""
from __future__ import annotations

import argparse
import time

import torch

import common
import train
import utils
from model import UNet

SIDES = {"default": ["--no-fused-adamw"], "fused": []}


def optimizer_step_ms(net: torch.nn.Module, opt: train.Optimization, clip: float) -> float:
    """Milliseconds of one clip + AdamW step on the gradients the parameters hold."""
    start = time.perf_counter()
    opt.step(net, clip)
    return (time.perf_counter() - start) * 1e3


def compare(features: list[int], repeats: int, warmup: int) -> list[str]:
    """One table row: parameters, median ms of each side, median ratio default/fused."""
    device = torch.device("cpu")
    torch.manual_seed(0)
    nets, opts = {}, {}
    for side, flags in SIDES.items():
        args, _ = train.parse_args(["--device", "cpu", "--features", *map(str, features), *flags])
        nets[side] = UNet(features=features)
        for p in nets[side].parameters():
            p.grad = torch.randn_like(p) * 1e-3
        opts[side] = train.Optimization.create(nets[side], args, device, steps_per_epoch=warmup + repeats)
    times: dict[str, list[float]] = {side: [] for side in SIDES}
    for i in range(warmup + repeats):
        for side in SIDES:
            ms = optimizer_step_ms(nets[side], opts[side], args.clip_grad)
            if i >= warmup:
                times[side].append(ms)
    ratio = common.median([d / f for d, f in zip(times["default"], times["fused"])])
    params = sum(p.numel() for p in nets["fused"].parameters())
    return [" ".join(map(str, features)), f"{params / 1e6:.1f} M", common.fmt(common.median(times["default"])),
            common.fmt(common.median(times["fused"])), common.ratio_text(ratio)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=int, nargs="+", action="append",
                        help="a UNet's channels per level; repeat the flag for more rows (default: train.py's "
                             "64 128 256 512 and the CPU recipe's 16 32 64 128 256)")
    parser.add_argument("--repeats", type=int, default=15, help="timed steps per side (default: %(default)s)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps per side first (default: %(default)s)")
    opts = parser.parse_args()
    device = torch.device("cpu")
    print(f"clip + AdamW step on {utils.device_name(device)}; median of {opts.repeats} alternating steps.")
    print(f"machine: {common.machine(device)}\n")
    rows = [compare(features, opts.repeats, opts.warmup)
            for features in opts.features or [[64, 128, 256, 512], [16, 32, 64, 128, 256]]]
    print(common.markdown_table(["UNet features", "parameters", "default AdamW, ms", "fused AdamW, ms",
                                 "fused speed-up"], rows))


if __name__ == "__main__":
    main()
