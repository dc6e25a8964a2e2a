"""Kaggle's run-length encoding: hand-made masks with known strings, round trips and decode errors."""
from __future__ import annotations

import numpy as np
import pytest

from predict import rle_decode, rle_encode

H, W = 1280, 1918  # Carvana's mask size


def mask_from_rows(*rows: str) -> np.ndarray:
    """A uint8 mask drawn by hand: '#' is car, '.' background."""
    return np.array([[c == "#" for c in row] for row in rows], dtype=np.uint8)


# Pixels are numbered 1..12 row by row in a 3x4 mask:  1  2  3  4 / 5  6  7  8 / 9 10 11 12
HAND_MADE = {
    "empty": (mask_from_rows("....", "....", "...."), ""),
    "full": (mask_from_rows("####", "####", "####"), "1 12"),
    "first pixel": (mask_from_rows("#...", "....", "...."), "1 1"),
    "last pixel": (mask_from_rows("....", "....", "...#"), "12 1"),
    "first and last": (mask_from_rows("##..", "....", "..##"), "1 2 11 2"),
    "run inside a row": (mask_from_rows(".##.", "....", "...."), "2 2"),
    "runs wrap row ends": (mask_from_rows("#..#", "#.##", "##.#"), "1 1 4 2 7 4 12 1"),
    "one column (row-major, not column-major)": (mask_from_rows(".#..", ".#..", ".#.."), "2 1 6 1 10 1"),
    "non-square 2x3": (mask_from_rows("..#", "##."), "3 3"),
}


@pytest.mark.parametrize("name", HAND_MADE)
def test_encode_hand_made(name: str) -> None:
    mask, expected = HAND_MADE[name]
    assert rle_encode(mask) == expected


@pytest.mark.parametrize("name", HAND_MADE)
def test_decode_hand_made(name: str) -> None:
    mask, rle = HAND_MADE[name]
    decoded = rle_decode(rle, mask.shape)
    assert decoded.dtype == np.uint8 and decoded.shape == mask.shape
    np.testing.assert_array_equal(decoded, mask)


def test_encode_treats_any_nonzero_as_car() -> None:
    mask, expected = HAND_MADE["runs wrap row ends"]
    for variant in (mask.astype(bool), mask * 255, mask.astype(np.float32) * 0.7, mask.astype(np.int64)):
        assert rle_encode(variant) == expected


def test_encode_rejects_non_2d() -> None:
    with pytest.raises(ValueError, match="2-D"):
        rle_encode(np.zeros((1, 3, 4), dtype=np.uint8))


def test_decode_ignores_surrounding_whitespace() -> None:
    np.testing.assert_array_equal(rle_decode("  2 2\n", (3, 4)), mask_from_rows(".##.", "....", "...."))


def blob_mask() -> np.ndarray:
    """A car-sized ellipse with a notch: long runs, one or two per row."""
    y, x = np.ogrid[:H, :W]
    blob = ((y - 700) / 300) ** 2 + ((x - 960) / 800) ** 2 <= 1
    blob[650:700, 900:1000] = False
    return blob.astype(np.uint8)


@pytest.mark.parametrize("kind", ["noise", "sparse", "blob"])
def test_round_trip_real_size(kind: str) -> None:
    rng = np.random.default_rng(0)
    mask = {
        "noise": lambda: (rng.random((H, W)) < 0.5).astype(np.uint8),
        "sparse": lambda: (rng.random((H, W)) < 0.001).astype(np.uint8),
        "blob": blob_mask,
    }[kind]()
    rle = rle_encode(mask)
    decoded = rle_decode(rle, (H, W))
    np.testing.assert_array_equal(decoded, mask)
    assert rle_encode(decoded) == rle
    values = np.array(rle.split(), dtype=np.int64)
    assert values[1::2].sum() == mask.sum()


def test_blob_has_expected_run_count() -> None:
    rle = rle_encode(blob_mask())
    rows = 601  # rows 400..1000 hold the ellipse; the notch splits 50 of them in two
    assert len(rle.split()) == 2 * (rows + 50)


PAIRS = "pairs of 64-bit integers"
RUNS = "sorted, disjoint and inside the 3x4 mask"


@pytest.mark.parametrize("rle, message", [
    ("1 2 3", PAIRS),                     # an odd number of values
    ("1 x", PAIRS),
    ("1 2.5", PAIRS),
    ("1 99999999999999999999", PAIRS),    # does not fit in 64 bits
    ("0 2", RUNS),                        # pixels are numbered from 1
    ("-3 2", RUNS),
    ("1 0", RUNS),                        # a length below 1
    ("5 -1", RUNS),
    ("11 3", RUNS),                       # ends past the last pixel, 12
    ("13 1", RUNS),
    ("1 9223372036854775807", RUNS),      # start + length would overflow int64
    ("1 3 3 1", RUNS),                    # overlapping runs
    ("5 1 1 1", RUNS),                    # unsorted runs
])
def test_decode_errors(rle: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        rle_decode(rle, (3, 4))


def test_decode_rejects_bad_shape() -> None:
    with pytest.raises(ValueError, match="inside the 0x4 mask"):
        rle_decode("1 1", (0, 4))
