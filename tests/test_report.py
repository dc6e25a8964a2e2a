"""The end of training writes per_image.csv (worst Dice first) and report.html, whose every picture is there."""
import csv
import json
import os
import shutil
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path
from urllib.parse import unquote

import pytest
import torch

import dataset as ds
from conftest import TINY_RUN, one_epoch_run
import utils



@pytest.fixture(scope="module")
def run_dir(synthetic_dir, tmp_path_factory) -> Path:
    return one_epoch_run(synthetic_dir, tmp_path_factory.mktemp("run"), "--num-predictions", "1")


class Page(HTMLParser):
    """The text and the linked files (href, src) of an HTML page."""

    def __init__(self, text: str):
        super().__init__()
        self.text, self.links = [], []
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        self.links += [unquote(value) for name, value in attrs if name in ("href", "src")]

    def handle_data(self, data):
        self.text.append(data)


def test_per_image_csv_and_report_list_every_validation_image_worst_first(run_dir, synthetic_dir):
    split = json.loads((run_dir / "split.json").read_text())
    expected = {image.name for image, _ in ds.pairs_of_groups(ds.find_pairs(synthetic_dir), split["val"])}
    with open(run_dir / "per_image.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [row["image"] for row in rows if row["image"] in expected] == [row["image"] for row in rows]
    assert len(rows) == len(expected) == 16
    assert list(rows[0])[:7] == ["image", "resolution", "dice", "iou", "accuracy", "false_positive_px",
                                 "false_negative_px"]
    assert {row["resolution"] for row in rows} == {"64x96"}  # the original size, not the training size
    dice = [float(row["dice"]) for row in rows]
    assert dice == sorted(dice)

    page = Page((run_dir / "report.html").read_text())
    text = "".join(page.text)
    positions = [text.index(row["image"] + "Dice") for row in rows]  # each figure's caption, in the CSV's order
    assert positions == sorted(positions)
    assert {"per_image.csv", "dice_histogram.png", "curves.png"} <= set(page.links)
    for name in page.links:
        assert (run_dir / name).is_file(), name
    assert len([name for name in page.links if name.startswith("errors/")]) == 16
    assert '"epochs": 1' in text  # the config
    assert "the model's input: 32x48" in text  # scored from inputs at the training size


def test_error_maps_mark_false_positives_and_negatives_even_in_a_thumbnail():
    truth = torch.zeros(64, 96, dtype=torch.bool)
    truth[10:40, 20:60] = True
    pred = truth.clone()
    pred[5:10, 20:60] = True   # false positives above
    pred[39, 59] = False       # one false negative pixel
    codes = utils.error_codes(pred, truth)
    assert ((codes == 3).sum(), (codes == 2).sum(), (codes == 1).sum()) == (200, 1, 30 * 40 - 1)
    thumbnail = utils.error_map(torch.full((3, 16, 24), 128, dtype=torch.uint8), codes)  # pooled 4x
    assert thumbnail[:, 2, 10].tolist() == list(utils.FP_COLOUR)
    assert thumbnail[:, 9, 14].tolist() == list(utils.FN_COLOUR)  # one pixel of 1,280 still shows
    assert thumbnail[:, 0, 0].tolist() == [128, 128, 128]  # right background: untouched


def test_multiclass_error_codes_skip_unlabelled_pixels():
    truth = torch.tensor([[0, 1, 2, 255], [1, 2, 0, 255]], dtype=torch.uint8)
    pred = torch.tensor([[0, 1, 1, 1], [0, 2, 2, 0]], dtype=torch.uint8)
    assert utils.error_codes(pred, truth).tolist() == [[0, 1, 3, 0], [2, 1, 3, 0]]
    assert utils.image_scores(pred, truth, classes=3)["class_iou"] == pytest.approx([1 / 3, 1 / 3, 1 / 3])


def chromium() -> str | None:
    return next(filter(None, map(shutil.which, ("chromium", "chromium-browser", "google-chrome"))), None)


@pytest.mark.skipif(chromium() is None, reason="no chromium on PATH")
def test_report_renders_in_headless_chromium(run_dir, tmp_path):
    shot = tmp_path / "report.png"
    subprocess.run([chromium(), "--headless", "--disable-gpu", "--no-sandbox", f"--screenshot={shot}",
                    "--window-size=1280,1600", (run_dir / "report.html").as_uri()], capture_output=True, timeout=120)
    assert shot.is_file() and shot.stat().st_size > 20_000
    from PIL import Image
    with Image.open(shot) as img:
        assert img.size == (1280, 1600) and len(img.convert("L").getcolors(256) or []) > 16  # not a blank page


def windows_like_locale(folder: Path) -> dict[str, str] | None:
    """Environment variables for a cp1252 locale (Windows' default text encoding), built with localedef; or None."""
    if not shutil.which("localedef"):
        return None
    done = subprocess.run(["localedef", "-i", "en_US", "-f", "CP1252", str(folder / "en_US.CP1252")],
                          capture_output=True)
    return {"LOCPATH": str(folder), "LC_ALL": "en_US.CP1252", "PYTHONUTF8": "0"} if done.returncode == 0 else None


def test_files_are_utf8_whatever_the_locale_says(synthetic_dir, tmp_path):
    # report.html says charset utf-8; written in the locale's encoding it was wrong (or failed) on Windows
    env = windows_like_locale(tmp_path)
    if env is None:
        pytest.skip("localedef cannot build a cp1252 locale here")
    code = ("import sys, train; sys.exit(train.main(['--data-dir', sys.argv[1], '--out-dir', sys.argv[2] + "
            "'/r\\u00e9sultat', '--epochs', '1', *sys.argv[3:]]))")
    runs = tmp_path / "runs"
    result = subprocess.run([sys.executable, "-c", code, str(synthetic_dir), str(runs), *TINY_RUN[:-2]],
                            cwd=Path(utils.__file__).parent, env={**os.environ, **env}, capture_output=True)
    assert result.returncode == 0, result.stderr.decode("cp1252", "replace")  # printed in the locale's encoding
    [run] = list(runs.iterdir())  # named in cp1252 on disk, so not "résultat" to this process
    assert "résultat" in (run / "report.html").read_bytes().decode("utf-8")
    assert len((run / "per_image.csv").read_text(encoding="utf-8").splitlines()) == 17  # header, 16 views
