"""How far mixed precision moves one training step's gradient, next to how far another batch moves it.

    python benchmarks/grad_precision.py --features 16 32 64 128            # a fresh UNet
    python benchmarks/grad_precision.py --checkpoint runs/x/last.pt        # a trained one

On one batch of real Carvana pairs (training transforms, fixed seed), the gradient of train.py's
loss is computed in fp32 NCHW (the reference), then as the project computes it (channels_last, and
the device's autocast dtype), then in fp32 channels_last (only the order of the sums changes), and
in fp32 on a second batch (what SGD's own noise looks like). Each row gives the relative error
|g - g_ref| / |g_ref| over all parameters, and its median and worst layer. No pass changes the
weights (no optimizer step), and in training mode BatchNorm normalises with each batch's own
statistics, so every pass sees the same model.
"""
from __future__ import annotations

import argparse
from pathlib import Path
from typing import Sequence

import torch

import common
import dataset as ds
import utils
from model import UNet
from task import bce_dice_loss

Gradients = dict[str, torch.Tensor]


def batch_of(pairs: Sequence[tuple[Path, Path]], height: int, width: int,
             seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(images, masks) of these pairs through the training transforms, augmented reproducibly."""
    data = ds.SegmentationDataset(pairs, height, width, ds.train_transforms(height, width))
    images, masks = zip(*(data[(i, seed + i)] for i in range(len(pairs))))
    return torch.stack(images), torch.stack(masks)


def gradients(model: torch.nn.Module, batch: tuple[torch.Tensor, torch.Tensor], device: torch.device,
              amp_dtype: torch.dtype | None, channels_last: bool) -> Gradients:
    """Each parameter's gradient of train.py's loss on the batch, the weights left as they were."""
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=memory_format).train().zero_grad()
    images = batch[0].to(device, memory_format=memory_format)
    with utils.autocast(device, amp_dtype):
        logits = model(images)
    bce_dice_loss(logits, batch[1].to(device)).backward()
    return {name: p.grad.detach().clone() for name, p in model.named_parameters()}


def relative_errors(grads: Gradients, reference: Gradients) -> dict[str, float]:
    """|g - g_ref| / |g_ref| for all parameters together ("total") and for each layer."""
    errors = {name: ((grads[name] - ref).norm() / ref.norm()).item()
              for name, ref in reference.items() if ref.norm() > 0}
    difference = torch.cat([(grads[name] - ref).flatten() for name, ref in reference.items()])
    errors["total"] = (difference.norm() / torch.cat([r.flatten() for r in reference.values()]).norm()).item()
    return errors


def error_row(label: str, errors: dict[str, float]) -> list[str]:
    """label, then the total error, the median layer's, the worst layer's and the 1x1 head's."""
    layers = {name: e for name, e in errors.items() if name != "total"}
    worst = max(layers, key=layers.get)
    ordered = sorted(layers.values())
    return [label, f"{errors['total']:.4f}", f"{ordered[len(ordered) // 2]:.4f}", f"{layers[worst]:.4f} ({worst})",
            f"{errors.get('head.weight', float('nan')):.4f}"]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=common.DEFAULT_DATA_DIR, help="Carvana in Kaggle's layout")
    p.add_argument("--checkpoint", default=None, help="a train.py checkpoint (default: a fresh UNet)")
    p.add_argument("--features", type=int, nargs="+", default=[64, 128, 256, 512], help="for a fresh UNet")
    p.add_argument("--height", type=int, default=160)
    p.add_argument("--width", type=int, default=240)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seed", type=int, default=0, help="initialisation of a fresh UNet and augmentation")
    p.add_argument("--device", default="auto")
    p.add_argument("--amp", choices=("auto", "bf16", "fp16"), default="auto", help="the precision to compare")
    opts = p.parse_args()
    device = utils.select_device(opts.device)
    amp_dtype = utils.autocast_dtype(device, opts.amp)
    torch.manual_seed(opts.seed)
    if opts.checkpoint:
        model = utils.model_from_checkpoint(utils.load_checkpoint(opts.checkpoint), opts.checkpoint)
    else:
        model = UNet(features=opts.features)
    model.to(device)
    pairs = ds.find_pairs(opts.data_dir)
    n = opts.batch_size
    if len(pairs) < 2 * n:
        raise SystemExit(f"error: {opts.data_dir} has {len(pairs)} pairs; two batches of {n} need {2 * n}")
    # The two batches come from far apart in the sorted list: other cars, as two shuffled batches would be.
    first, second = (batch_of(chunk, opts.height, opts.width, opts.seed) for chunk in (pairs[:n], pairs[-n:]))
    reference = gradients(model, first, device, None, channels_last=False)
    rows = [
        error_row(f"project: channels_last, {str(amp_dtype or 'fp32').removeprefix('torch.')} autocast",
                  relative_errors(gradients(model, first, device, amp_dtype, True), reference)),
        error_row("fp32, channels_last (sum order only)",
                  relative_errors(gradients(model, first, device, None, True), reference)),
        error_row("fp32, another batch (SGD's own noise)",
                  relative_errors(gradients(model, second, device, None, False), reference)),
    ]
    weights = opts.checkpoint or f"a fresh UNet {opts.features} (seed {opts.seed})"
    print(f"gradient of one batch of {n} at {opts.height}x{opts.width}, {weights}; reference: fp32 NCHW\n"
          f"machine: {common.machine(device)}\n")
    print(common.markdown_table(["gradient", "relative error, all parameters", "median layer", "worst layer",
                                 "head (1x1 conv)"], rows))


if __name__ == "__main__":
    main()
