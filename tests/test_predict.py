"""predict.py on CPU with a tiny U-Net: outputs, submission, thresholds, TTA, bad images, reruns, EXIF orientation
and user errors."""
from __future__ import annotations

import csv
import gzip
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import predict
import utils
from dataset import load_image
from model import UNet
from carvana_files import write_blob_photos
from task import BinaryTask, keep_largest_region

BINARY = BinaryTask()

TRAIN_SIZE = (32, 48)  # (height, width) stored in the checkpoint's config
IMAGE_SIZES = {"a.jpg": (70, 45), "b.png": (64, 64), "c.jpeg": (50, 33)}  # name -> PIL (width, height)


def tiny_unet(seed: int = 0, out_channels: int = 1) -> UNet:
    """A small untrained UNet in eval mode, the same for a given seed."""
    torch.manual_seed(seed)
    return UNet(out_channels=out_channels, features=(4, 8)).eval()


def save_tiny_checkpoint(model: nn.Module, path: Path, config: dict | None = None) -> Path:
    """Save a checkpoint the way train.py does."""
    config = {"height": TRAIN_SIZE[0], "width": TRAIN_SIZE[1]} if config is None else config
    utils.save_checkpoint({"model": model.state_dict(), "model_config": model.config, "config": config}, path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A folder of small photos of different sizes, plus files predict.py must skip."""
    folder = write_blob_photos(tmp_path_factory.mktemp("images"), IMAGE_SIZES)
    (folder / ".hidden.jpg").write_bytes(b"not an image")
    (folder / "._a.jpg").write_bytes(b"macOS fork")
    (folder / "notes.txt").write_text("not an image")
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, images: Path) -> Path:
    """A tiny binary UNet whose head bias is shifted so its masks are neither empty nor full."""
    model = tiny_unet()
    with torch.no_grad():
        batch = torch.stack([torch.from_numpy(load_image(images / name, TRAIN_SIZE).copy())
                             for name in IMAGE_SIZES]).permute(0, 3, 1, 2).float() / 255
        model.head.bias -= model(batch).median()
    return save_tiny_checkpoint(model, tmp_path_factory.mktemp("run") / "best.pt")


def run_main(*argv: str | Path) -> int:
    return predict.main([str(a) for a in argv])


def read_png(path: Path) -> np.ndarray:
    with Image.open(path) as img:
        assert img.mode == "L"
        return np.asarray(img)


# ---------------------------------------------------------------------------------------------
# The command line end to end
# ---------------------------------------------------------------------------------------------

def test_main_writes_masks_overlays_and_submission(tmp_path: Path, images: Path, checkpoint: Path) -> None:
    out = tmp_path / "out"
    submission = out / "submission.csv.gz"
    # batch size 2 puts images of different sizes in one batch; one worker process decodes them.
    assert run_main("--checkpoint", checkpoint, "--input", images, "--output", out, "--overlay", "--tta",
                    "--submission", submission, "--batch-size", "2", "--workers", "1", "--device", "cpu") == 0

    masks = {}
    for name, (width, height) in IMAGE_SIZES.items():
        stem = Path(name).stem
        masks[name] = read_png(out / f"{stem}_mask.png")
        assert masks[name].shape == (height, width)
        assert set(np.unique(masks[name])) <= {0, 255}
        with Image.open(out / f"{stem}_overlay.jpg") as overlay:
            assert overlay.size == (width, height) and overlay.mode == "RGB"
    values = np.concatenate([m.ravel() for m in masks.values()])
    assert 0 < (values == 255).mean() < 1, "the calibrated model should predict mixed masks"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [f"{Path(n).stem}_{kind}" for n in IMAGE_SIZES for kind in ("mask.png", "overlay.jpg")]
        + ["submission.csv.gz"])  # nothing for the skipped files, no temporary file left

    with gzip.open(submission, "rt", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["img", "rle_mask"]
    assert [name for name, _ in rows[1:]] == sorted(IMAGE_SIZES)
    for name, rle in rows[1:]:
        np.testing.assert_array_equal(predict.rle_decode(rle, masks[name].shape) * 255, masks[name])


@pytest.mark.parametrize("threshold, expected", [("0", 255), ("1", 0)])
def test_threshold_extremes_give_full_and_empty_masks(tmp_path: Path, images: Path, checkpoint: Path,
                                                      threshold: str, expected: int) -> None:
    submission = tmp_path / "submission.csv"  # plain csv this time
    assert run_main("--checkpoint", checkpoint, "--input", images, "--output", tmp_path, "--threshold", threshold,
                    "--submission", submission, "--workers", "0", "--device", "cpu") == 0
    for name, (width, height) in IMAGE_SIZES.items():
        mask = read_png(tmp_path / f"{Path(name).stem}_mask.png")
        assert mask.shape == (height, width) and (mask == expected).all()
    with open(submission, newline="") as f:
        rows = list(csv.reader(f))[1:]
    full = {name: f"1 {w * h}" for name, (w, h) in IMAGE_SIZES.items()}
    assert dict(rows) == (full if expected else {name: "" for name in IMAGE_SIZES})


def test_masks_are_thresholded_after_upsampling(monkeypatch: pytest.MonkeyPatch, images: Path,
                                                checkpoint: Path) -> None:
    monkeypatch.setattr(utils, "autocast_dtype", lambda device, amp="auto": None)  # float32, to compare exactly
    model, size = predict.load_segmentation_model(checkpoint, torch.device("cpu"))
    paths = predict.find_images([images])
    results = list(predict.predict_paths(model, paths, [size], batch_size=2, tta=True))
    assert [path for path, _, _ in results] == paths and not any(problem for _, _, problem in results)
    for path, mask, _ in results:
        x = torch.from_numpy(load_image(path, size).copy()).permute(2, 0, 1)[None].float() / 255
        with Image.open(path) as img:
            width, height = img.size
        probs = predict.upsample_to(predict.predict_probabilities(model, x, BINARY, tta=True), (height, width))
        assert mask.dtype == bool and mask.shape == (height, width)
        np.testing.assert_array_equal(mask, probs[0, 0].numpy() > 0.5)


def test_several_sizes_average_their_probabilities_at_the_photos_size(monkeypatch: pytest.MonkeyPatch, images: Path,
                                                                     checkpoint: Path) -> None:
    monkeypatch.setattr(utils, "autocast_dtype", lambda device, amp="auto": None)  # float32, to compare exactly
    model, size = predict.load_segmentation_model(checkpoint, torch.device("cpu"))
    paths, sizes = predict.find_images([images]), [size, (48, 80)]
    results = list(predict.predict_paths(model, paths, sizes, batch_size=2))
    single = [mask for _, mask, _ in predict.predict_paths(model, paths, [size], batch_size=2)]
    for (path, mask, problem), one_size in zip(results, single):
        with Image.open(path) as img:
            width, height = img.size
        probs = []
        for input_size in sizes:
            x = torch.from_numpy(load_image(path, input_size).copy()).permute(2, 0, 1)[None].float() / 255
            probs.append(predict.upsample_to(predict.predict_probabilities(model, x, BINARY), (height, width)))
        assert not problem and mask.shape == (height, width)
        np.testing.assert_array_equal(mask, ((probs[0] + probs[1]) / 2)[0, 0].numpy() > 0.5)
    assert any(not np.array_equal(mask, one) for (_, mask, _), one in zip(results, single))  # the sizes matter


def test_size_flag_names_the_inputs_and_refuses_a_malformed_size(tmp_path: Path, images: Path, checkpoint: Path,
                                                                 capsys: pytest.CaptureFixture) -> None:
    assert run_main("--checkpoint", checkpoint, "--input", images, "--output", tmp_path, "--size", "48x80", "32x48",
                    "--workers", "0", "--device", "cpu") == 0
    assert "model input 48x80 + 32x48" in capsys.readouterr().out
    assert all((tmp_path / f"{Path(name).stem}_mask.png").is_file() for name in IMAGE_SIZES)
    with pytest.raises(SystemExit) as exit_info:
        predict.parse_args(["--checkpoint", "c.pt", "--input", "x", "--output", "o", "--size", "384"])
    assert exit_info.value.code == 2 and "HEIGHTxWIDTH" in capsys.readouterr().err
    # two levels halve the size twice: 3 rows are too few, and the error says so instead of a traceback
    assert run_main("--checkpoint", checkpoint, "--input", images, "--output", tmp_path, "--size", "3x48",
                    "--workers", "0", "--device", "cpu") == 2
    assert "--size 3x48 is too small for this UNet's 2 levels: height and width must be at least 4" in \
        capsys.readouterr().err


def test_postprocess_keeps_each_masks_largest_region(images: Path, checkpoint: Path) -> None:
    model, size = predict.load_segmentation_model(checkpoint, torch.device("cpu"))
    paths = predict.find_images([images])
    plain = [mask for _, mask, _ in predict.predict_paths(model, paths, [size], amp="off")]
    cleaned = [mask for _, mask, _ in predict.predict_paths(model, paths, [size], amp="off", postprocess=True)]
    for before, after in zip(plain, cleaned):
        np.testing.assert_array_equal(after, keep_largest_region(before))
    assert any(not np.array_equal(before, after) for before, after in zip(plain, cleaned))  # the test bites


# ---------------------------------------------------------------------------------------------
# The model-side helpers train.py reuses
# ---------------------------------------------------------------------------------------------

def test_tta_is_the_mean_of_plain_and_mirrored_predictions() -> None:
    model = tiny_unet(seed=1)
    x = torch.rand(3, 3, *TRAIN_SIZE)
    with torch.no_grad():
        expected = (model(x).sigmoid() + model(x.flip(-1)).sigmoid().flip(-1)) / 2
    torch.testing.assert_close(predict.predict_probabilities(model, x, BINARY, tta=True), expected)
    plain = predict.predict_probabilities(model, x, BINARY)
    assert plain.dtype == torch.float32 and plain.shape == (3, 1, *TRAIN_SIZE)
    assert not torch.allclose(plain, expected), "this model is not mirror-symmetric, so TTA must change things"


def test_tta_prediction_is_mirror_equivariant() -> None:
    model = tiny_unet(seed=2)
    x = torch.rand(2, 3, *TRAIN_SIZE)
    torch.testing.assert_close(predict.predict_probabilities(model, x.flip(-1), BINARY, tta=True),
                               predict.predict_probabilities(model, x, BINARY, tta=True).flip(-1))


def test_tta_changes_nothing_for_a_mirror_symmetric_model() -> None:
    # Mirror-symmetric kernels make the whole UNet commute with horizontal flips (the width, 48, is
    # a multiple of 4, so its two poolings pair the same columns either way): TTA must equal plain.
    model = tiny_unet(seed=3)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Conv2d, nn.ConvTranspose2d)):
                module.weight.copy_((module.weight + module.weight.flip(-1)) / 2)
    x = torch.rand(2, 3, *TRAIN_SIZE)  # any input, not only a symmetric one
    torch.testing.assert_close(predict.predict_probabilities(model, x, BINARY, tta=True),
                               predict.predict_probabilities(model, x, BINARY), atol=1e-6, rtol=1e-5)


def test_upsample_to_is_bilinear_without_corner_alignment() -> None:
    probs = torch.rand(2, 1, 8, 12)
    assert predict.upsample_to(probs, (8, 12)) is probs
    up = predict.upsample_to(probs, (45, 70))
    assert up.shape == (2, 1, 45, 70)
    torch.testing.assert_close(up, F.interpolate(probs, size=(45, 70), mode="bilinear", align_corners=False))


# ---------------------------------------------------------------------------------------------
# Finding images
# ---------------------------------------------------------------------------------------------

def test_find_images_sorts_folders_skips_hidden_and_repeats(images: Path) -> None:
    found = predict.find_images([images / "c.jpeg", images, images / "b.png"])
    assert [p.name for p in found] == ["c.jpeg", "a.jpg", "b.png"]


def test_same_stem_in_two_inputs_is_refused(tmp_path: Path, images: Path, checkpoint: Path,
                                           capsys: pytest.CaptureFixture) -> None:
    other = tmp_path / "other"
    other.mkdir()
    Image.new("RGB", (8, 8)).save(other / "a.png")
    assert run_main("--checkpoint", checkpoint, "--input", images, other, "--output", tmp_path / "out") == 2
    assert "a_mask.png" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# User errors: one line, exit status 2, no traceback
# ---------------------------------------------------------------------------------------------

def assert_user_error(capsys: pytest.CaptureFixture, *needles: str | Path) -> None:
    """stderr holds no traceback and ends with one error line naming the needles (after any progress bar)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith("error: ") and err.endswith(errors[0] + "\n"), err
    for needle in needles:
        assert str(needle) in errors[0], err


def test_missing_input_path(tmp_path: Path, images: Path, checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "no-such-photo.jpg"
    assert run_main("--checkpoint", checkpoint, "--input", images, missing, "--output", tmp_path / "out") == 2
    assert_user_error(capsys, missing, "no such file")
    assert not (tmp_path / "out").exists()


def test_folder_without_images(tmp_path: Path, checkpoint: Path, capsys: pytest.CaptureFixture) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / ".hidden.jpg").write_bytes(b"")
    (empty / "readme.txt").write_text("")
    assert run_main("--checkpoint", checkpoint, "--input", empty, "--output", tmp_path / "out") == 2
    assert_user_error(capsys, empty, "no images")
    (empty / "test").mkdir()  # a dataset's root, say, whose photos lie in test/
    assert run_main("--checkpoint", checkpoint, "--input", empty, "--output", tmp_path / "out") == 2
    assert_user_error(capsys, empty, f"may be in a folder below it: {empty / 'test'}")


@pytest.mark.parametrize("problem", [
    "missing", "truncated", "no training size", "multi-class submission", "text",
])
def test_bad_checkpoint(tmp_path: Path, images: Path, capsys: pytest.CaptureFixture, problem: str) -> None:
    path = tmp_path / "best.pt"
    extra = []
    if problem == "truncated":
        save_tiny_checkpoint(tiny_unet(), path)
        path.write_bytes(path.read_bytes()[:1000])
    elif problem == "text":
        path.write_bytes(b"this is not a checkpoint")
    elif problem == "no training size":
        save_tiny_checkpoint(tiny_unet(), path, config={})
    elif problem == "multi-class submission":  # Kaggle's RLE is binary
        save_tiny_checkpoint(tiny_unet(out_channels=3), path)
        extra = ["--submission", tmp_path / "submission.csv"]
    assert run_main("--checkpoint", path, "--input", images, "--output", tmp_path / "out", "--device", "cpu",
                    *extra) == 2
    assert_user_error(capsys, path)


# ---------------------------------------------------------------------------------------------
# Real folders: bad images, reruns, EXIF orientation
# ---------------------------------------------------------------------------------------------

def read_submission(path: Path) -> list[list[str]]:
    with gzip.open(path, "rt", newline="") as f:
        return list(csv.reader(f))


def stamps(folder: Path) -> dict[str, tuple[int, int]]:
    """{file name: (inode, mtime)}: a file rewritten atomically gets a new inode."""
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in folder.iterdir()}


@pytest.mark.parametrize("workers", ["0", "1"])
def test_bad_images_are_listed_after_every_good_mask_and_leave_no_submission(
        tmp_path: Path, images: Path, checkpoint: Path, capsys: pytest.CaptureFixture, workers: str) -> None:
    photos = shutil.copytree(images, tmp_path / "photos")
    truncated = photos / "d.jpg"  # cut to half its bytes: PIL must refuse it, not decode the half
    truncated.write_bytes((photos / "a.jpg").read_bytes()[:(photos / "a.jpg").stat().st_size // 2])
    broken = photos / "e.jpg"
    broken.write_bytes(b"not a jpeg")
    out, submission = tmp_path / "out", tmp_path / "submission.csv.gz"
    assert run_main("--checkpoint", checkpoint, "--input", photos, "--output", out, "--submission", submission,
                    "--batch-size", "2", "--workers", workers, "--device", "cpu") == 2
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{Path(n).stem}_mask.png" for n in IMAGE_SIZES)
    assert not submission.exists() and not list(tmp_path.glob(".*.tmp"))
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = err.splitlines()
    assert f"error: {truncated}: cannot read the image (OSError: image file is truncated" in err
    assert any(line.startswith(f"error: {broken}: cannot read the image") for line in lines), err
    assert lines[-1].startswith("error: 2 of 5 image(s) failed") and str(submission) in lines[-1], err

    # Once the bad files are gone, a rerun predicts nothing again and writes the whole submission.
    truncated.unlink()
    broken.unlink()
    before = stamps(out)
    assert run_main("--checkpoint", checkpoint, "--input", photos, "--output", out, "--submission", submission,
                    "--workers", workers, "--device", "cpu") == 0
    assert "3 already done" in capsys.readouterr().out
    assert stamps(out) == before
    rows = read_submission(submission)
    assert [name for name, _ in rows[1:]] == sorted(IMAGE_SIZES)
    for name, rle in rows[1:]:
        mask = read_png(out / f"{Path(name).stem}_mask.png")
        np.testing.assert_array_equal(predict.rle_decode(rle, mask.shape) * 255, mask)


def test_a_rerun_predicts_only_what_is_missing(tmp_path: Path, images: Path, checkpoint: Path,
                                              capsys: pytest.CaptureFixture) -> None:
    out, submission = tmp_path / "out", tmp_path / "submission.csv.gz"
    args = ["--checkpoint", checkpoint, "--input", images, "--output", out, "--workers", "0", "--device", "cpu"]
    assert run_main(*args, "--submission", submission) == 0
    first = read_submission(submission)
    (out / "b_mask.png").unlink()
    before = stamps(out)
    assert run_main(*args, "--submission", submission) == 0
    assert "2 already done" in capsys.readouterr().out
    after = stamps(out)
    assert {name: after[name] for name in ("a_mask.png", "c_mask.png")} == \
        {name: before[name] for name in ("a_mask.png", "c_mask.png")}
    assert read_submission(submission) == first  # the skipped images' rows come from their masks

    # --overlay skips an image only when its overlay is there too; --overwrite predicts every image again.
    assert run_main(*args, "--overlay") == 0
    assert "already done" not in capsys.readouterr().out
    assert all((out / f"{Path(name).stem}_overlay.jpg").is_file() for name in IMAGE_SIZES)
    before = stamps(out)
    assert run_main(*args, "--overlay") == 0
    assert "3 already done" in capsys.readouterr().out and stamps(out) == before
    assert run_main(*args, "--overwrite") == 0
    after = stamps(out)
    assert all(after[f"{Path(n).stem}_mask.png"] != before[f"{Path(n).stem}_mask.png"] for n in IMAGE_SIZES)


def test_a_decompression_bomb_is_listed_not_fatal(tmp_path: Path, images: Path, checkpoint: Path,
                                                 monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture) -> None:
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 64 * 64)  # PIL refuses images over twice as many pixels
    bomb = tmp_path / "bomb.png"
    Image.new("RGB", (100, 100)).save(bomb)
    out = tmp_path / "out"
    assert run_main("--checkpoint", checkpoint, "--input", images, bomb, "--output", out, "--workers", "0",
                    "--device", "cpu") == 2
    err = capsys.readouterr().err
    assert f"error: {bomb}: cannot read the image (DecompressionBombError" in err and "Traceback" not in err
    assert sorted(p.name for p in out.iterdir()) == sorted(f"{Path(n).stem}_mask.png" for n in IMAGE_SIZES)


def test_a_sideways_photo_gets_a_mask_of_the_size_viewers_show(tmp_path: Path, images: Path,
                                                             checkpoint: Path) -> None:
    with Image.open(images / "a.jpg") as img:  # stored 70 wide, 45 high
        exif = Image.Exif()
        exif[0x0112] = 6  # viewers turn it 90 degrees clockwise: 45 wide, 70 high
        img.save(tmp_path / "sideways.jpg", exif=exif)
    out = tmp_path / "out"
    assert run_main("--checkpoint", checkpoint, "--input", tmp_path / "sideways.jpg", "--output", out, "--overlay",
                    "--workers", "0", "--device", "cpu") == 0
    assert read_png(out / "sideways_mask.png").shape == (70, 45)
    with Image.open(out / "sideways_overlay.jpg") as overlay:
        assert overlay.size == (45, 70)


@pytest.mark.parametrize("second", ["b/X.png", "b/x.png", "a/x.PNG"])
def test_two_images_that_would_write_one_mask_file_are_refused(second):
    # b/x.png would write x_mask.png, the same file as X_mask.png where file names ignore case (Windows, macOS)
    with pytest.raises(predict.UserError, match="would both write") as error:
        predict.check_output_names([Path("a/X.jpg"), Path("a/Y.jpg"), Path(second)])
    assert "a/X.jpg" in str(error.value) and second in str(error.value)
    predict.check_output_names([Path("a/X.jpg"), Path("a/Y.jpg"), Path("b/Z.png")])  # distinct names pass
