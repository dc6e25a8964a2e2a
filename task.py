"""Binary or multi-class: the one place that decides what the model's outputs mean.

A binary model (--classes 1) has one logit per pixel (car or not), trained with BCE + soft Dice; a
multi-class model has one logit per class, trained with softmax cross-entropy + soft Dice. Training,
evaluation and prediction all ask the task for the loss, the probabilities, the decided mask and the
metrics, instead of looking at the number of channels themselves.
"""
from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from utils import BinaryMetrics, MulticlassMetrics


def bce_dice_loss(logits: torch.Tensor, target: torch.Tensor, per_image: bool = False,
                  weight: torch.Tensor | None = None) -> torch.Tensor:
    """BCE-with-logits plus soft Dice over the batch, in fp32 for stability under autocast; per_image=True gives
    one loss per image, shape (N,), whose sum does not depend on the batching; weight (like target) weighs pixels."""
    logits = logits.float()
    dims = tuple(range(1 if per_image else 0, logits.ndim))
    bce = F.binary_cross_entropy_with_logits(logits, target, weight=weight, reduction="none").mean(dims)
    prob = torch.sigmoid(logits)
    w = 1.0 if weight is None else weight
    inter = (w * prob * target).sum(dims)
    soft_dice = (2 * inter + 1) / ((w * prob).sum(dims) + (w * target).sum(dims) + 1)
    return bce + (1 - soft_dice)


def edge_weights(target: torch.Tensor, kernel: int, weight: float) -> torch.Tensor:
    """Pixel weights (N, 1, H, W): `weight` on the band around the mask's edge (where its kernel-wide box average is
    neither car nor background), 1 elsewhere, scaled to a mean of 1 in each image, so the loss keeps its size and an
    image's loss does not depend on the others in its batch."""
    pad = kernel // 2  # a box filter is separable: a column average, then a row average; borders average what is there
    local = F.avg_pool2d(target.float(), (kernel, 1), stride=1, padding=(pad, 0), count_include_pad=False)
    local = F.avg_pool2d(local, (1, kernel), stride=1, padding=(0, pad), count_include_pad=False)
    w = 1 + (weight - 1) * ((local > 0.01) & (local < 0.99)).float()
    return w / w.mean(dim=(1, 2, 3), keepdim=True)


def edge_kernel(height: int) -> int:
    """The edge band's box size at a training height: 41 pixels at 1024 (the first-place Carvana solution's), odd."""
    return max(3, 2 * round(20 * height / 1024) + 1)


def ce_dice_loss(logits: torch.Tensor, target: torch.Tensor, ignore_index: int = 255) -> torch.Tensor:
    """Softmax cross-entropy plus soft Dice averaged over the classes, over the labelled pixels of the batch
    (none gives 0, not NaN); fp32. logits (N, C, H, W), target int64 (N, H, W) class indices."""
    logits = logits.float()
    labelled = target != ignore_index
    ce = F.cross_entropy(logits, target, ignore_index=ignore_index, reduction="sum") / labelled.sum().clamp_min(1)
    weight = labelled.unsqueeze(1).float()
    prob = logits.softmax(dim=1) * weight
    one_hot = F.one_hot(target.where(labelled, 0), logits.shape[1]).permute(0, 3, 1, 2).float() * weight
    dims = (0, 2, 3)
    soft_dice = (2 * (prob * one_hot).sum(dims) + 1) / (prob.sum(dims) + one_hot.sum(dims) + 1)
    return ce + (1 - soft_dice.mean())


def keep_largest_region(mask: np.ndarray) -> np.ndarray:
    """A boolean mask's largest 8-connected region with its holes filled: one car, so stray blobs (on the floor
    below it) go, and so do holes in it."""
    import cv2  # albumentations' OpenCV
    count, regions, stats, _ = cv2.connectedComponentsWithStats(mask.astype(np.uint8), connectivity=8)
    if count <= 1:
        return mask.astype(bool)
    car = regions == 1 + stats[1:, cv2.CC_STAT_AREA].argmax()
    # Background regions (4-connected, the complement of 8-connectivity) that touch no border are holes.
    count, regions = cv2.connectedComponents((~car).astype(np.uint8), connectivity=4)
    outside = np.unique(np.concatenate([regions[0], regions[-1], regions[:, 0], regions[:, -1]]))
    return car | ~np.isin(regions, outside)


class BinaryTask:
    """One logit per pixel (car or not): BCE + soft Dice on coverage targets, a car where its probability is high."""

    classes = 1
    ignore_index = 255  # no pixel of a binary mask holds it
    best_name = "Dice (over all pixels)"  # what best.pt is chosen by
    # evaluate.py's table: (title, metrics key, column width), then what the columns mean.
    table = (("mean Dice", "mean_dice", 10), ("Dice", "dice", 9), ("mean IoU", "mean_iou", 10),
             ("IoU", "iou", 9), ("accuracy", "acc", 10))
    table_note = ("mean Dice = mean of per-image Dice (Kaggle's metric); Dice = over all pixels of the set; "
                  "one region = predict.py --postprocess: only the largest region, its holes filled")

    def __init__(self, edge_weight: float = 1.0, edge_kernel: int = 11):
        self.edge_weight, self.edge_kernel = edge_weight, edge_kernel

    def loss(self, logits: torch.Tensor, masks: torch.Tensor, per_image: bool = False) -> torch.Tensor:
        """The batch's loss, or with per_image one loss per image (N,); --edge-weight weighs the car's outline."""
        weight = edge_weights(masks, self.edge_kernel, self.edge_weight) if self.edge_weight != 1 else None
        return bce_dice_loss(logits, masks, per_image=per_image, weight=weight)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Float32 car probabilities (N, 1, H, W)."""
        return logits.float().sigmoid()

    def labels(self, probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
        """Boolean masks (N, H, W): car where the probability is above the threshold."""
        return probs[:, 0] > threshold

    def truth(self, masks: torch.Tensor) -> torch.Tensor:
        """Target masks for the metrics: coverage (or {0, 1}) above one half."""
        return masks > 0.5

    def metrics(self, device: torch.device) -> BinaryMetrics:
        return BinaryMetrics(device)

    def describe(self, m: dict[str, Any]) -> str:
        """The scores of a metrics dict in one line."""
        return (f"Dice {m['dice']:.4f} (mean per image {m['mean_dice']:.4f})  IoU {m['iou']:.4f}  "
                f"acc {m['acc']:.4f}")


class MulticlassTask:
    """One logit per class: softmax cross-entropy + soft Dice, the likeliest class per pixel."""

    best_name = "Dice (mean over foreground classes)"
    table = (("Dice fg", "dice", 10), ("IoU fg", "iou", 9), ("Dice all", "dice_all", 10),
             ("IoU all", "iou_all", 9), ("accuracy", "acc", 10))
    table_note = ("fg = mean over the foreground classes 1..N-1, all = mean including background (class 0); "
                  "over all pixels of the set, --ignore-index pixels left out")

    def __init__(self, classes: int, ignore_index: int = 255):
        self.classes, self.ignore_index = classes, ignore_index

    def loss(self, logits: torch.Tensor, masks: torch.Tensor, per_image: bool = False) -> torch.Tensor:
        """The batch's loss, or with per_image one loss per image (N,)."""
        if per_image:
            return torch.stack([ce_dice_loss(l[None], m[None], self.ignore_index) for l, m in zip(logits, masks)])
        return ce_dice_loss(logits, masks, self.ignore_index)

    def probabilities(self, logits: torch.Tensor) -> torch.Tensor:
        """Float32 class probabilities (N, C, H, W)."""
        return logits.float().softmax(dim=1)

    def labels(self, probs: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
        """Class indices (N, H, W) as uint8: the likeliest class (the threshold is for binary models)."""
        return probs.argmax(dim=1).to(torch.uint8)

    def truth(self, masks: torch.Tensor) -> torch.Tensor:
        """Target class indices: the masks themselves (ignore_index pixels are skipped by the metrics)."""
        return masks

    def metrics(self, device: torch.device) -> MulticlassMetrics:
        return MulticlassMetrics(self.classes, self.ignore_index, device)

    def describe(self, m: dict[str, Any]) -> str:
        """The scores of a metrics dict in one line, saying which classes each mean covers."""
        per_class = " ".join(f"{v:.3f}" for v in m["class_iou"])
        return (f"mean over foreground classes: Dice {m['dice']:.4f} IoU {m['iou']:.4f}  incl. background: "
                f"Dice {m['dice_all']:.4f} IoU {m['iou_all']:.4f}  IoU per class 0..{self.classes - 1} "
                f"[{per_class}]  acc {m['acc']:.4f}")


Task = BinaryTask | MulticlassTask


def make_task(classes: int, ignore_index: int = 255, edge_weight: float = 1.0, height: int = 256) -> Task:
    """The task of a model with `classes` outputs: binary for 1 (its loss weighing the outline by edge_weight at
    this training height), multi-class otherwise."""
    return BinaryTask(edge_weight, edge_kernel(height)) if classes == 1 else MulticlassTask(classes, ignore_index)
