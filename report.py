"""What a run folder holds for people to read. During training: metrics.csv and curves.png, epoch by epoch. The
validation report evaluate.py (so training's end too) writes into the checkpoint's folder: per_image.csv, worst
Dice first as failures are what one looks for; errors/NAME.jpg, error maps; dice_histogram.png; report.html, a page
opening from disk."""
from __future__ import annotations

import csv
import html
import sys
from pathlib import Path
from typing import Any, Sequence
from urllib.parse import quote

import torch
import torch.distributed as dist
from PIL import Image

import dataset as ds
import utils
from task import Task

THRESHOLDS = (0.3, 0.4, 0.5, 0.6, 0.7)
THUMBNAIL_WIDTH = 320  # keeps a page of 1,000 images light
STYLE = ("body{font:14px sans-serif;margin:16px}.row{display:flex;gap:24px;flex-wrap:wrap;align-items:flex-start}"
         "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 8px;text-align:right}"
         "figure{display:inline-block;width:296px;margin:4px}figure img{width:100%}"
         ".key{display:inline-block;width:12px;height:12px}")
LEGEND = ((utils.FP_COLOUR, "false positive: a foreground the truth does not have"),
          (utils.FN_COLOUR, "false negative: foreground predicted as background"), (utils.TP_COLOUR, "true positive"))


METRIC_COLUMNS = ("epoch", "train_loss", "val_loss", "val_dice", "val_iou", "val_acc", "lr", "seconds")


def write_metrics_csv(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """Rewrite the per-epoch metrics table, atomically."""
    with utils.atomic_write(path) as f:
        writer = csv.DictWriter(f, fieldnames=METRIC_COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def read_metrics_csv(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a metrics.csv, numbers parsed; [] when it does not exist."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="", encoding="utf-8") as f:
        return [{k: (int(v) if k == "epoch" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]


def plot_curves(rows: Sequence[dict[str, Any]], path: str | Path) -> None:
    """curves.png: train/val loss and validation Dice per epoch."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state
    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(10, 4))
    ax_loss, ax_dice = fig.subplots(1, 2)
    ax_loss.plot(epochs, [r["train_loss"] for r in rows], "o-", label="train")
    ax_loss.plot(epochs, [r["val_loss"] for r in rows], "o-", label="validation")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="Loss")
    ax_loss.legend()
    ax_dice.plot(epochs, [r["val_dice"] for r in rows], "o-", color="tab:green")
    ax_dice.set(xlabel="epoch", ylabel="Dice", title="Validation Dice (training size)")
    for ax in (ax_loss, ax_dice):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    with utils.atomic_write(path, "wb") as f:
        fig.savefig(f, format="png", dpi=100)


def write_progress(rows: Sequence[dict[str, Any]], out_dir: Path) -> None:
    """metrics.csv and curves.png for the epochs so far. One that another program holds locked (Excel does, on
    Windows) is left as it was, with a warning: the checkpoint keeps the rows, and the next epoch tries again."""
    for name, write in (("metrics.csv", write_metrics_csv), ("curves.png", plot_curves)):
        try:
            write(rows, out_dir / name)
        except PermissionError as e:
            print(f"\nwarning: {out_dir / name} not updated ({e.strerror}): is it open in another program? "
                  f"Close it; the next epoch writes it again, and last.pt holds every epoch's row", file=sys.stderr)


class PerImage:
    """What evaluate.py collects on its way for the report: each image's scores at its original size and its error
    map thumbnail, and for a binary model the mean Dice at several thresholds."""

    def __init__(self, task: Task, run_dir: Path, device: torch.device):
        self.task, self.run_dir, self.rows, self.threshold_dice = task, run_dir, [], {}
        self.thresholds = {t: task.metrics(device) for t in THRESHOLDS} if task.classes == 1 else {}
        try:
            (run_dir / "errors").mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise utils.UserError(f"{run_dir}: cannot write the report there ({e.strerror or e}); evaluate a copy of "
                                  f"the checkpoint in a folder you can write to") from None

    def add(self, image: Path, probs: torch.Tensor, pred: torch.Tensor, truth: torch.Tensor) -> None:
        """One image at its original size: its probabilities (1, C, H, W) and decided mask (H, W) on the device, and
        its truth (H, W)."""
        ignore, truth = self.task.ignore_index, truth.to(probs.device)
        m, codes = utils.image_scores(pred, truth, self.task.classes, ignore), utils.error_codes(pred, truth, ignore)
        (height, width), thumb_width = pred.shape, min(THUMBNAIL_WIDTH, pred.shape[1])
        self.rows.append({"image": image.name, "resolution": f"{height}x{width}", "dice": m["dice"], "iou": m["iou"],
                          "accuracy": m["acc"], "false_positive_px": int((codes == 3).sum()),
                          "false_negative_px": int((codes == 2).sum()),
                          **{f"iou_class_{k}": v for k, v in enumerate(m.get("class_iou", []))}})
        for threshold, metrics in self.thresholds.items():
            metrics.update(self.task.labels(probs, threshold), truth[None])
        photo = torch.from_numpy(ds.load_image(image, (max(1, height * thumb_width // width), thumb_width)))
        errors = utils.error_map(photo.permute(2, 0, 1).to(probs.device), codes).permute(1, 2, 0).cpu().numpy()
        with utils.atomic_write(self.run_dir / "errors" / f"{image.stem}.jpg", "wb") as f:
            Image.fromarray(errors).save(f, format="JPEG", quality=85)

    def gather(self) -> None:
        """Every process's rows (worst Dice first) and mean Dice per threshold, in every process."""
        for metrics in self.thresholds.values():
            utils.all_reduce_sum(metrics.sums)
        self.threshold_dice = {t: metrics.compute()["mean_dice"] for t, metrics in self.thresholds.items()}
        if dist.is_available() and dist.is_initialized():
            parts: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(parts, self.rows)
            self.rows = [row for part in parts for row in part]
        self.rows.sort(key=lambda row: (row["dice"], row["image"]))


def write_report(per_image: PerImage, summary: str) -> None:
    """per_image.csv, dice_histogram.png and report.html in the run folder."""
    from matplotlib.figure import Figure  # no pyplot: no GUI backend, no global figure state
    run_dir, rows = per_image.run_dir, per_image.rows
    with utils.atomic_write(run_dir / "per_image.csv") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    fig = Figure(figsize=(4.5, 3), layout="tight")
    ax = fig.subplots()
    ax.hist([row["dice"] for row in rows], bins=30, color="tab:green")
    ax.set(xlabel="Dice per image (original size)", ylabel="images", title=f"Per-image Dice, {len(rows)} images")
    ax.yaxis.get_major_locator().set_params(integer=True)
    with utils.atomic_write(run_dir / "dice_histogram.png", "wb") as f:
        fig.savefig(f, format="png", dpi=100)
    with utils.atomic_write(run_dir / "report.html") as f:
        f.write(report_html(per_image, summary))


def report_html(per_image: PerImage, summary: str) -> str:
    """The page: summary, Dice histogram and curves, per-car and threshold tables, the images worst-first, config."""
    run_dir, rows, e = per_image.run_dir, per_image.rows, html.escape
    dice, config, cars = sorted(row["dice"] for row in rows), run_dir / "config.json", {}
    for row in filter(lambda row: ds.is_carvana_name(row["image"]), rows):  # the images that come from cars
        cars.setdefault(ds.car_id(row["image"]), []).append(row["dice"])
    page = [f"<!doctype html><html><head><meta charset='utf-8'><title>{e(run_dir.name)}: validation report</title>"
            f"<style>{STYLE}</style></head><body><h1>{e(run_dir.name)}: validation report</h1><p>{e(summary)}</p>",
            f"<p>Scored at each image's original size ({e(', '.join(sorted({r['resolution'] for r in rows})[:3]))}), "
            f"without TTA: mean Dice per image <b>{sum(dice) / len(dice):.4f}</b>, median {dice[len(dice) // 2]:.4f}, "
            f"worst {dice[0]:.4f}. Every image's scores: <a href='per_image.csv'>per_image.csv</a>.</p>",
            "<div class='row'><img src='dice_histogram.png' alt='histogram of the per-image Dice'>"
            + ("<img src='curves.png' alt='training curves' width='720'>" if (run_dir / "curves.png").exists() else "")
            + "</div><div class='row'>"]
    if cars:
        means = sorted((sum(d) / len(d), car, len(d)) for car, d in cars.items())
        page.append("<div><h2>Per car, worst first</h2>" + table(("car", "images", "mean Dice"), [
            (car, n, f"{mean:.4f}") for mean, car, n in means]) + "</div>")
    if per_image.threshold_dice:
        page.append("<div><h2>Dice against the threshold</h2>" + table(("threshold", "mean Dice"), [
            (t, f"{d:.4f}") for t, d in per_image.threshold_dice.items()]) + "(predict.py --threshold, 0.5)</div>")
    page.append("</div><h2>Images, worst Dice first</h2><p>" + " &nbsp; ".join(
        f"<span class='key' style='background:rgb{colour}'></span> {e(text)}" for colour, text in LEGEND)
        + ". A thumbnail pixel is coloured when any original pixel under it is wrong: thin errors show, thickened.</p>")
    page += [f"<figure><img src='{e(quote('errors/' + Path(row['image']).stem + '.jpg'))}' loading='lazy' alt=''>"
             f"<figcaption>{rank}. {e(row['image'])}<br>Dice {row['dice']:.4f}, IoU {row['iou']:.4f}<br>"
             f"FP {row['false_positive_px']:,} px, FN {row['false_negative_px']:,} px</figcaption></figure>"
             for rank, row in enumerate(rows, 1)]
    settings = config.read_text(encoding="utf-8") if config.exists() else ""
    page.append(f"<h2>Config</h2><pre>{e(settings)}</pre></body></html>\n")
    return "\n".join(page)


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """An HTML table of escaped cells."""
    cells = [[f"<th>{html.escape(str(c))}</th>" for c in header]]
    cells += [[f"<td>{html.escape(str(c))}</td>" for c in row] for row in rows]
    return "<table>" + "".join("<tr>" + "".join(row) + "</tr>" for row in cells) + "</table>"
