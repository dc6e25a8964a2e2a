"""task.py: the edge-weighted loss and the one-region post-processing."""
import numpy as np
import pytest
import torch

from task import BinaryTask, bce_dice_loss, edge_kernel, edge_weights, keep_largest_region


def square_mask(size: int = 40, lo: int = 10, hi: int = 30) -> torch.Tensor:
    """(1, 1, size, size) float mask: a car square from lo to hi."""
    mask = torch.zeros(1, 1, size, size)
    mask[..., lo:hi, lo:hi] = 1
    return mask


def test_edge_weights_weigh_a_band_around_the_outline_and_keep_the_mean_at_one():
    mask = square_mask()
    w = edge_weights(mask, kernel=5, weight=3.0)[0, 0]
    assert w.mean().item() == pytest.approx(1.0, rel=1e-5)
    edge, inside, outside, corner = w[10, 20], w[20, 20], w[2, 2], w[0, 39]
    assert edge.item() == pytest.approx(3 * inside.item())  # on the outline: 3x
    assert inside.item() == pytest.approx(outside.item()) == pytest.approx(corner.item())  # far from it: 1x
    assert w[8, 20] == edge and w[7, 20] == inside  # the band reaches kernel // 2 pixels out
    assert w[11, 20] == edge and w[12, 20] == inside  # and in
    uniform = edge_weights(torch.ones(1, 1, 8, 8), kernel=5, weight=3.0)  # the image's border is no edge
    assert torch.equal(uniform, torch.ones_like(uniform))


def test_edge_weight_makes_errors_on_the_outline_cost_more_than_errors_away_from_it():
    mask = square_mask()
    logits = (mask * 2 - 1) * 8  # confident and right everywhere
    on_edge, off_edge = logits.clone(), logits.clone()
    on_edge[..., 10, 12:16] *= -1  # four wrong pixels on the top edge
    off_edge[..., 20, 12:16] *= -1  # four wrong pixels deep inside
    plain, weighted = BinaryTask(), BinaryTask(edge_weight=3.0, edge_kernel=5)
    assert plain.loss(on_edge, mask).item() == pytest.approx(plain.loss(off_edge, mask).item(), rel=1e-4)
    assert weighted.loss(on_edge, mask) > 1.5 * weighted.loss(off_edge, mask)
    assert torch.equal(bce_dice_loss(logits, mask), plain.loss(logits, mask))  # weight 1 is the plain loss


def test_an_images_edge_weighted_loss_does_not_depend_on_the_rest_of_its_batch():
    # validation sums per-image losses, so --batch-size (or the number of processes) must not change them
    small, large = square_mask(lo=18, hi=22), square_mask(lo=4, hi=36)  # little outline, much outline
    masks = torch.cat([small, large])
    logits = torch.randn(masks.shape, generator=torch.Generator().manual_seed(0))
    task = BinaryTask(edge_weight=5.0, edge_kernel=5)
    together = task.loss(logits, masks, per_image=True)
    alone = torch.cat([task.loss(logits[i:i + 1], masks[i:i + 1], per_image=True) for i in range(2)])
    assert torch.allclose(together, alone, rtol=1e-6)
    assert edge_weights(masks, kernel=5, weight=5.0).mean(dim=(1, 2, 3)).tolist() == pytest.approx([1.0, 1.0])


def test_edge_kernel_scales_41_pixels_at_1024_and_stays_odd():
    assert edge_kernel(1024) == 41
    assert edge_kernel(1280) == 51 and edge_kernel(256) == 11 and edge_kernel(16) == 3


def test_keep_largest_region_drops_stray_blobs_and_fills_holes_but_not_open_bays():
    mask = np.zeros((40, 60), bool)
    mask[5:25, 5:40] = True          # the car
    mask[10:14, 10:14] = False       # a hole inside it
    mask[5:12, 30:34] = False        # a bay open to the car's top: not a hole
    mask[32:36, 45:50] = True        # a blob on the floor
    mask[0, 59] = True               # a stray pixel
    kept = keep_largest_region(mask)
    assert kept.dtype == bool and kept[10:14, 10:14].all()
    assert not kept[32:36, 45:50].any() and not kept[0, 59] and not kept[5:12, 30:34].any()
    assert kept.sum() == 20 * 35 - 7 * 4
    assert not keep_largest_region(np.zeros((4, 4), bool)).any()
