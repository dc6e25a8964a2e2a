"""ONNX Runtime (fp32) against PyTorch (bf16 autocast where predict.py uses it, and fp32) on the CPU.

    python benchmarks/bench_onnx.py --checkpoint runs/NAME/best.pt --json bench-onnx.json

Timed per photo, as predict.py runs it once the photo is decoded at the training size: the model (on a batch
of 1, and of --batch-size copies of the photo, predict.py's default batch), the probabilities, the upsampling
to the photo's own size (1280x1918 for Carvana) and the threshold; the forward pass is also timed alone. The
sides alternate within each run, after 2 warm-up runs; the table gives medians. Then the full-size masks of
--agreement photos are compared pixel by pixel, ONNX Runtime against each PyTorch side.
"""
from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import DEFAULT_DATA_DIR, machine
from PIL import Image

import export  # noqa: E402 (common put the repository on sys.path)
import predict  # noqa: E402
import utils  # noqa: E402
from dataset import load_image  # noqa: E402
from task import make_task  # noqa: E402

ONNX = "ONNX Runtime fp32"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", type=Path, required=True, help="a .pt written by train.py")
    parser.add_argument("--photos", type=Path, default=Path(DEFAULT_DATA_DIR) / "train",
                        help="folder of photos; the first is timed (default: %(default)s)")
    parser.add_argument("--runs", type=int, default=7, help="timed runs per side and batch (default: 7)")
    parser.add_argument("--batch-size", type=int, default=8, help="the larger batch timed (default: 8)")
    parser.add_argument("--agreement", type=int, default=16, help="photos whose masks are compared (default: 16)")
    parser.add_argument("--json", type=Path, help="also write the results here")
    return parser.parse_args(argv)


def predict_batch(model, x: torch.Tensor, size: tuple[int, int],
                  dtype: torch.dtype | None) -> tuple[float, float, torch.Tensor]:
    """(seconds of the forward pass, seconds of the whole path, the last mask) for a batch of photos of one size."""
    task, cpu = make_task(model.config["out_channels"]), torch.device("cpu")
    with torch.inference_mode(), utils.autocast(cpu, dtype):
        start = time.perf_counter()
        probs = task.probabilities(model(x))
        forward = time.perf_counter() - start
        for prob in probs:  # one photo at a time, as predict.predict_paths
            mask = task.labels(predict.upsample_to(prob[None], size))[0]
    return forward, time.perf_counter() - start, mask


def photo_tensor(path: Path, size: tuple[int, int], channels: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """(the photo as predict.py feeds it to the model, (1, C, h, w) channels_last in [0, 1]; its own (H, W))."""
    with Image.open(path) as img:
        full = (img.height, img.width)
    pixels = torch.from_numpy(load_image(path, size, channels).copy()).permute(2, 0, 1)[None]
    return pixels.float().div(255).contiguous(memory_format=torch.channels_last), full


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory() as tmp:
        onnx_file = Path(tmp) / "model.onnx"
        if export.main(["--checkpoint", str(args.checkpoint), "--output", str(onnx_file)]) != 0:
            raise SystemExit(1)
        onnx_model, size = predict.load_segmentation_model(onnx_file, cpu)
    model, _ = predict.load_segmentation_model(args.checkpoint, cpu)
    sides = {"PyTorch fp32": (model, None), ONNX: (onnx_model, None)}
    if utils.autocast_dtype(cpu) == torch.bfloat16:  # predict.py's default on CPUs with bf16 units
        sides = {"PyTorch bf16 autocast (predict.py's default here)": (model, torch.bfloat16), **sides}
    photos = sorted(p for p in args.photos.iterdir() if p.suffix.lower() in predict.IMAGE_EXTENSIONS)
    channels = model.config["in_channels"]
    x, full = photo_tensor(photos[0], size, channels)
    print(f"{photos[0].name} ({full[1]}x{full[0]}), model at {size[0]}x{size[1]}, {args.runs} runs, "
          f"torch threads {torch.get_num_threads()}, load average at the start {machine(cpu)['load_average']}")
    print("| side | batch | forward (ms a photo) | forward + probabilities + upsample + threshold (ms a photo) "
          "| time / ONNX Runtime's |\n|---|---|---|---|---|")
    results = []
    for batch in (1, args.batch_size):
        times: dict[str, list[tuple[float, float]]] = {name: [] for name in sides}
        xs = x.repeat(batch, 1, 1, 1).contiguous(memory_format=torch.channels_last)
        for run in range(args.runs + 2):
            for name, (m, dtype) in sides.items():
                forward, total, _ = predict_batch(m, xs, full, dtype)
                if run >= 2:
                    times[name].append((forward / batch, total / batch))
        medians = {name: [statistics.median(t[i] for t in ts) * 1e3 for i in (0, 1)] for name, ts in times.items()}
        for name, (forward, total) in medians.items():
            print(f"| {name} | {batch} | {forward:.0f} | {total:.0f} | {total / medians[ONNX][1]:.2f}x |")
            results.append({"side": name, "batch": batch, "forward_ms": forward, "per_photo_ms": total})
    print(f"load average at the end {machine(cpu)['load_average']}")

    agreement: dict[str, list[float]] = {name: [] for name in sides if name != ONNX}
    for path in photos[:args.agreement]:
        x, full = photo_tensor(path, size, channels)
        reference = predict_batch(onnx_model, x, full, None)[2]
        for name in agreement:
            m, dtype = sides[name]
            agreement[name].append((predict_batch(m, x, full, dtype)[2] == reference).float().mean().item())
    for name, values in agreement.items() if args.agreement else ():
        print(f"masks of {len(values)} photos, ONNX Runtime vs {name}: {100 * sum(values) / len(values):.4f}% "
              f"of pixels equal (lowest photo {100 * min(values):.4f}%)")
    if args.json:
        report = {"machine": machine(cpu), "photo": photos[0].name, "size": size, "runs": args.runs,
                  "results": results, "agreement": agreement}
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
