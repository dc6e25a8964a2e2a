"""The synthetic Carvana-format generator: layout, masks, determinism, idempotence, atomicity."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dataset as ds

CARS, SIZE, SEED = 3, (96, 64), 0


@pytest.fixture(scope="module")
def synthetic(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset shared by the read-only tests."""
    return ds.generate_synthetic(tmp_path_factory.mktemp("gen") / "synthetic", cars=CARS, size=SIZE, seed=SEED)


def file_bytes(root: Path) -> dict[str, bytes]:
    """Every file under root by relative path, with its content."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def masks_by_car(root: Path) -> dict[str, list[np.ndarray]]:
    """The masks of each car, in view order."""
    cars: dict[str, list[np.ndarray]] = {}
    for image, mask in ds.find_pairs(root):
        cars.setdefault(ds.car_id(image), []).append(ds.load_mask(mask))
    return cars


def test_layout_and_counts(synthetic: Path) -> None:
    pairs = ds.find_pairs(synthetic)
    assert len(pairs) == CARS * 16
    assert len(list((synthetic / ds.MASK_DIR).iterdir())) == CARS * 16
    for car in {ds.car_id(image) for image, _ in pairs}:
        assert re.fullmatch(r"[0-9a-f]{12}", car)
        names = sorted(p.name for p in (synthetic / ds.IMAGE_DIR).glob(f"{car}_*.jpg"))
        assert names == [f"{car}_{view:02d}.jpg" for view in range(1, 17)]
    for image, mask in pairs:
        assert mask == synthetic / ds.MASK_DIR / f"{image.stem}_mask.gif"
    assert not list(synthetic.parent.glob("*.tmp-*")), "the temporary folder was left behind"


def test_masks_are_binary_palette_gifs_of_the_right_size(synthetic: Path) -> None:
    for image, mask in ds.find_pairs(synthetic):
        with Image.open(mask) as gif:
            assert (gif.format, gif.mode, gif.size) == ("GIF", "P", SIZE)
            values = np.asarray(gif)
        assert set(np.unique(values)) == {0, 1}
        with Image.open(image) as jpeg:
            assert (jpeg.format, jpeg.mode, jpeg.size) == ("JPEG", "RGB", SIZE)
        assert ds.load_image(image).shape == (SIZE[1], SIZE[0], 3)
        assert np.array_equal(ds.load_mask(mask), values)


def test_car_fills_a_sensible_part_of_the_frame(synthetic: Path) -> None:
    for car, masks in masks_by_car(synthetic).items():
        fractions = [mask.mean() for mask in masks]
        assert 0.1 <= np.mean(fractions) <= 0.7, (car, fractions)
        assert 0.05 <= min(fractions) and max(fractions) <= 0.7, (car, fractions)


def test_the_car_turns_between_views(synthetic: Path) -> None:
    for masks in masks_by_car(synthetic).values():
        for a, b in zip(masks, masks[1:]):
            assert (a != b).mean() > 0.01
        front, side = masks[0], masks[4]
        assert side.sum() > front.sum()  # seen from the side, a car is longer than it is wide


def flat_render(seed: int, view: int, colour: tuple[float, float, float],
                monkeypatch: pytest.MonkeyPatch) -> tuple[np.ndarray, np.ndarray]:
    """A view of the car drawn in one unshaded colour, windows, lights and wheels included."""
    monkeypatch.setattr(ds, "_AMBIENT", 1.0)
    monkeypatch.setattr(ds, "_DIFFUSE", 0.0)
    monkeypatch.setattr(ds, "_TYRE", colour)
    scene = ds._SyntheticCar(np.random.default_rng(seed), *SIZE)
    for part in (scene.body, scene.cabin, *scene.mirrors.values()):
        for face in part:
            face.color = np.array(colour)
            face.decals = [(points, np.array(colour)) for points, _ in face.decals]
    return scene.render(view, supersample=4)


@pytest.mark.parametrize("seed", [0, 1, 5, 8, 9])  # in 5, 8 and 9 a window or lamp rounds past its face
def test_mask_is_the_drawn_car_at_half_coverage(seed: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """Drawn flat red, then flat blue, the change in the red channel measures each pixel's car coverage."""
    for view in range(1, 17):
        red, mask = flat_render(seed, view, (255.0, 0.0, 0.0), monkeypatch)
        blue, blue_mask = flat_render(seed, view, (0.0, 0.0, 255.0), monkeypatch)
        assert np.array_equal(mask, blue_mask)
        coverage = (red[:, :, 0].astype(int) - blue[:, :, 0]) / 255  # within 2/255 of the true coverage
        assert np.all(mask[coverage > 0.51] == 1) and np.all(mask[coverage < 0.49] == 0), view
        assert not (mask[0].any() or mask[-1].any() or mask[:, 0].any() or mask[:, -1].any()), view


def test_same_seed_same_bytes_other_seed_other_cars(synthetic: Path, tmp_path: Path) -> None:
    # Rendered in 2 processes this time: the files must not depend on how many did the work.
    again = ds.generate_synthetic(tmp_path / "again", cars=CARS, size=SIZE, seed=SEED, workers=2)
    assert file_bytes(again) == file_bytes(synthetic)
    other = ds.generate_synthetic(tmp_path / "other", cars=CARS, size=SIZE, seed=SEED + 1)
    cars = {ds.car_id(image) for image, _ in ds.find_pairs(synthetic)}
    other_cars = {ds.car_id(image) for image, _ in ds.find_pairs(other)}
    assert cars.isdisjoint(other_cars)
    assert set(file_bytes(other).values()).isdisjoint(v for k, v in file_bytes(synthetic).items()
                                                       if k != ds.SYNTHETIC_MANIFEST)


def test_second_call_with_same_parameters_is_a_no_op(synthetic: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in synthetic.rglob("*")}
    assert ds.generate_synthetic(synthetic, cars=CARS, size=SIZE, seed=SEED) == synthetic
    assert {p: p.stat().st_mtime_ns for p in synthetic.rglob("*")} == before


def test_refuses_a_folder_holding_something_else(synthetic: Path, tmp_path: Path) -> None:
    with pytest.raises(FileExistsError, match="made with seed=0, not seed=1"):
        ds.generate_synthetic(synthetic, cars=CARS, size=SIZE, seed=SEED + 1)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not a synthetic dataset"):
        ds.generate_synthetic(other, cars=1, size=SIZE)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_an_empty_folder_is_filled(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    out = ds.generate_synthetic(tmp_path / "empty", cars=1, size=SIZE)
    assert len(ds.find_pairs(out)) == 16


def test_an_interrupted_run_leaves_nothing_that_looks_complete(tmp_path: Path, monkeypatch) -> None:
    saved = []

    def failing_save(mask: np.ndarray, path: Path) -> None:
        if len(saved) == 20:
            raise KeyboardInterrupt
        saved.append(path)

    monkeypatch.setattr(ds, "_save_mask", failing_save)
    with pytest.raises(KeyboardInterrupt):
        ds.generate_synthetic(tmp_path / "synthetic", cars=2, size=SIZE)
    assert list(tmp_path.iterdir()) == []


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    assert ds.main(["synthetic", "--out", str(out), "--cars", "1", "--size", "64x48", "--seed", "3"]) == 0
    assert "wrote 16 synthetic image/mask pairs" in capsys.readouterr().out
    assert ds.load_mask(ds.find_pairs(out)[0][1]).shape == (48, 64)
    assert ds.main(["synthetic", "--out", str(out), "--size", "64by48"]) == 2
    assert ds.main(["synthetic", "--out", str(out), "--cars", "2", "--size", "64x48", "--seed", "3"]) == 1
    assert "made with cars=1, not cars=2" in capsys.readouterr().err
