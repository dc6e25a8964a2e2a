"""How long training waits at the end of an epoch while its checkpoints are written: before, and with the writer.

    python benchmarks/bench_checkpoint.py                              # the GPU recipe's UNet (124 M parameters)
    python benchmarks/bench_checkpoint.py --features 16 32 64 128 256 --repeats 5

An epoch that improves on the best writes last.pt and best.pt. Before: two synchronous utils.save_checkpoint
calls (atomic, fsynced), the loop blocked throughout. Now: utils.CheckpointWriter copies the state to CPU memory,
returns, and writes last.pt in a thread, best.pt being a hard link to it. Both sides save the same state (a UNet
and its AdamW moments, as train.py's checkpoint holds them) into --dir, alternating; the table gives the median
seconds the caller was blocked and the median seconds until the files were on disk.
"""
from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import torch

import common
import train
import utils
from model import UNet


def checkpoint_of(features: list[int], device: torch.device) -> dict:
    """A checkpoint as train.py writes it after one optimizer step: weights, AdamW's moments, the rest small."""
    args, _ = train.parse_args(["--features", *map(str, features), "--device", str(device)])
    net = UNet(features=features).to(device)
    opt = train.Optimization.create(net, args, device, steps_per_epoch=10)
    for p in net.parameters():
        p.grad = torch.randn_like(p) * 1e-3
    opt.step(net, args.clip_grad)
    return train.checkpoint_state(net, opt, 1, 0.5, args, {"train": [], "val": []}, [])


def synchronous(state: dict, folder: Path) -> tuple[float, float]:
    """(seconds blocked, seconds until on disk) of the two saves train.py made before the writer."""
    start = time.perf_counter()
    utils.save_checkpoint(state, folder / "last.pt")
    utils.save_checkpoint(state, folder / "best.pt")
    seconds = time.perf_counter() - start
    return seconds, seconds


def with_writer(state: dict, folder: Path) -> tuple[float, float]:
    """(seconds blocked, seconds until on disk) of utils.CheckpointWriter.save with best.pt as a link."""
    writer = utils.CheckpointWriter()
    start = time.perf_counter()
    writer.save(state, folder / "last.pt", links=[folder / "best.pt"])
    blocked = time.perf_counter() - start
    writer.wait()
    return blocked, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--features", type=int, nargs="+", default=[32, 64, 128, 256, 512, 1024],
                        help="the UNet's channels per level (default: the GPU recipe's, %(default)s)")
    parser.add_argument("--device", default="cpu", help="where the state lives before the save (default: cpu)")
    parser.add_argument("--repeats", type=int, default=3, help="saves per side, alternating (default: %(default)s)")
    parser.add_argument("--dir", default="runs/bench-checkpoint",
                        help="folder to write into, on the disk runs go to; removed after (default: %(default)s)")
    opts = parser.parse_args()
    device = utils.select_device(opts.device)
    state = checkpoint_of(opts.features, device)
    folder = Path(opts.dir)
    times: dict[str, list[tuple[float, float]]] = {"before: two synchronous saves": [], "the writer": []}
    try:
        for _ in range(opts.repeats):
            for side, save in zip(times, (synchronous, with_writer)):
                shutil.rmtree(folder, ignore_errors=True)
                folder.mkdir(parents=True)
                times[side].append(save(state, folder))
        size_gb = (folder / "last.pt").stat().st_size / 1e9
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    parameters = sum(t.numel() for t in state["model"].values() if t.is_floating_point())
    print(f"UNet {opts.features} ({parameters / 1e6:.1f} M parameters), a checkpoint of {size_gb:.2f} GB from "
          f"{device}, written into {opts.dir}; median of {opts.repeats} saves of last.pt and best.pt per side.")
    print(f"machine: {common.machine(device)}; {utils.device_name(torch.device('cpu'))}\n")
    rows = [[side, *(common.fmt(common.median([t[i] for t in runs]), 2) for i in (0, 1))]
            for side, runs in times.items()]
    print(common.markdown_table(["side", "training blocked (s)", "until both files are on disk (s)"], rows))


if __name__ == "__main__":
    main()
