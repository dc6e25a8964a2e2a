"""Integration checks on real Carvana photos (../shared/carvana); skipped when that folder is absent."""
from __future__ import annotations

import csv
import gzip

import numpy as np
import torch
from PIL import Image

import check_dataset
import dataset as ds
import predict
import utils
from conftest import SHARED_CARVANA, needs_shared_carvana
from model import UNet

pytestmark = needs_shared_carvana()


def test_real_pairs_pass_the_check_and_split_by_car():
    report = check_dataset.check_dataset(SHARED_CARVANA, progress=False, cache=False)
    assert report.ok and len(report.pairs) == 512
    train, val = ds.split_by_group(report.pairs, 4, seed=0)
    assert len(val) == 4 and len(train) == 28 and not set(train) & set(val)


def test_predict_writes_full_resolution_masks_and_a_submission_that_decodes_to_them(tmp_path):
    photos = sorted((SHARED_CARVANA / "train").glob("*.jpg"))[:3]
    torch.manual_seed(0)
    model = UNet(features=(4, 8))
    checkpoint = tmp_path / "tiny.pt"
    utils.save_checkpoint({"model": model.state_dict(), "model_config": model.config,
                           "config": {"height": 160, "width": 240}}, checkpoint)
    out = tmp_path / "out"
    submission = tmp_path / "submission.csv.gz"
    assert predict.main(["--checkpoint", str(checkpoint), "--input", *map(str, photos), "--output", str(out),
                         "--submission", str(submission), "--tta", "--workers", "0"]) == 0
    with gzip.open(submission, "rt", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["img", "rle_mask"] and [r[0] for r in rows[1:]] == [p.name for p in photos]
    for photo, (_, rle) in zip(photos, rows[1:]):
        mask = np.asarray(Image.open(out / f"{photo.stem}_mask.png"))
        assert mask.shape == (1280, 1918) and set(np.unique(mask)) <= {0, 255}
        assert np.array_equal(predict.rle_decode(rle, mask.shape), mask > 0)
