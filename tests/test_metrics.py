import pytest
import torch

from utils import BinaryMetrics


def masks(*rows_per_image):
    """Build a (N, 1, H, W) bool tensor from nested lists."""
    return torch.tensor(rows_per_image, dtype=torch.bool).unsqueeze(1)


def test_hand_computed_scores():
    # image 1: pred 3 pixels, target 2 pixels, 1 overlap -> dice 2/5, iou 1/4, 6 of 8 pixels correct? see below
    pred = masks([[1, 1, 1, 0], [0, 0, 0, 0]])
    target = masks([[1, 0, 0, 0], [0, 0, 0, 1]])
    m = BinaryMetrics()
    m.update(pred, target)
    r = m.compute()
    # intersection 1, |pred| 3, |target| 2, union 4; correct: positions 0 (1=1), 3,4,5,6 (0=0) -> 5 of 8
    assert r["dice"] == pytest.approx(2 * 1 / 5)
    assert r["iou"] == pytest.approx(1 / 4)
    assert r["acc"] == pytest.approx(5 / 8)
    assert r["mean_dice"] == pytest.approx(2 / 5)


def test_global_and_per_image_scores_differ_and_are_not_per_batch_means():
    small_pred, small_target = masks([[1, 0, 0, 0]]), masks([[0, 1, 0, 0]])  # dice 0, 1 pixel each
    big_pred, big_target = masks([[1, 1, 1, 1]]), masks([[1, 1, 1, 1]])      # dice 1, 4 pixels each
    m = BinaryMetrics()
    m.update(small_pred, small_target)  # batch 1
    m.update(big_pred, big_target)      # batch 2
    r = m.compute()
    assert r["dice"] == pytest.approx(2 * 4 / (5 + 5))  # global: 0.8
    assert r["mean_dice"] == pytest.approx(0.5)          # per image: (0 + 1) / 2
    assert r["images"] == 2
    # Same images in one batch give the same numbers: nothing depends on batching.
    one = BinaryMetrics()
    one.update(torch.cat([small_pred, big_pred]), torch.cat([small_target, big_target]))
    assert one.compute() == r


def test_empty_masks():
    empty = masks([[0, 0], [0, 0]])
    full = masks([[1, 1], [1, 1]])
    m = BinaryMetrics()
    m.update(empty, empty)  # both empty: a perfect answer
    r = m.compute()
    assert r["dice"] == 1.0 and r["iou"] == 1.0 and r["acc"] == 1.0 and r["mean_dice"] == 1.0
    m.update(full, empty)   # predicted a car where there is none
    r = m.compute()
    assert r["dice"] == 0.0 and r["iou"] == 0.0
    assert r["mean_dice"] == pytest.approx(0.5)
    assert r["acc"] == pytest.approx(0.5)


@pytest.mark.parametrize("classes", [1, 3])
def test_sums_stay_on_the_cpu_for_mps_which_has_no_float64(classes):
    # On a Mac, --device auto is mps: float64 sums there failed at the first validation, losing the epoch.
    from task import make_task
    from utils import sums_device
    assert sums_device(torch.device("mps")) == torch.device("cpu")
    assert sums_device(torch.device("cpu")) == torch.device("cpu")
    metrics = make_task(classes).metrics(torch.device("mps"))  # made without an MPS device: nothing is put there
    assert metrics.sums.device == torch.device("cpu") and metrics.sums.dtype == torch.float64
