"""Training-step throughput, peak memory, FLOPs/MFU and loader throughput: plain baseline vs the project.

    python benchmarks/bench_train.py --json bench.json               # 160x240, batch 8, 3 pairs
    python benchmarks/bench_train.py --height 1280 --width 1918      # full Carvana size (the UNet pads)

Both sides train the same UNet on the same fixed batch held in memory (pure compute) with
train.train_step and train.Optimization:
  baseline: fp32, NCHW, no autocast;
  project:  train.py's defaults for the device (bf16 autocast where utils.autocast_dtype picks it,
            channels_last), and with --compile, torch.compile as train.py --compile does.
Each measurement runs in a fresh process (so the CPU's peak-RSS high-water mark belongs to it
alone), baseline and project alternately, --pairs times; the table gives medians and the median of
the per-pair ratios. Loader rows come from bench_loader.py (skip them with --images 0).
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

import common
import bench_loader
import dataset as ds
import train
import utils
from model import UNet
from task import bce_dice_loss

VARIANTS = ("baseline", "project")


def variant_args(opts: argparse.Namespace, variant: str) -> argparse.Namespace:
    """train.py's settings of one side."""
    args = bench_loader.project_args(opts.height, opts.width, opts.batch_size, opts.workers, opts.features)
    return bench_loader.baseline_args(args) if variant == "baseline" else args


def measure_steps(opts: argparse.Namespace, variant: str) -> dict[str, Any]:
    """Median time of a training step on a fixed batch, and the peak memory of training (fresh process)."""
    args = variant_args(opts, variant)
    device = utils.select_device(opts.device)
    amp_dtype = utils.autocast_dtype(device, args.amp)
    memory_format = utils.memory_format(device, args.channels_last)  # as train.Setup picks it
    images, masks = common.fixed_batch(args, device, memory_format)
    rss_before = common.max_rss_mb()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        allocated_before = torch.cuda.memory_allocated(device)
    model = UNet(features=args.features).to(device, memory_format=memory_format)
    opt = train.Optimization.create(model, args, device, steps_per_epoch=opts.warmup + opts.steps)
    if opts.compile and variant == "project":
        model = torch.compile(model)  # as train.py --compile; the warm-up steps pay for compiling
    model.train()

    def step() -> None:
        train.train_step(model, images, masks, opt, amp_dtype, args.clip_grad, bce_dice_loss)

    for _ in range(opts.warmup):
        common.timed(step, device)
    seconds = [common.timed(step, device) for _ in range(opts.steps)]
    step_s = common.median(seconds)
    gemm = common.gemm_tflops(device)  # right after the steps: the same spell of the machine's load
    if device.type == "cuda":
        peak_mb = (torch.cuda.max_memory_allocated(device) - allocated_before) / 2**20
    else:
        peak_mb = common.max_rss_mb() - rss_before  # the rise of this fresh process's high-water mark
    return {"amp": str(amp_dtype).replace("torch.", "") if amp_dtype else "fp32",
            "channels_last": memory_format == torch.channels_last, "step_s": step_s, "img_s": args.batch_size / step_s,
            "peak_memory_mb": peak_mb, "gemm_tflops": gemm, "step_seconds": seconds}


def _child(opts: argparse.Namespace, variant: str, queue: mp.Queue) -> None:
    queue.put(measure_steps(opts, variant))


def measure_in_fresh_process(opts: argparse.Namespace, variant: str) -> dict[str, Any]:
    """measure_steps in a spawned process: its own memory high-water mark and allocator state."""
    context = mp.get_context("spawn")
    queue = context.Queue()
    process = context.Process(target=_child, args=(opts, variant, queue))
    process.start()
    result = queue.get()
    process.join()
    return result


def flops_per_image(features: list[int], height: int, width: int) -> float:
    """Forward + backward FLOPs of one image, counted by FlopCounterMode on the meta device (no compute)."""
    model = UNet(features=features).to("meta")
    x = torch.empty(1, 3, height, width, device="meta")
    with FlopCounterMode(display=False) as counter:
        model(x).float().mean().backward()
    return float(counter.get_total_flops())


def report(opts: argparse.Namespace, info: dict[str, Any], steps: list[dict[str, Any]], flops: float,
           peak: float | None, peak_source: str, loader: dict[str, Any] | None) -> str:
    """The markdown table."""
    med = {v: {k: common.median([p[v][k] for p in steps]) for k in ("img_s", "peak_memory_mb")} for v in VARIANTS}
    mfu = {v: (med[v]["img_s"] * flops / (peak * 1e12) if peak else None) for v in VARIANTS}
    of_gemm = {v: common.median([p[v]["img_s"] * flops / (p[v]["gemm_tflops"] * 1e12) for p in steps])
               for v in VARIANTS}
    gemm = common.median([p[v]["gemm_tflops"] for p in steps for v in VARIANTS])
    ratio = {k: common.median_ratio(steps, k) for k in ("img_s", "peak_memory_mb")}
    amp = {v: steps[0][v]["amp"] + (", channels_last" if steps[0][v]["channels_last"] else ", NCHW") for v in VARIANTS}
    amp["project"] += ", torch.compile" if opts.compile else ""
    gemm_name = str(common.gemm_dtype(torch.device(info["device"]))).removeprefix("torch.")
    rows = [
        ["training step: img/s", common.fmt(med["baseline"]["img_s"], 2), common.fmt(med["project"]["img_s"], 2),
         common.ratio_text(ratio["img_s"])],
        ["peak memory of training (MB)", common.fmt(med["baseline"]["peak_memory_mb"], 0),
         common.fmt(med["project"]["peak_memory_mb"], 0), common.ratio_text(ratio["peak_memory_mb"])],
        ["MFU (of the peak below)", _pct(mfu["baseline"]), _pct(mfu["project"]),
         common.ratio_text(ratio["img_s"])],
        [f"fraction of the {gemm_name} GEMM rate measured beside it", _pct(of_gemm["baseline"]),
         _pct(of_gemm["project"]), common.ratio_text(ratio["img_s"])],
    ]
    head = (f"UNet {opts.features} at {opts.height}x{opts.width}, batch {opts.batch_size}, on {info['device']}; "
            f"median of {opts.pairs} pairs ({opts.steps} timed steps after {opts.warmup} warm-up each).\n"
            f"baseline: {amp['baseline']}; project: {amp['project']}.\n"
            f"FLOPs per image (forward + backward): {flops / 1e9:,.1f} GFLOP; "
            f"peak assumed: {common.fmt(peak, 3)} TFLOP/s ({peak_source}); "
            f"{gemm_name} GEMM rate measured after each measurement (median): {gemm:.3f} TFLOP/s.\n"
            f"machine: {info}\n")
    table = common.markdown_table(["measurement", "baseline", "project", "ratio (median of pairs)"], rows)
    if loader is not None:
        table += "\n\n" + bench_loader.loader_table(loader["summary"], loader["workers"])
        table += "\n\n" + bench_loader.profile_table(loader["stage_cpu_ms"])
    return head + "\n" + table


def _pct(value: float | None) -> str:
    return "–" if value is None else f"{100 * value:.1f}%"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    # --data-dir --height --width --batch-size --workers --images --pairs --device --json
    bench_loader.add_loader_args(p)
    p.add_argument("--features", type=int, nargs="+", default=[64, 128, 256, 512])
    p.add_argument("--steps", type=int, default=5, help="timed training steps per measurement")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (oneDNN/cuDNN algorithm choice)")
    p.add_argument("--compile", action="store_true", help="the project side runs torch.compile'd (train.py --compile)")
    p.add_argument("--peak-tflops", type=float, default=None, help="the device's peak, overriding the assumed one")
    opts = p.parse_args()
    opts.workers = bench_loader.project_args(opts.height, opts.width, opts.batch_size, opts.workers).workers
    return opts


def main() -> None:
    opts = parse_args()
    device = utils.select_device(opts.device)
    info = common.machine(device)  # the load average as the runs start
    steps = []
    for _ in range(opts.pairs):  # alternate, so slow spells of a shared machine hit both sides alike
        steps.append({v: measure_in_fresh_process(opts, v) for v in VARIANTS})
    flops = flops_per_image(opts.features, opts.height, opts.width)
    peak, peak_source = common.peak_tflops(device, opts.peak_tflops)
    loader = None
    if opts.images > 0:
        pairs = ds.find_pairs(opts.data_dir)[:opts.images]
        args = variant_args(opts, "project")
        results = bench_loader.measure_loaders(pairs, args, device, opts.pairs)
        loader = {"workers": args.workers, "pairs": results, "summary": bench_loader.summarize(results),
                  "stage_cpu_ms": bench_loader.stage_profile(pairs[:32], opts.height, opts.width)}
    info["load_average_end"] = common.load_average()
    print(report(opts, info, steps, flops, peak, peak_source, loader))
    common.write_json({"machine": info, "settings": vars(opts), "flops_per_image": flops,
                       "peak_tflops": peak, "peak_source": peak_source, "steps": steps, "loader": loader},
                      opts.json)


if __name__ == "__main__":
    main()
