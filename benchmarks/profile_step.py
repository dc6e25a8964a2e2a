"""Where one training step's time goes, and how close its convolutions come to the CPU's (or GPU's) peak.

    python benchmarks/profile_step.py                        # train.py's defaults for this device, 160x240, batch 8
    python benchmarks/profile_step.py --amp off --no-channels-last    # the plain fp32 NCHW step, for comparison
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 python benchmarks/profile_step.py   # an AVX-512 CPU held to AVX2

The step is train.train_step on a fixed random batch (no loader), timed in phases (forward, loss, backward,
clip + AdamW) over --steps steps after --warmup; one more step runs under torch.profiler, whose self CPU times
split it by operator kind (convolutions forward and backward, BatchNorm, ReLU, pooling, the rest). The
convolutions' FLOPs (FlopCounterMode) over their time give their rate, set against a GEMM of the step's dtype
measured right after and against the nominal peak (cores x clock x FLOP per cycle). The loader row is the CPU
time of decoding and augmenting one batch (bench_loader's stage profile), which the workers overlap with the step.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any, Callable

import torch
from torch.profiler import ProfilerActivity, profile
from torch.utils.flop_counter import FlopCounterMode

import common
import bench_loader
import dataset as ds
import train
import utils
from model import UNet
from task import bce_dice_loss

# Operator kinds, by substrings of the aten operator's name; the first kind that matches takes it.
KINDS = (
    ("convolutions, backward", ("convolution_backward", "conv_transpose2d_backward", "conv2d_backward")),
    ("convolutions, forward", ("conv",)),
    ("BatchNorm, forward and backward", ("batch_norm",)),
    ("ReLU, forward and backward", ("relu", "threshold_backward")),
    ("max-pooling, forward and backward", ("max_pool",)),
)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=common.DEFAULT_DATA_DIR, help="photos for the loader row (skipped if absent)")
    p.add_argument("--height", type=int, default=160, help="batch height (default: %(default)s)")
    p.add_argument("--width", type=int, default=240, help="batch width (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8, help="images per step (default: %(default)s)")
    p.add_argument("--features", type=int, nargs="+", default=[64, 128, 256, 512],
                   help="UNet channels per level (default: %(default)s)")
    p.add_argument("--device", default="cpu", help="cpu (default), cuda...")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16", "off"), default="auto", help="as train.py's")
    p.add_argument("--channels-last", action=argparse.BooleanOptionalAction, help="as train.py's (default: its rule)")
    p.add_argument("--steps", type=int, default=3, help="timed steps (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps first (default: %(default)s)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, overriding the nominal one")
    p.add_argument("--json", default=None, metavar="OUT.json")
    return p.parse_args()


def conv_flops(features: list[int], batch: int, height: int, width: int) -> dict[str, float]:
    """Forward and backward FLOPs of the convolutions of one step (FlopCounterMode on the meta device)."""
    model = UNet(features=features).to("meta")
    with FlopCounterMode(display=False) as counter:
        model(torch.empty(batch, 3, height, width, device="meta")).float().mean().backward()
    counts = counter.get_flop_counts()["Global"]
    return {"forward": float(sum(n for op, n in counts.items() if "backward" not in str(op))),
            "backward": float(sum(n for op, n in counts.items() if "backward" in str(op)))}


def kind_of(name: str) -> str:
    """The operator kind of an aten operator's name; 'the rest' when none matches."""
    return next((kind for kind, keys in KINDS if any(key in name for key in keys)), "the rest")


def profile_kinds(step: Callable[[], Any]) -> dict[str, float]:
    """Self CPU milliseconds of one step by operator kind."""
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        step()
    ms: dict[str, float] = {kind: 0.0 for kind, _ in KINDS} | {"the rest": 0.0}
    for event in prof.key_averages():
        if event.key.startswith("aten::"):  # leaves and wrappers alike: self time counts each microsecond once
            ms[kind_of(event.key)] += event.self_cpu_time_total / 1e3
    return ms


def phase_times(model: torch.nn.Module, images: torch.Tensor, masks: torch.Tensor, opt: train.Optimization,
                amp_dtype: torch.dtype | None, clip_grad: float) -> dict[str, float]:
    """Milliseconds of forward, loss, backward and clip + AdamW in one step, made of train.train_step's parts."""
    device, marks = images.device, [time.perf_counter()]

    def mark() -> None:
        common.synchronize(device)
        marks.append(time.perf_counter())

    with utils.autocast(device, amp_dtype):
        logits = model(images)
    mark()
    loss = bce_dice_loss(logits, masks)
    mark()
    opt.backward(loss)
    mark()
    opt.step(model, clip_grad)
    mark()
    names = ("forward", "loss", "backward", "clip + AdamW step")
    return {name: 1e3 * (b - a) for name, a, b in zip(names, marks, marks[1:])}


def main() -> None:
    opts = parse_args()
    device = utils.select_device(opts.device)
    argv = ["--height", str(opts.height), "--width", str(opts.width), "--batch-size", str(opts.batch_size),
            "--features", *map(str, opts.features), "--amp", opts.amp]
    if opts.channels_last is not None:
        argv.append("--channels-last" if opts.channels_last else "--no-channels-last")
    args = train.parse_args(argv)[0]
    amp_dtype = utils.autocast_dtype(device, args.amp)
    memory_format = utils.memory_format(device, args.channels_last)  # as train.Setup picks it
    images, masks = common.fixed_batch(args, device, memory_format)
    model = UNet(features=args.features).to(device, memory_format=memory_format).train()
    opt = train.Optimization.create(model, args, device, steps_per_epoch=opts.warmup + opts.steps + 1)

    def step() -> None:
        train.train_step(model, images, masks, opt, amp_dtype, args.clip_grad, bce_dice_loss)

    for _ in range(opts.warmup):
        step()
    phases = [phase_times(model, images, masks, opt, amp_dtype, args.clip_grad) for _ in range(opts.steps)]
    phase_ms = {name: common.median([p[name] for p in phases]) for name in phases[0]}
    kinds_ms = profile_kinds(step)
    dtype = amp_dtype or torch.float32
    gemm = common.gemm_tflops(device, dtype=dtype)
    peak, peak_source = common.peak_tflops(device, opts.peak_tflops, dtype)
    flops = conv_flops(args.features, args.batch_size, args.height, args.width)
    loader_ms = None
    if (pairs := ds.find_pairs(opts.data_dir)[:32] if Path(opts.data_dir).is_dir() else []):
        stages = bench_loader.stage_profile(pairs, args.height, args.width)
        loader_ms = args.batch_size * sum(stages[name] for name in (
            "JPEG decode, draft mode (load_image)", "GIF decode + resize (load_mask_resized)",
            "train transforms (albumentations)", "to_tensors"))
    result = {"machine": common.machine(device), "device_name": utils.device_name(device), "settings": vars(opts),
              "amp": str(dtype).removeprefix("torch."), "channels_last": memory_format == torch.channels_last,
              "phase_ms": phase_ms, "kind_ms": kinds_ms, "conv_flops": flops, "gemm_tflops": gemm,
              "peak_tflops": peak, "peak_source": peak_source, "loader_ms_per_batch": loader_ms}
    print(report(result))
    common.write_json(result, opts.json)


def report(r: dict[str, Any]) -> str:
    """The two markdown tables: phases, and operator kinds with the convolutions' rate."""
    s = r["settings"]
    step_ms = sum(r["phase_ms"].values())
    profiled_ms = sum(r["kind_ms"].values())
    head = (f"UNet {s['features']} at {s['height']}x{s['width']}, batch {s['batch_size']}, on {r['device_name']}: "
            f"{r['amp']}, {'channels_last' if r['channels_last'] else 'NCHW'}; median of {s['steps']} steps.\n"
            f"{r['amp']} GEMM (2048x2048) measured after: {r['gemm_tflops'] * 1e3:.0f} GFLOP/s; nominal peak: "
            f"{common.fmt(r['peak_tflops'] and r['peak_tflops'] * 1e3, 0)} GFLOP/s ({r['peak_source']}).\n"
            f"machine: {r['machine']}\n")
    phase_rows = [[name, f"{ms:,.0f}", f"{100 * ms / step_ms:.0f}%"] for name, ms in r["phase_ms"].items()]
    phase_rows.append(["whole step", f"{step_ms:,.0f}", "100%"])
    if r["loader_ms_per_batch"] is not None:
        phase_rows.append(["loader: decode + augment one batch, CPU ms (in the workers, overlapped)",
                           f"{r['loader_ms_per_batch']:,.0f}", f"{100 * r['loader_ms_per_batch'] / step_ms:.0f}%"])
    kind_rows = []
    for kind, ms in r["kind_ms"].items():
        rate = ""
        direction = {"convolutions, forward": "forward", "convolutions, backward": "backward"}.get(kind)
        if direction and ms > 0:
            gflops = r["conv_flops"][direction] / (ms / 1e3) / 1e9
            of_peak = f", {100 * gflops / (r['peak_tflops'] * 1e3):.0f}% of peak" if r["peak_tflops"] else ""
            rate = (f"{r['conv_flops'][direction] / 1e9:,.0f} GFLOP at {gflops:,.0f} GFLOP/s: "
                    f"{100 * gflops / (r['gemm_tflops'] * 1e3):.0f}% of the GEMM{of_peak}")
        kind_rows.append([kind, f"{ms:,.0f}", f"{100 * ms / profiled_ms:.0f}%", rate])
    conv_share = sum(r["kind_ms"][kind] for kind, _ in KINDS[:2]) / profiled_ms
    ceiling = (f"\nThe convolutions take {100 * conv_share:.0f}% of the profiled step: with everything else free, "
               f"the step could run at most {1 / conv_share:.2f}x as fast without faster convolutions.")
    return (head + "\n" + common.markdown_table(["phase", "ms", "share of the step"], phase_rows) + "\n\n"
            + common.markdown_table(["operator kind (one profiled step, self CPU time)", "ms", "share",
                                     "convolutions: FLOPs, rate"], kind_rows) + "\n" + ceiling)


if __name__ == "__main__":
    main()
