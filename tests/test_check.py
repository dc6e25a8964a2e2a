"""The dataset check: every bad file is named with its problem, notes don't fail, the cache works, the dataset is
only read."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import check_dataset as cd
import dataset as ds
from utils import UserError

SIZE = (32, 24)  # width, height
GREY_PALETTE = [v for i in range(256) for v in (i, i, i)]
KAGGLE_PALETTE = [0, 0, 0, 255, 255, 255] + [0] * (254 * 3)


def write_photo(path: Path, size: tuple[int, int] = SIZE, seed: int = 0) -> Path:
    """An RGB JPEG of random colours."""
    pixels = np.random.default_rng(seed).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(pixels).save(path, "JPEG", quality=90)
    return path


def write_mask(path: Path, size: tuple[int, int] = SIZE, car: int = 1, extra: int | None = None,
               palette: list[int] = KAGGLE_PALETTE) -> Path:
    """A palette GIF as Kaggle's: indices 0 (background) and `car`, plus one pixel of `extra` if given."""
    indices = np.zeros((size[1], size[0]), np.uint8)
    indices[size[1] // 4:3 * size[1] // 4, size[0] // 4:3 * size[0] // 4] = car
    if extra is not None:
        indices[0, 0] = extra
    mask = Image.frombytes("P", size, indices.tobytes())
    mask.putpalette(palette)
    mask.save(path, "GIF", optimize=False)  # optimize would renumber the palette indices
    return path


def make_dataset(root: Path, cars: int = 2, views: int = 2) -> Path:
    """A valid Kaggle-layout dataset: `cars` x `views` RGB JPEGs with 0/1 palette GIF masks."""
    (root / "train").mkdir(parents=True)
    (root / "train_masks").mkdir()
    for car in range(cars):
        for view in range(1, views + 1):
            name = f"{car:012x}_{view:02d}"
            write_photo(root / "train" / f"{name}.jpg", seed=car * 100 + view)
            write_mask(root / "train_masks" / f"{name}_mask.gif")
    return root


@pytest.fixture
def data(tmp_path) -> Path:
    return make_dataset(tmp_path / "data")


def photo(data: Path, index: int = 0) -> Path:
    return sorted((data / "train").glob("*.jpg"))[index]


def mask_of(data: Path, index: int = 0) -> Path:
    return ds.mask_path_for(photo(data, index), data)


def run_check(data: Path, capsys, *flags: str) -> tuple[int, list[str]]:
    """Exit status and output lines of `python check_dataset.py DIR`."""
    code = cd.main([str(data), *flags])
    return code, capsys.readouterr().out.splitlines()


def assert_error(data: Path, capsys, path: Path, *words: str) -> str:
    """The check fails (status 1) with one error line naming `path` and holding every word."""
    code, lines = run_check(data, capsys)
    assert code == 1
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1, lines
    assert str(path) in errors[0] and all(w in errors[0] for w in words), errors[0]
    return errors[0]


def test_a_good_dataset_passes(data, capsys):
    report = cd.check_dataset(data, progress=False)
    assert report.ok and report.skipped == 0 and not report.notes
    assert report.pairs == ds.find_pairs(data)
    code, lines = run_check(data, capsys)
    assert code == 0 and lines == ["4 images checked: 4 good pairs, 0 errors, 0 notes"]


def test_photo_without_mask(data, capsys):
    mask_of(data, 1).unlink()
    line = assert_error(data, capsys, photo(data, 1), "no mask", mask_of(data, 1).name)
    assert "add the mask or delete the photo" in line
    report = cd.check_dataset(data, progress=False)
    assert len(report.pairs) == 3 and report.skipped == 1
    assert report.summary() == "4 images checked: 3 good pairs, 1 error, 0 notes"


def test_mask_without_photo(data, capsys):
    orphan = write_mask(data / "train_masks" / "00000000000f_01_mask.gif")
    assert_error(data, capsys, orphan, "no photo", "00000000000f_01.jpg")
    assert len(cd.check_dataset(data, progress=False).pairs) == 4  # the photos themselves are fine


def test_truncated_jpeg(data, capsys):
    victim = photo(data, 2)
    victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 2])
    assert_error(data, capsys, victim, "truncated JPEG", "FF D9")


def test_jpeg_cut_inside_its_header(data, capsys):
    victim = photo(data, 2)
    victim.write_bytes(victim.read_bytes()[:200])
    assert_error(data, capsys, victim, "truncated")


def test_truncated_mask(data, capsys):
    victim = mask_of(data, 0)
    victim.write_bytes(victim.read_bytes()[:-1])  # just the 3B trailer gone
    assert_error(data, capsys, victim, "truncated GIF")


def test_trailing_padding_after_the_end_marker_is_fine(data, capsys):
    with open(photo(data), "ab") as f:
        f.write(b"\0" * 100 + b"\n")
    assert run_check(data, capsys)[0] == 0


def test_zero_byte_file(data, capsys):
    photo(data, 3).write_bytes(b"")
    assert_error(data, capsys, photo(data, 3), "empty file (0 bytes)")


def test_text_file_named_jpg(data, capsys):
    photo(data, 1).write_text("<html><body>404 Not Found</body></html>\n")
    assert_error(data, capsys, photo(data, 1), "not an image", "404 Not Found")


def test_binary_junk_named_jpg(data, capsys):
    photo(data, 1).write_bytes(bytes(range(256)))
    assert_error(data, capsys, photo(data, 1), "not an image")


def test_mask_size_differs_from_its_photo(data, capsys):
    write_mask(mask_of(data, 2), size=(16, 12))
    assert_error(data, capsys, mask_of(data, 2), "16x12", "32x24", photo(data, 2).name)


def test_a_sideways_photo_is_checked_at_the_size_viewers_show(data, capsys):
    exif = Image.Exif()
    exif[0x0112] = 6  # viewers (and load_image) turn the photo a quarter: its width and height swap
    Image.new("RGB", (SIZE[1], SIZE[0])).save(photo(data, 1), exif=exif)  # shown 32x24, as its mask: fine
    Image.new("RGB", SIZE).save(photo(data, 2), exif=exif)  # stored as its mask, but shown 24x32
    assert_error(data, capsys, mask_of(data, 2), "mask is 32x24", "is 24x32", photo(data, 2).name)


def test_mask_values_other_than_binary(data, capsys):
    write_mask(mask_of(data, 1), extra=7, palette=GREY_PALETTE)
    assert_error(data, capsys, mask_of(data, 1), "values {0, 1, 7}")


def test_mask_palette_that_would_load_inverted(data, capsys):
    write_mask(mask_of(data, 0), palette=[255, 255, 255, 0, 0, 0] + [0] * (254 * 3))
    assert_error(data, capsys, mask_of(data, 0), "palette", "index 0")


def test_masks_holding_0_and_255_are_accepted(data, capsys):
    write_mask(mask_of(data, 0), car=255, palette=GREY_PALETTE)  # PIL opens grey palettes as 'L'
    colours = [0, 0, 0] + [255, 0, 0] * 254 + [255, 255, 255]  # not grey: stays 'P', indices 0 and 255
    write_mask(mask_of(data, 1), car=255, palette=colours)
    assert {Image.open(mask_of(data, i)).mode for i in (0, 1)} == {"L", "P"}
    assert run_check(data, capsys) == (0, ["4 images checked: 4 good pairs, 0 errors, 0 notes"])
    assert ds.load_mask(mask_of(data, 0)).max() == ds.load_mask(mask_of(data, 1)).max() == 1


def write_grey(path: Path) -> np.ndarray:
    Image.new("L", SIZE, 128).save(path, "JPEG", quality=95)
    return np.full((SIZE[1], SIZE[0], 3), 128)


def write_rgba(path: Path) -> np.ndarray:
    Image.new("RGBA", SIZE, (10, 200, 30, 0)).save(path, "PNG")  # PNG bytes under the .jpg name
    return np.full((SIZE[1], SIZE[0], 3), (10, 200, 30))  # alpha dropped, colours kept


def write_cmyk(path: Path) -> np.ndarray:
    Image.new("CMYK", SIZE, (0, 0, 0, 0)).save(path, "JPEG", quality=95)
    return np.full((SIZE[1], SIZE[0], 3), 255)  # no ink: white


def write_16bit(path: Path) -> np.ndarray:
    Image.fromarray(np.full((SIZE[1], SIZE[0]), 0x8080, np.uint16)).save(path, "PNG")
    return np.full((SIZE[1], SIZE[0], 3), 128)  # 32896 / 257: scaled, not clipped to 255


@pytest.mark.parametrize("write, mode, words", [
    (write_grey, "L", "grayscale"),
    (write_rgba, "RGBA", "drops the alpha"),
    (write_cmyk, "CMYK", "CMYK"),
    (write_16bit, "I;16", "16-bit"),
])
def test_photo_modes_are_noted_and_loaded_as_rgb(data, capsys, write, mode, words):
    expected = write(photo(data, 1))
    code, lines = run_check(data, capsys)
    assert code == 0
    assert lines[0] == "4 images checked: 4 good pairs, 0 errors, 1 note"
    assert lines[1].startswith("note:") and str(photo(data, 1)) in lines[1]
    assert words in lines[1] and mode[:1] in lines[1]
    assert len(cd.check_dataset(data, progress=False).pairs) == 4
    for size in (None, (12, 16)):
        image = ds.load_image(photo(data, 1), size)
        assert image.dtype == np.uint8 and image.shape == (*(size or (SIZE[1], SIZE[0])), 3)
        assert np.abs(image.astype(int) - expected[:image.shape[0], :image.shape[1]]).max() <= 2


@pytest.mark.parametrize("layout", ["missing", "empty", "no masks", "no photos"])
def test_empty_or_missing_folder_is_one_error_naming_the_layout(tmp_path, capsys, layout):
    data = tmp_path / "data"
    if layout == "no masks":
        make_dataset(data)
        for mask in (data / "train_masks").iterdir():
            mask.unlink()
    elif layout == "no photos":
        make_dataset(data)
        for image in (data / "train").iterdir():
            image.unlink()
    elif layout == "empty":
        data.mkdir()
    code, lines = run_check(data, capsys)
    assert code == 1 and len(lines) == 2, lines
    assert str(data) in lines[1]
    assert "DIR/train/*.jpg" in lines[1] and "DIR/train_masks/*_mask.gif" in lines[1]
    photos = 4 if layout == "no masks" else 0  # photos without masks are no pairs: counted as images
    assert lines[0] == f"{photos} image{'' if photos == 1 else 's'} checked: 0 good pairs, 1 error, 0 notes"


@pytest.mark.parametrize("folder", ["train", "train_masks"])
def test_a_folder_inside_the_dataset_names_the_dataset_to_pass(data, capsys, folder):
    code, lines = run_check(data / folder, capsys)  # the common slip: check_dataset.py data/carvana/train
    assert code == 1 and lines[1] == (f"error: {data / folder} holds neither train/ nor images/; it is the {folder}/ "
                                      f"folder of the dataset in {data}: pass {data}")


def test_only_a_layout_folder_of_a_dataset_points_to_its_parent(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "masks").mkdir()
    (tmp_path / "other").mkdir()
    assert ds.dataset_above(tmp_path / "images").endswith(f"images/ folder of the dataset in {tmp_path}: pass "
                                                          f"{tmp_path}")
    assert ds.dataset_above(tmp_path / "other") == ""  # not one of the layout's folders
    assert ds.dataset_above(tmp_path) == ""  # the dataset itself
    (tmp_path / "images" / "images").mkdir()
    assert ds.dataset_above(tmp_path / "images") == ""  # a dataset of its own


def test_hidden_files_are_ignored(data, capsys):
    (data / "train" / "._000000000000_01.jpg").write_bytes(b"\0\1junk")
    (data / "train" / ".DS_Store").write_bytes(b"\0")
    (data / "train_masks" / "._000000000000_01_mask.gif").write_bytes(b"junk")
    (data / "train_masks" / ".DS_Store").write_bytes(b"")
    assert run_check(data, capsys) == (0, ["4 images checked: 4 good pairs, 0 errors, 0 notes"])


def test_no_traceback_when_pil_raises_something_unexpected(data, monkeypatch):
    def broken(img):
        raise SyntaxError("not a GIF file")
    monkeypatch.setattr(cd, "decode_mask_values", broken)
    report = cd.check_dataset(data, progress=False)
    assert len(report.errors) == 4 and "SyntaxError: not a GIF file" in report.errors[0]


def refuse_to_decode(img):
    raise AssertionError("the mask was decoded again")


def test_second_run_uses_the_cache(data, monkeypatch):
    first = cd.check_dataset(data, progress=False)
    assert cd.cache_path(data).is_file()
    monkeypatch.setattr(cd, "decode_mask_values", refuse_to_decode)
    assert cd.check_dataset(data, progress=False) == first


def test_bad_verdicts_are_cached_too(data, monkeypatch):
    write_mask(mask_of(data, 1), extra=7, palette=GREY_PALETTE)
    first = cd.check_dataset(data, progress=False)
    monkeypatch.setattr(cd, "decode_mask_values", refuse_to_decode)
    assert cd.check_dataset(data, progress=False) == first and len(first.errors) == 1


def test_a_touched_file_is_decoded_again_and_only_it(data, monkeypatch):
    cd.check_dataset(data, progress=False)
    victim = mask_of(data, 0)
    stat = victim.stat()
    os.utime(victim, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # same bytes, new mtime
    decoded = []
    real = cd.decode_mask_values
    monkeypatch.setattr(cd, "decode_mask_values", lambda img: decoded.append(img) or real(img))
    assert cd.check_dataset(data, progress=False).ok
    assert len(decoded) == 1


def test_other_classes_are_checked_again_not_taken_from_the_cache(data):
    assert cd.check_dataset(data, progress=False).ok
    report = cd.check_dataset(data, progress=False, classes=2)  # index 1 is fine as a class, but re-decoded
    assert report.ok
    write_mask(mask_of(data, 2), car=3)
    assert len(cd.check_dataset(data, progress=False, classes=3).errors) == 1


def test_no_cache_flag_neither_reads_nor_writes(data, capsys):
    assert run_check(data, capsys, "--no-cache")[0] == 0
    assert not cd.cache_path(data).exists()


def test_an_outdated_or_corrupt_cache_is_ignored_and_rewritten(data):
    cache = cd.cache_path(data)
    cache.parent.mkdir(parents=True, exist_ok=True)
    for junk in ('{"version": 1, "files": {"train/000000000000_01.jpg": {"bytes": 0}}}', "{not json"):
        cache.write_text(junk)
        assert cd.check_dataset(data, progress=False).ok
        assert json.loads(cache.read_text())["version"] == cd.CACHE_VERSION


def test_the_check_only_reads_the_dataset_even_a_read_only_one(data, capsys):
    before = sorted((p, p.stat().st_mtime_ns) for p in data.rglob("*"))
    data.chmod(0o555)
    try:
        assert run_check(data, capsys)[0] == 0
    finally:
        data.chmod(0o755)
    assert sorted((p, p.stat().st_mtime_ns) for p in data.rglob("*")) == before  # nothing written or touched


def test_a_modified_file_is_checked_again(data, monkeypatch):
    assert cd.check_dataset(data, progress=False).ok
    victim = mask_of(data, 3)
    mtime_ns = victim.stat().st_mtime_ns
    write_mask(victim, extra=7, palette=GREY_PALETTE)
    os.utime(victim, ns=(mtime_ns, mtime_ns + 10**9))  # a later mtime even on coarse clocks
    report = cd.check_dataset(data, progress=False)
    assert len(report.errors) == 1 and str(victim) in report.errors[0] and "7" in report.errors[0]


def test_checking_in_threads_gives_the_same_verdicts(tmp_path):
    # 80 files: enough for the check to use 2 threads (it does so from 32 files to inspect).
    data = make_dataset(tmp_path / "many", cars=20, views=2)
    write_mask(mask_of(data, 5), extra=7, palette=GREY_PALETTE)
    photo(data, 30).write_bytes(photo(data, 30).read_bytes()[:200])  # truncated
    images, masks = ds.list_images(data), set(ds.list_masks(data))
    alone = cd.inspect_files(data, images, masks, progress=False, cache=False, workers=1)
    forked = cd.inspect_files(data, images, masks, progress=False, cache=False, workers=2)
    assert forked == alone and list(forked) == list(alone)
    bad = {path for path, verdict in forked.items() if verdict.problem}
    assert bad == {mask_of(data, 5), photo(data, 30)}


def test_usable_pairs_of_a_good_dataset(data, capsys):
    assert cd.usable_pairs(data) == ds.find_pairs(data)
    assert capsys.readouterr().err == ""


def test_usable_pairs_refuses_errors_unless_skip_bad(data, capsys):
    write_mask(mask_of(data, 1), extra=7, palette=GREY_PALETTE)
    with pytest.raises(UserError,
                       match="4 images checked: 3 good pairs, 1 error.*--skip-bad to train on the 3 good pairs"):
        cd.usable_pairs(data)
    assert f"error: {mask_of(data, 1)}: values {{0, 1, 7}}" in capsys.readouterr().err
    good = cd.usable_pairs(data, skip_bad=True)
    assert good == [pair for i, pair in enumerate(ds.find_pairs(data)) if i != 1]
    assert "using the 3 good pairs, leaving out 1 image(s)" in capsys.readouterr().err
    assert cd.usable_pairs(data, skip_bad=True, announce=False) == good  # the other processes of a run stay quiet
    assert capsys.readouterr().err == ""


def test_usable_pairs_lists_the_first_ten_errors_and_refuses_no_pairs(data, capsys):
    for car in range(12):
        write_mask(data / "train_masks" / f"{0xf00 + car:012x}_01_mask.gif")  # orphans
    assert len(cd.usable_pairs(data, skip_bad=True)) == 4
    err = capsys.readouterr().err.splitlines()
    assert sum(line.startswith("error: ") for line in err) == 10
    assert f"... and 2 more errors: python check_dataset.py {data} lists them all" in err
    for image in (data / "train").iterdir():
        image.unlink()
    with pytest.raises(UserError, match="no usable image/mask pairs"):
        cd.usable_pairs(data, skip_bad=True)


def test_the_program_names_every_broken_file(tmp_path):
    data = make_dataset(tmp_path / "data", cars=4, views=2)
    truncated, empty = photo(data, 0), photo(data, 1)
    truncated.write_bytes(truncated.read_bytes()[:truncated.stat().st_size // 2])
    empty.write_bytes(b"")
    bad_values, wrong_size = write_mask(mask_of(data, 2), extra=7, palette=GREY_PALETTE), mask_of(data, 3)
    write_mask(wrong_size, size=(16, 12))
    mask_of(data, 4).unlink()
    orphan = write_mask(data / "train_masks" / "00000000000f_01_mask.gif")
    broken = [truncated, empty, bad_values, wrong_size, photo(data, 4), orphan]
    run = subprocess.run([sys.executable, "check_dataset.py", str(data)], cwd=Path(cd.__file__).parent,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 1 and "Traceback" not in run.stderr, run.stderr
    lines = run.stdout.splitlines()
    assert lines[0] == "8 images checked: 3 good pairs, 6 errors, 0 notes"
    errors = [line for line in lines if line.startswith("error: ")]
    assert len(errors) == 6
    for path in broken:
        assert sum(line.startswith(f"error: {path}: ") for line in errors) == 1, (path, errors)
    for good in range(5, 8):
        assert not any(photo(data, good).name in line for line in errors)
    usage = subprocess.run([sys.executable, "check_dataset.py", "--help"], cwd=Path(cd.__file__).parent,
                           capture_output=True, text=True, timeout=120)
    assert usage.returncode == 0 and usage.stdout.startswith("usage: check_dataset.py") and "--classes" in usage.stdout


@pytest.mark.parametrize("classes", ["0", "-2", "257"])
def test_a_class_count_train_py_would_refuse_is_refused_here_too(tmp_path, capsys, classes):
    with pytest.raises(SystemExit) as error:
        cd.main([str(tmp_path), "--classes", classes])
    assert error.value.code == 2 and "--classes must be 1 (binary) or 2..256" in capsys.readouterr().err
