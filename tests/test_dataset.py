import shutil

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

import dataset as ds


def copy_dataset(src, dst):
    shutil.copytree(src, dst)
    return dst


def test_pairs_match_by_name_not_position(synthetic_dir, tmp_path):
    data = copy_dataset(synthetic_dir, tmp_path / "data")
    # A stray extra mask sorts between the others: pairing by position would shift every later pair.
    first_mask = sorted((data / "train_masks").iterdir())[0]
    shutil.copy(first_mask, data / "train_masks" / "00000000000a_01_mask.gif")
    pairs = ds.find_pairs(data)
    assert len(pairs) == 4 * 16
    for image, mask in pairs:
        assert mask.name == image.stem + "_mask.gif"


def test_missing_mask_is_refused_with_its_name(synthetic_dir, tmp_path):
    data = copy_dataset(synthetic_dir, tmp_path / "data")
    victim = sorted((data / "train_masks").iterdir())[5]
    victim.unlink()
    with pytest.raises(FileNotFoundError, match=victim.name):
        ds.find_pairs(data)


def test_hidden_files_are_ignored(synthetic_dir, tmp_path):
    data = copy_dataset(synthetic_dir, tmp_path / "data")
    (data / "train" / "._0000_01.jpg").write_bytes(b"\0\0")
    (data / "train" / ".DS_Store").write_bytes(b"\0")
    assert len(ds.find_pairs(data)) == 4 * 16


@pytest.mark.parametrize("val_cars", [1, 2, 0.25, 0.5, 0.01, 10])
def test_no_car_straddles_the_split(synthetic_dir, val_cars):
    pairs = ds.find_pairs(synthetic_dir)
    train, val = ds.split_by_group(pairs, val_cars, seed=3)
    assert train and val and not set(train) & set(val)
    assert sorted(train + val) == sorted({ds.car_id(i) for i, _ in pairs})
    train_images = {i for i, _ in ds.pairs_of_groups(pairs, train)}
    val_images = {i for i, _ in ds.pairs_of_groups(pairs, val)}
    assert len(train_images) + len(val_images) == len(pairs)
    assert {ds.car_id(i) for i in train_images}.isdisjoint({ds.car_id(i) for i in val_images})
    assert all(len([i for i in val_images if ds.car_id(i) == c]) == 16 for c in val)


def test_split_is_deterministic_from_the_seed(synthetic_dir):
    pairs = ds.find_pairs(synthetic_dir)
    assert ds.split_by_group(pairs, 1, seed=0) == ds.split_by_group(pairs, 1, seed=0)
    splits = {tuple(ds.split_by_group(pairs, 1, seed=s)[1]) for s in range(10)}
    assert len(splits) > 1  # the seed matters


def test_car_id_from_kaggle_names():
    assert ds.car_id("train/0cdf5b5d0ce1_07.jpg") == "0cdf5b5d0ce1"


def test_dataset_items_are_resized_tensors_with_binary_masks(synthetic_dir):
    pairs = ds.find_pairs(synthetic_dir)
    data = ds.SegmentationDataset(pairs, 32, 48, ds.train_transforms(32, 48))
    image, mask = data[(0, 123)]
    assert image.shape == (3, 32, 48) and image.dtype == torch.float32
    assert 0 <= image.min() and image.max() <= 1
    assert mask.shape == (1, 32, 48)
    assert 0 <= mask.min() and mask.max() <= 1
    hard = ds.SegmentationDataset(pairs, 32, 48, ds.train_transforms(32, 48), soft_masks=False)
    assert set(hard[(0, 123)][1].unique().tolist()) <= {0.0, 1.0}
    again, _ = data[(0, 123)]
    assert torch.equal(image, again)  # the same seed gives the same augmentation


def test_mask_loads_as_zero_one_from_kaggle_palette_gif(tmp_path):
    mask = np.zeros((20, 30), np.uint8)
    mask[5:10, 5:25] = 1
    gif = Image.fromarray(mask, mode="P")
    gif.putpalette([0, 0, 0, 255, 255, 255])
    gif.save(tmp_path / "m_mask.gif")
    loaded = ds.load_mask(tmp_path / "m_mask.gif")
    assert loaded.dtype == np.uint8 and np.array_equal(loaded, mask)
    soft = ds.load_mask_resized(tmp_path / "m_mask.gif", (10, 15), soft=True)
    hard = ds.load_mask_resized(tmp_path / "m_mask.gif", (10, 15), soft=False)
    assert soft.shape == hard.shape == (10, 15)
    assert soft.sum() / 255 == pytest.approx(mask.sum() / 4, rel=0.05)  # coverage is preserved
    assert set(np.unique(hard)) == {0, 255} and len(np.unique(soft)) > 2


def test_validation_transform_does_not_augment(synthetic_dir):
    pairs = ds.find_pairs(synthetic_dir)
    data = ds.SegmentationDataset(pairs, 32, 48, ds.val_transforms(32, 48))
    a, _ = data[(0, 1)]
    b, _ = data[(0, 2)]
    assert torch.equal(a, b)


def _edge_column(row: np.ndarray) -> float:
    """Where a bright-to-dark step lies, in continuous pixel coordinates: the bright area before it.

    Any symmetric resampling filter keeps that area, so it locates the step to a small fraction of a pixel.
    """
    high, low = row[:8].mean(), row[-8:].mean()
    return float(((row - low) / (high - low)).sum())


@pytest.mark.parametrize("size", [(160, 240), (256, 384)])
def test_reduced_jpeg_decode_keeps_the_geometry_of_a_full_resize(tmp_path, size):
    # 1918 is no multiple of 8: a reduced (draft) decode's last column covers less of the photo than
    # the others. Resizing it as if it were whole moved the right side of every photo by up to a
    # quarter of a pixel at 160x240 against its mask, which is resized from the full size.
    photo = np.full((1280, 1918), 230, np.uint8)
    photo[:, 1700:] = 20
    path = tmp_path / "step.jpg"
    Image.fromarray(photo).convert("RGB").save(path, quality=95)
    want = 1700 / 1918 * size[1]  # the step's place at the reduced width
    with Image.open(path) as img:
        full = np.asarray(img.convert("L").resize((size[1], size[0]), Image.BILINEAR), np.float64)
    fast = ds.load_image(path, size, channels=1)[..., 0].astype(np.float64)
    assert fast.shape == full.shape == size
    assert abs(_edge_column(full.mean(axis=0)) - want) < 0.05
    assert abs(_edge_column(fast.mean(axis=0)) - want) < 0.05


@pytest.mark.parametrize("suffix", [".jpg", ".png", ".tif"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_load_image_turns_a_photo_upright_as_its_exif_orientation_says(tmp_path, suffix, orientation):
    # Stored 203x130 (no multiple of 8: draft's box is partial), red growing left to right and green top to
    # bottom, so that every turn and flip shows; orientations 5-8 show it 130 wide and 203 high.
    y, x = np.mgrid[:130, :203]
    pixels = np.stack([x * 255 // 202, y * 255 // 129, np.full_like(x, 128)], axis=-1).astype(np.uint8)
    exif = Image.Exif()
    exif[0x0112] = orientation
    path = tmp_path / f"photo{suffix}"
    Image.fromarray(pixels).save(path, exif=exif, **({"quality": 95} if suffix == ".jpg" else {}))
    with Image.open(path) as img:
        assert ds.upright(img)[0] == ((130, 203) if orientation >= 5 else (203, 130))
    with Image.open(path) as img:
        shown = ImageOps.exif_transpose(img).convert("RGB")  # as viewers show it
    np.testing.assert_array_equal(ds.load_image(path), np.asarray(shown))
    # At a training size the photo is decoded reduced (JPEG's draft) and resized before it is turned.
    resized = np.asarray(shown.resize((40, 24), Image.BILINEAR), np.float64)
    loaded = ds.load_image(path, (24, 40)).astype(np.float64)
    assert loaded.shape == (24, 40, 3) and np.abs(loaded - resized).mean() < 1


def test_crop_is_a_window_of_the_resized_pair_with_image_and_mask_aligned():
    """--crop: a random HxW window of the (flipped) pair; no shift, zoom or turn when those are off."""
    rows, cols = np.meshgrid(np.arange(32, dtype=np.uint8), np.arange(48, dtype=np.uint8), indexing="ij")
    image = np.zeros((32, 48, 3), np.uint8)
    still = ds.Augmentation(shift=0, zoom=(1.0, 1.0), rotate=0, crop=(16, 24))
    transform = ds.train_transforms(32, 48, augmentation=still)
    corners = set()
    for seed in range(20):
        outs = []
        for mask in (rows, cols):  # the same seed, the same window: once to read its rows, once its columns
            transform.set_random_seed(seed)
            outs.append(transform(image=image, mask=mask))
        assert outs[0]["image"].shape == (16, 24, 3) and outs[0]["mask"].shape == (16, 24)
        top, left = int(outs[0]["mask"][0, 0]), int(outs[1]["mask"][0, 0])
        flipped = outs[1]["mask"][0, 1] < left
        np.testing.assert_array_equal(outs[0]["mask"], rows[top:top + 16, :24])
        expected = cols[:16, ::-1][:, 47 - left:47 - left + 24] if flipped else cols[:16, left:left + 24]
        np.testing.assert_array_equal(outs[1]["mask"], expected)
        corners.add((top, left))
    assert len(corners) > 5  # the window moves


def test_augmentation_off_leaves_the_geometry_alone():
    image = np.random.default_rng(0).integers(0, 255, (32, 48, 3), dtype=np.uint8)
    mask = (image[..., 0] > 128).astype(np.uint8)
    transform = ds.train_transforms(32, 48, augmentation=ds.Augmentation(shift=0, zoom=(1.0, 1.0), rotate=0))
    for seed in range(10):
        transform.set_random_seed(seed)
        out = transform(image=image, mask=mask)["mask"]
        assert np.array_equal(out, mask) or np.array_equal(out, mask[:, ::-1])


@pytest.mark.parametrize("shuffle", [True, False])
def test_sampler_length_is_what_it_yields_for_every_share_and_skip(shuffle):
    for n, world_size in [(7, 1), (7, 2), (7, 3), (8, 4), (2, 3)]:
        for rank in range(world_size):
            sampler = ds.SeededSampler(n, seed=1, shuffle=shuffle, rank=rank, world_size=world_size)
            for skip in (0, 1, 3, 9):
                sampler.set_epoch(2, skip=skip)
                assert len(sampler) == len(list(sampler)), (n, world_size, rank, skip)
