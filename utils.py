"""Checkpoints, segmentation metrics (binary and multi-class), prediction images, training curves and Kaggle's RLE."""
from __future__ import annotations

import argparse
import contextlib
import csv
import os
import pickle
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from model import UNet


# ---------------------------------------------------------------------------------------------
# Checkpoints
# ---------------------------------------------------------------------------------------------

class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used: missing, truncated, unsafe, or for another model."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> None:
    """Write a checkpoint atomically: a kill or a full disk mid-save leaves the old file intact."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows
    finally:
        tmp.unlink(missing_ok=True)


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Load a checkpoint with weights_only=True, so a pickle that would run code is refused."""
    path = Path(path)
    if path.is_dir():
        path = path / "last.pt"
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # arbitrary bytes make torch's loader fail in many ways (KeyError, OSError, ...)
        if isinstance(e, pickle.UnpicklingError) and "Weights only load failed" in str(e):
            raise CheckpointError(
                f"{path}: refused to load: it holds objects other than tensors and plain data (a pickle "
                f"that could run code). Only load checkpoints you trust and that this repository made.") from None
        raise CheckpointError(f"{path}: not a readable PyTorch checkpoint (truncated or another format): "
                              f"{_first_line(e)}") from None
    if not isinstance(state, dict) or "model" not in state or "model_config" not in state:
        raise CheckpointError(f"{path}: not a checkpoint of this repository (expected the keys "
                              f"'model' and 'model_config', as train.py writes)")
    return state


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def model_from_checkpoint(state: dict[str, Any], path: str | Path = "checkpoint") -> UNet:
    """Rebuild the UNet a checkpoint was trained with and load its weights."""
    try:
        model = UNet(**state["model_config"])
        model.load_state_dict(state["model"])
    except (TypeError, RuntimeError, KeyError) as e:
        raise CheckpointError(f"{path}: its weights do not fit the model it describes "
                              f"({state.get('model_config')}): {_first_line(e)}")
    return model


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[UNet, dict[str, Any]]:
    """(model in eval mode on device, checkpoint dict) from a checkpoint file or run folder."""
    state = load_checkpoint(path)
    model = model_from_checkpoint(state, path).to(device).eval()
    return model, state


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help with each flag's default (unless it is None/False or the help names it), docstring kept as written."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default in (None, False, argparse.SUPPRESS) or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


# ---------------------------------------------------------------------------------------------
# Devices and precision
# ---------------------------------------------------------------------------------------------

def select_device(name: str = "auto", local_rank: int = 0) -> torch.device:
    """'auto' -> cuda (this process's GPU under torchrun), then mps, then cpu; other names are checked."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise ValueError(f"--device {name}: not a device name (try auto, cpu, cuda, cuda:1 or mps)") from None
    if device.type == "cuda" and (not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()):
        raise ValueError(f"--device {name}: no such CUDA device here")
    if device.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise ValueError(f"--device {name}: MPS is not available here")
    return device


def autocast_dtype(device: torch.device, amp: str = "auto") -> torch.dtype | None:
    """The autocast dtype for amp ('auto', 'bf16', 'fp16', 'off') on this device; None means fp32."""
    if amp == "off":
        return None
    if amp in ("bf16", "fp16"):
        return torch.bfloat16 if amp == "bf16" else torch.float16
    if device.type == "cuda":
        # GPUs before Ampere only emulate bf16: use fp16 there (with a grad scaler when training).
        return torch.bfloat16 if torch.cuda.is_bf16_supported(including_emulation=False) else torch.float16
    if device.type == "cpu" and _cpu_has_native_bf16():
        return torch.bfloat16  # about 2x faster than fp32 on CPUs with AVX512-BF16 or AMX
    return None


def _cpu_has_native_bf16() -> bool:
    """True on CPUs with AVX512-BF16 or AMX; elsewhere oneDNN emulates bf16, slower than fp32."""
    return any(getattr(torch.cpu, name, lambda: False)()
               for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported"))


def autocast(device: torch.device, dtype: torch.dtype | None):
    """torch.autocast for dtype, or a no-op context when dtype is None."""
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Metrics
# ---------------------------------------------------------------------------------------------

class SegmentationMetrics:
    """Dice, IoU and pixel accuracy accumulated over a whole set of binary masks.

    Reports both the global scores (sum of intersections over sum of sizes over every pixel of the
    set) and the mean of per-image scores (Kaggle's Carvana metric). An image whose prediction and
    target are both empty scores 1. Never averages per-batch values.
    """

    # Running sums, in this order, kept in one float64 tensor so ranks can all_reduce them at once.
    FIELDS = ("intersection", "predicted", "target", "correct", "pixels", "dice_sum", "iou_sum", "images")

    def __init__(self, device: str | torch.device = "cpu"):
        self.sums = torch.zeros(len(self.FIELDS), dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of boolean (or {0,1}) predictions and targets of shape (N, ...)."""
        pred = pred.bool().flatten(1)
        target = target.bool().flatten(1)
        inter = (pred & target).sum(1, dtype=torch.float64)
        p = pred.sum(1, dtype=torch.float64)
        t = target.sum(1, dtype=torch.float64)
        union = p + t - inter
        correct = (pred == target).sum(1, dtype=torch.float64)
        both_empty = (p + t) == 0
        dice = torch.where(both_empty, 1.0, 2 * inter / (p + t).clamp_min(1))
        iou = torch.where(both_empty, 1.0, inter / union.clamp_min(1))
        self.sums += torch.stack([inter.sum(), p.sum(), t.sum(), correct.sum(),
                                  torch.tensor(float(pred[0].numel() * pred.shape[0]), dtype=torch.float64,
                                               device=pred.device),
                                  dice.sum(), iou.sum(),
                                  torch.tensor(float(pred.shape[0]), dtype=torch.float64, device=pred.device)
                                  ]).to(self.sums.device)  # --evaluate scores CPU masks into sums on the GPU

    def compute(self) -> dict[str, float]:
        """dice, iou, acc (global over the set) and mean_dice, mean_iou (per image, averaged)."""
        s = dict(zip(self.FIELDS, self.sums.tolist()))
        denom = s["predicted"] + s["target"]
        union = denom - s["intersection"]
        images = max(s["images"], 1.0)
        return {
            "dice": 2 * s["intersection"] / denom if denom else 1.0,
            "iou": s["intersection"] / union if union else 1.0,
            "acc": s["correct"] / s["pixels"] if s["pixels"] else 0.0,
            "mean_dice": s["dice_sum"] / images,
            "mean_iou": s["iou_sum"] / images,
            "images": int(s["images"]),
        }


class MulticlassMetrics:
    """Per-class and mean IoU, Dice and pixel accuracy from one confusion matrix over a whole set of label maps.

    Pixels whose target is ignore_index count nowhere. "dice" and "iou" are the means over the
    foreground classes 1..N-1, "dice_all" and "iou_all" the means including background (class 0);
    "class_dice" and "class_iou" list every class. A class absent from both the predictions and the
    targets of the whole set has no score (nan) and is left out of the means. Never averages per-batch
    values; "mean_dice" and "mean_iou" equal "dice" and "iou" (there is no per-image mean here).
    """

    def __init__(self, classes: int, ignore_index: int = 255, device: str | torch.device = "cpu"):
        self.classes, self.ignore_index = classes, ignore_index
        # The confusion matrix (target x prediction, flattened), then the image count: one float64
        # tensor, so ranks can all_reduce it at once as they do SegmentationMetrics.sums.
        self.sums = torch.zeros(classes * classes + 1, dtype=torch.float64, device=device)

    @torch.no_grad()
    def update(self, pred: torch.Tensor, target: torch.Tensor) -> None:
        """Add a batch of predicted and target class indices, both of shape (N, H, W)."""
        images = target.shape[0]
        pred, target = pred.long().flatten(), target.long().flatten()
        valid = (target != self.ignore_index) & (target >= 0) & (target < self.classes)
        counts = torch.bincount(target[valid] * self.classes + pred[valid], minlength=self.classes ** 2)
        self.sums[:-1] += counts.to(self.sums)
        self.sums[-1] += images

    def confusion(self) -> torch.Tensor:
        """The (classes, classes) confusion matrix: row = target class, column = predicted class."""
        return self.sums[:-1].view(self.classes, self.classes).cpu()

    def compute(self) -> dict[str, Any]:
        """Means over foreground classes (dice, iou), including background (dice_all, iou_all), per class, acc."""
        cm = self.confusion()
        hits, targets, predicted = cm.diag(), cm.sum(1), cm.sum(0)
        present = (targets + predicted) > 0
        nan = torch.full_like(hits, float("nan"))
        iou = torch.where(present, hits / (targets + predicted - hits).clamp_min(1), nan)
        dice = torch.where(present, 2 * hits / (targets + predicted).clamp_min(1), nan)

        def mean(scores: torch.Tensor) -> float:
            scores = scores[~scores.isnan()]
            return scores.mean().item() if len(scores) else 1.0  # nothing to find and nothing found: perfect

        pixels = cm.sum().item()
        return {
            "dice": mean(dice[1:]), "iou": mean(iou[1:]),
            "dice_all": mean(dice), "iou_all": mean(iou),
            "class_dice": dice.tolist(), "class_iou": iou.tolist(),
            "acc": hits.sum().item() / pixels if pixels else 0.0,
            "mean_dice": mean(dice[1:]), "mean_iou": mean(iou[1:]),
            "images": int(self.sums[-1].item()),
        }


# ---------------------------------------------------------------------------------------------
# Prediction images, metrics table and curves
# ---------------------------------------------------------------------------------------------

# Class colours: background black, then Sasha Trubetskoy's 20 distinct colours; more classes get hues
# spread by the golden ratio. Indices with no class (e.g. the ignore index 255) are white.
CLASS_COLOURS = ((0, 0, 0), (230, 25, 75), (60, 180, 75), (255, 225, 25), (0, 130, 200), (245, 130, 48),
                 (145, 30, 180), (70, 240, 240), (240, 50, 230), (210, 245, 60), (250, 190, 212),
                 (0, 128, 128), (220, 190, 255), (170, 110, 40), (255, 250, 200), (128, 0, 0),
                 (170, 255, 195), (128, 128, 0), (255, 215, 180), (0, 0, 128), (128, 128, 128))


def class_colours(classes: int) -> list[tuple[int, int, int]]:
    """A distinct RGB colour per class index 0..classes-1, class 0 (background) black."""
    import colorsys
    colours = list(CLASS_COLOURS[:classes])
    for k in range(len(colours), classes):
        r, g, b = colorsys.hsv_to_rgb((k * 0.618034) % 1, 0.75, 0.95)
        colours.append((round(r * 255), round(g * 255), round(b * 255)))
    return colours


def class_palette(classes: int) -> list[int]:
    """A 256-entry PIL palette (flat RGB list): class colours, then white for indices that are no class."""
    colours = class_colours(classes)[:256]
    return [v for colour in colours + [(255, 255, 255)] * (256 - len(colours)) for v in colour]


def save_class_png(labels: np.ndarray | torch.Tensor, path: str | Path, classes: int) -> None:
    """A class-index map as a palette PNG: the pixel values are the class indices, the palette colours them."""
    from PIL import Image
    if isinstance(labels, torch.Tensor):
        labels = labels.detach().cpu().numpy()
    image = Image.fromarray(np.asarray(labels).squeeze().astype(np.uint8))
    image.putpalette(class_palette(classes))  # turns the 'L' image into 'P' with the same indices
    image.save(path)


def colorize(labels: torch.Tensor, classes: int) -> torch.Tensor:
    """uint8 (3, H, W) picture of an (H, W) class-index map in the class colours."""
    lut = torch.tensor(class_palette(classes), dtype=torch.uint8).view(256, 3)
    return lut[labels.long().clamp(0, 255)].permute(2, 0, 1)


def overlay_classes(image: torch.Tensor, labels: torch.Tensor, classes: int, alpha: float = 0.45) -> torch.Tensor:
    """uint8 (3, H, W) image with each foreground class of an (H, W) label map tinted in its colour."""
    from torchvision.utils import draw_segmentation_masks
    masks = torch.stack([labels == k for k in range(1, classes)])  # background stays untinted
    return draw_segmentation_masks(image, masks, alpha=alpha, colors=class_colours(classes)[1:])


def save_mask_png(mask: np.ndarray | torch.Tensor, path: str | Path) -> None:
    """A binary mask as a single-channel PNG: 0 background, 255 foreground."""
    from PIL import Image
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    Image.fromarray((np.asarray(mask).squeeze() > 0).astype(np.uint8) * 255, mode="L").save(path)


def overlay(image: torch.Tensor, mask: torch.Tensor, color: str = "#ff2d55", alpha: float = 0.45) -> torch.Tensor:
    """uint8 (3, H, W) image with a boolean (H, W) mask tinted over it."""
    from torchvision.utils import draw_segmentation_masks
    return draw_segmentation_masks(image, mask.bool(), alpha=alpha, colors=color)


def save_labels_png(labels: np.ndarray | torch.Tensor, path: str | Path, classes: int = 1) -> None:
    """A predicted mask as a PNG: 0/255 for a binary one (classes=1), else a palette PNG of the class indices."""
    if classes == 1:
        save_mask_png(labels, path)
    else:
        save_class_png(labels, path, classes)


def overlay_labels(image: torch.Tensor, labels: torch.Tensor, classes: int = 1) -> torch.Tensor:
    """uint8 (3, H, W) image with a boolean (H, W) mask (classes=1), or each foreground class of a label map, tinted."""
    return overlay(image, labels) if classes == 1 else overlay_classes(image, labels, classes)


def save_prediction_images(images: torch.Tensor, targets: torch.Tensor, preds: torch.Tensor,
                           names: Sequence[str], out_dir: str | Path, classes: int = 1) -> None:
    """For each image write NAME_pred.png (the mask) and NAME_panel.png: image | truth | prediction | overlay.

    Binary (classes=1): boolean (N, 1, H, W) targets and predictions, NAME_pred.png 0/255. Otherwise
    (N, H, W) class indices, NAME_pred.png a palette PNG of them, the panels in class colours.
    """
    from torchvision.utils import make_grid, save_image
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for image, target, pred, name in zip(images.cpu(), targets.cpu(), preds.cpu(), names):
        image_u8 = (image.clamp(0, 1) * 255).round().to(torch.uint8).expand(3, -1, -1).clone()  # grey -> RGB
        labels = pred.squeeze(0).bool() if classes == 1 else pred
        save_labels_png(labels, out_dir / f"{name}_pred.png", classes)
        if classes == 1:
            as_rgb = lambda m: m.squeeze(0).bool().expand(3, -1, -1).to(torch.uint8) * 255
            truth_rgb, pred_rgb = as_rgb(target), as_rgb(pred)
        else:
            truth_rgb, pred_rgb = colorize(target, classes), colorize(pred, classes)
        panel = [image_u8, truth_rgb, pred_rgb, overlay_labels(image_u8, labels, classes)]
        grid = make_grid(torch.stack(panel).float() / 255, nrow=4, padding=4, pad_value=1.0)
        save_image(grid, out_dir / f"{name}_panel.png")


METRIC_COLUMNS = ("epoch", "train_loss", "val_loss", "val_dice", "val_iou", "val_acc", "lr", "seconds")


def write_metrics_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Rewrite the per-epoch metrics table (atomically, so a kill never leaves half a file)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def read_metrics_csv(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.csv, numbers parsed; [] when it does not exist."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]


def plot_curves(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """curves.png: train/val loss and validation Dice per epoch."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [r["epoch"] for r in rows]
    fig, (ax_loss, ax_dice) = plt.subplots(1, 2, figsize=(10, 4))
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss (BCE + soft Dice)", title="Loss")
    ax_loss.legend()
    ax_dice.plot(epochs, [r["val_dice"] for r in rows], "o-", color="tab:green")
    ax_dice.set(xlabel="epoch", ylabel="Dice", title="Validation Dice (training size)")
    for ax in (ax_loss, ax_dice):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


# ---------------------------------------------------------------------------------------------
# Kaggle's run-length encoding
# ---------------------------------------------------------------------------------------------
# Kaggle numbers pixels from 1, row by row (row-major over the (1280, 1918) array, as in
# train_masks.csv), and writes "start length" pairs separated by spaces; an empty mask is "".

def rle_encode(mask: np.ndarray) -> str:
    """Kaggle's run-length encoding of a 2-D mask (nonzero = foreground); "" for an empty mask."""
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"rle_encode expects a 2-D (height, width) mask, got shape {mask.shape}")
    # Pad with background on both ends so every run has a start and an end transition.
    pixels = np.zeros(mask.size + 2, dtype=bool)
    np.not_equal(mask.ravel(), 0, out=pixels[1:-1])
    # A transition pixels[i] != pixels[i + 1] sits at 0-based mask pixel i; + 1 makes it the 1-based
    # number of a run's first pixel (a start) or of the pixel just past its last (an end).
    runs = np.flatnonzero(pixels[1:] != pixels[:-1]) + 1
    runs[1::2] -= runs[::2]  # ends -> lengths
    return " ".join(map(str, runs.tolist()))


def rle_decode(rle: str, shape: tuple[int, int]) -> np.ndarray:
    """uint8 {0, 1} mask of shape (height, width) from Kaggle's run-length encoding."""
    height, width = (int(v) for v in shape)
    if height <= 0 or width <= 0:
        raise ValueError(f"rle_decode: shape must be two positive sizes, got {tuple(shape)}")
    n = height * width
    starts, lengths = _parse_runs(rle)
    _check_runs(starts, lengths, n, (height, width))
    # +1 at each run's first pixel, -1 one past its last (0-based); the running sum is the mask.
    delta = np.zeros(n + 1, dtype=np.int8)
    np.add.at(delta, starts - 1, 1)
    np.add.at(delta, starts - 1 + lengths, -1)
    return np.cumsum(delta[:-1], dtype=np.int8).view(np.uint8).reshape(height, width)


def _parse_runs(rle: str) -> tuple[np.ndarray, np.ndarray]:
    """(starts, lengths) as int64 arrays; ValueError unless rle is whitespace-separated integer pairs."""
    tokens = rle.split()
    if len(tokens) % 2:
        raise ValueError(f"RLE has an odd number of values ({len(tokens)}): expected 'start length' pairs")
    try:
        runs = np.array(tokens, dtype=np.int64).reshape(-1, 2)
    except (ValueError, OverflowError):
        bad = next(t for t in tokens if not _is_int64(t))
        raise ValueError(f"RLE value {bad[:30]!r} is not an integer that fits in 64 bits") from None
    return runs[:, 0], runs[:, 1]


def _is_int64(token: str) -> bool:
    try:
        np.int64(token)
        return True
    except (ValueError, OverflowError):
        return False


def _check_runs(starts: np.ndarray, lengths: np.ndarray, n: int, shape: tuple[int, int]) -> None:
    """Raise ValueError unless every run lies inside the n pixels and the runs are sorted and disjoint."""
    def first(bad: np.ndarray, why: str) -> None:
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"RLE run {i + 1} ('{starts[i]} {lengths[i]}') {why}")

    first(starts < 1, "starts before pixel 1 (pixels are numbered from 1)")
    first(lengths < 1, "has a length below 1")
    # starts and lengths are now in 1..2**63-1; compare without forming start + length, which could overflow.
    first(lengths > n - starts + 1, f"ends past the last pixel {n} of a {shape[0]}x{shape[1]} mask")
    # Kaggle requires sorted pairs with no pixel listed twice.
    overlaps = np.zeros(len(starts), dtype=bool)
    overlaps[1:] = starts[1:] < starts[:-1] + lengths[:-1]
    first(overlaps, "starts before the end of the previous run (runs must be sorted and must not overlap)")
