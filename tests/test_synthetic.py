"""The synthetic Carvana-format generator: layout, masks, determinism, idempotence, atomicity."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import dataset as ds
import synthetic
from utils import UserError

CARS, SIZE, SEED = 3, (96, 64), 0


@pytest.fixture(scope="module")
def generated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A small synthetic dataset shared by the read-only tests."""
    out = tmp_path_factory.mktemp("gen") / "synthetic"
    return synthetic.generate_synthetic(out, cars=CARS, size=SIZE, seed=SEED)


def file_bytes(root: Path) -> dict[str, bytes]:
    """Every file under root by relative path, with its content."""
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def masks_by_car(root: Path) -> dict[str, list[np.ndarray]]:
    """The masks of each car, in view order."""
    cars: dict[str, list[np.ndarray]] = {}
    for image, mask in ds.find_pairs(root):
        cars.setdefault(ds.car_id(image), []).append(ds.load_mask(mask))
    return cars


def test_layout_and_counts(generated: Path) -> None:
    pairs = ds.find_pairs(generated)
    assert len(pairs) == CARS * 16
    assert len(list((generated / ds.MASK_DIR).iterdir())) == CARS * 16
    for car in {ds.car_id(image) for image, _ in pairs}:
        assert re.fullmatch(r"[0-9a-f]{12}", car)
        names = sorted(p.name for p in (generated / ds.IMAGE_DIR).glob(f"{car}_*.jpg"))
        assert names == [f"{car}_{view:02d}.jpg" for view in range(1, 17)]
    for image, mask in pairs:
        assert mask == generated / ds.MASK_DIR / f"{image.stem}_mask.gif"
    assert not list(generated.parent.glob("*.tmp-*")), "the temporary folder was left behind"


def test_masks_are_binary_palette_gifs_of_the_right_size(generated: Path) -> None:
    for image, mask in ds.find_pairs(generated):
        with Image.open(mask) as gif:
            assert (gif.format, gif.mode, gif.size) == ("GIF", "P", SIZE)
            values = np.asarray(gif)
        assert set(np.unique(values)) == {0, 1}
        with Image.open(image) as jpeg:
            assert (jpeg.format, jpeg.mode, jpeg.size) == ("JPEG", "RGB", SIZE)
        assert ds.load_image(image).shape == (SIZE[1], SIZE[0], 3)
        assert np.array_equal(ds.load_mask(mask), values)


def test_car_fills_a_sensible_part_of_the_frame(generated: Path) -> None:
    for car, masks in masks_by_car(generated).items():
        fractions = [mask.mean() for mask in masks]
        assert 0.1 <= np.mean(fractions) <= 0.7, (car, fractions)
        assert 0.05 <= min(fractions) and max(fractions) <= 0.7, (car, fractions)


def test_the_car_turns_between_views(generated: Path) -> None:
    for masks in masks_by_car(generated).values():
        for a, b in zip(masks, masks[1:]):
            assert (a != b).mean() > 0.01
        front, side = masks[0], masks[4]
        assert side.sum() > front.sum()  # seen from the side, a car is longer than it is wide


def flat_render(seed: int, view: int, colour: tuple[float, float, float],
                monkeypatch: pytest.MonkeyPatch) -> tuple[np.ndarray, np.ndarray]:
    """A view of the car drawn in one unshaded colour, windows, lights and wheels included."""
    monkeypatch.setattr(synthetic, "_AMBIENT", 1.0)
    monkeypatch.setattr(synthetic, "_DIFFUSE", 0.0)
    monkeypatch.setattr(synthetic, "_TYRE", colour)
    scene = synthetic._SyntheticCar(np.random.default_rng(seed), *SIZE)
    for part in (scene.body, scene.cabin, *scene.mirrors.values()):
        for face in part:
            face.color = np.array(colour)
            face.decals = [(points, np.array(colour), part) for points, _, part in face.decals]
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


def test_same_seed_same_bytes_other_seed_other_cars(generated: Path, tmp_path: Path) -> None:
    # Rendered in 2 processes this time: the files must not depend on how many did the work.
    again = synthetic.generate_synthetic(tmp_path / "again", cars=CARS, size=SIZE, seed=SEED, workers=2)
    assert file_bytes(again) == file_bytes(generated)
    other = synthetic.generate_synthetic(tmp_path / "other", cars=CARS, size=SIZE, seed=SEED + 1)
    cars = {ds.car_id(image) for image, _ in ds.find_pairs(generated)}
    other_cars = {ds.car_id(image) for image, _ in ds.find_pairs(other)}
    assert cars.isdisjoint(other_cars)
    assert set(file_bytes(other).values()).isdisjoint(v for k, v in file_bytes(generated).items()
                                                       if k != synthetic.SYNTHETIC_MANIFEST)


def test_second_call_with_same_parameters_is_a_no_op(generated: Path) -> None:
    before = {p: p.stat().st_mtime_ns for p in generated.rglob("*")}
    assert synthetic.generate_synthetic(generated, cars=CARS, size=SIZE, seed=SEED) == generated
    assert {p: p.stat().st_mtime_ns for p in generated.rglob("*")} == before


def test_refuses_a_folder_holding_something_else(generated: Path, tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"made with .*seed=0 .*, not .*seed=1 .*; choose another --out"):
        synthetic.generate_synthetic(generated, cars=CARS, size=SIZE, seed=SEED + 1)
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not a synthetic dataset"):
        synthetic.generate_synthetic(other, cars=1, size=SIZE)
    assert [p.name for p in other.iterdir()] == ["notes.txt"]


def test_an_empty_folder_is_filled(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    out = synthetic.generate_synthetic(tmp_path / "empty", cars=1, size=SIZE)
    assert len(ds.find_pairs(out)) == 16


def test_an_interrupted_run_leaves_nothing_that_looks_complete(tmp_path: Path, monkeypatch) -> None:
    saved = []

    def failing_save(mask: np.ndarray, path: Path) -> None:
        if len(saved) == 20:
            raise KeyboardInterrupt
        saved.append(path)

    monkeypatch.setattr(synthetic, "_save_mask", failing_save)
    with pytest.raises(KeyboardInterrupt):
        synthetic.generate_synthetic(tmp_path / "synthetic", cars=2, size=SIZE)
    assert list(tmp_path.iterdir()) == []


def test_two_cars_with_one_id_are_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_car = synthetic._write_synthetic_car
    monkeypatch.setattr(synthetic, "_write_synthetic_car", lambda *args, **kwargs: write_car(*args, **kwargs)[:0])
    with pytest.raises(UserError, match="the same id"):
        synthetic.generate_synthetic(tmp_path / "synthetic", cars=2, size=SIZE)
    assert list(tmp_path.iterdir()) == []


def test_command_line(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "cli"
    assert synthetic.main(["--out", str(out), "--cars", "1", "--size", "48x64", "--seed", "3"]) == 0
    assert "wrote 16 synthetic image/mask pairs" in capsys.readouterr().out
    assert ds.load_mask(ds.find_pairs(out)[0][1]).shape == (48, 64)
    for bad in (["--size", "64by48"], ["--size", "16x48"], ["--cars", "0"], ["--classes", "5"]):
        with pytest.raises(SystemExit) as error:
            synthetic.main(["--out", str(out), *bad])
        assert error.value.code == 2, bad
    capsys.readouterr()
    assert synthetic.main(["--out", str(out), "--cars", "2", "--size", "48x64", "--seed", "3"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert re.search(r"made with cars=1 .*, not cars=2 .*; choose another --out or delete it", err)


def test_help_runs_as_a_program() -> None:
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "synthetic.py", "--help"], cwd=root, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert "--classes" in result.stdout and "byte-identical" in result.stdout
