"""export.py and predict.py --checkpoint model.onnx on CPU with a tiny U-Net: the self-check, the metadata,
masks equal to the checkpoint's at odd photo sizes, and one-line user errors."""
from __future__ import annotations

import contextlib
import io
import re
import sys
from pathlib import Path

import numpy as np
import onnxruntime
import pytest
import torch
from PIL import Image

import export
import predict
import utils
from dataset import load_image
from model import UNet
from carvana_files import write_blob_photos

TRAIN_SIZE = (32, 48)  # (height, width) in the checkpoint's config
PHOTO_SIZES = {"odd.png": (97, 61), "wide.jpg": (120, 80), "small.png": (33, 47)}  # name -> PIL (width, height)


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Photos of odd sizes."""
    return write_blob_photos(tmp_path_factory.mktemp("photos"), PHOTO_SIZES)


def save_checkpoint(path: Path, photos: Path, seed: int = 0) -> Path:
    """A tiny binary UNet (3 levels: odd sizes pad at several), its head bias set so masks are neither empty
    nor full, saved the way train.py does."""
    torch.manual_seed(seed)
    model = UNet(features=(4, 8, 16)).eval()
    with torch.no_grad():
        batch = torch.stack([torch.from_numpy(load_image(photos / name, TRAIN_SIZE).copy()) for name in PHOTO_SIZES])
        model.head.bias -= model(batch.permute(0, 3, 1, 2).float() / 255).median()
    config = {"height": TRAIN_SIZE[0], "width": TRAIN_SIZE[1]}
    utils.save_checkpoint({"model": model.state_dict(), "model_config": model.config, "config": config}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory, photos: Path) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("run") / "best.pt", photos)


@pytest.fixture(scope="module")
def exported(checkpoint: Path) -> tuple[Path, str]:
    """(model.onnx, what export.py printed)."""
    output = checkpoint.parent / "model.onnx"
    with contextlib.redirect_stdout(io.StringIO()) as printed:
        assert export.main(["--checkpoint", str(checkpoint), "--output", str(output)]) == 0
    return output, printed.getvalue()


def predict_masks(checkpoint: Path, photos: Path, output: Path, *flags: str) -> dict[str, np.ndarray]:
    """predict.py's masks, by photo name."""
    assert predict.main(["--checkpoint", str(checkpoint), "--input", str(photos), "--output", str(output),
                         "--workers", "0", *flags]) == 0
    masks = {}
    for name in PHOTO_SIZES:
        with Image.open(output / f"{Path(name).stem}_mask.png") as img:
            masks[name] = np.asarray(img)
    return masks


def test_export_checks_itself_and_stores_what_predict_needs(checkpoint: Path, exported: tuple[Path, str]) -> None:
    path, printed = exported
    checks = re.findall(r"self-check (\d+)x(\d+)x(\d+): .* probability (\S+)", printed)
    assert [c[:3] for c in checks] == [("1", "32", "48"), ("2", "33", "51")]  # the training size, and an odd one
    assert all(float(c[3]) <= export.TOLERANCE for c in checks)
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert session.get_modelmeta().custom_metadata_map == {"height": "32", "width": "48", "in_channels": "3",
                                                           "out_channels": "1", "features": "4 8 16"}
    batch, channels, height, width = session.get_inputs()[0].shape
    assert channels == 3 and all(isinstance(d, str) for d in (batch, height, width))  # dynamic, not the trace's
    model, x = utils.model_from_checkpoint(utils.load_checkpoint(checkpoint)).eval(), torch.rand(2, 3, 63, 95)
    with torch.inference_mode():  # 63x95: odd at every level, so padded at each
        assert (export.OnnxModel(path)(x) - model(x)).abs().max() < 1e-4


@pytest.mark.parametrize("tta", [False, True])
def test_onnx_masks_equal_the_checkpoints(checkpoint: Path, exported: tuple[Path, str], photos: Path,
                                          tmp_path: Path, monkeypatch: pytest.MonkeyPatch, tta: bool) -> None:
    # PyTorch in fp32, as ONNX Runtime: on CPUs with bf16 units predict.py would use bf16 (see BENCHMARKS.md).
    monkeypatch.setattr(utils, "autocast_dtype", lambda device, amp="auto": None)
    flags = ["--tta"] if tta else []
    torch_masks = predict_masks(checkpoint, photos, tmp_path / "pt", *flags)
    onnx_masks = predict_masks(exported[0], photos, tmp_path / "onnx", *flags)
    for name, (width, height) in PHOTO_SIZES.items():
        assert onnx_masks[name].shape == (height, width)
        assert 0 < (torch_masks[name] > 0).mean() < 1  # neither empty nor full: a comparison that can fail
        assert (onnx_masks[name] == torch_masks[name]).mean() >= 0.9999, name


def test_checkpoint_predicts_without_the_onnx_packages(checkpoint: Path, photos: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    for module in ("onnx", "onnxruntime", "onnxscript"):
        monkeypatch.setitem(sys.modules, module, None)  # importing it now raises ImportError
    predict_masks(checkpoint, photos, tmp_path)


def test_failed_self_check_writes_nothing(exported: tuple[Path, str], photos: Path, tmp_path: Path,
                                          monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    other = save_checkpoint(tmp_path / "other.pt", photos, seed=1)
    monkeypatch.setattr(export, "to_onnx", lambda *args: exported[0].read_bytes())  # a graph of other weights
    output = tmp_path / "model.onnx"
    assert export.main(["--checkpoint", str(other), "--output", str(output)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "not written: ONNX Runtime differs from PyTorch" in error
    assert not output.exists() and not list(tmp_path.glob(".model.onnx.*"))


def test_onnx_file_takes_predicts_size_check_and_any_device(exported: tuple[Path, str], photos: Path, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture) -> None:
    flags = ["--checkpoint", str(exported[0]), "--input", str(photos), "--output", str(tmp_path), "--workers", "0"]
    assert predict.main([*flags, "--size", "7x9"]) == 2  # three levels: at least 8 pixels
    assert "--size 7x9 is too small for this UNet's 3 levels" in capsys.readouterr().err
    assert predict.main([*flags, "--device", "cuda:7"]) == 0  # ONNX Runtime runs on the CPU whatever --device says
    assert export.OnnxModel(exported[0]).config["features"] == [4, 8, 16]


def test_export_refuses_an_output_that_predict_would_not_read_as_onnx(checkpoint: Path, tmp_path: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    with pytest.raises(SystemExit) as error:
        export.main(["--checkpoint", str(checkpoint), "--output", str(tmp_path / "model")])
    assert error.value.code == 2 and "the name must end in .onnx" in capsys.readouterr().err
    assert not (tmp_path / "model").exists()


@pytest.mark.parametrize("case", ["no checkpoint", "no onnx file", "not onnx", "no onnxruntime", "no onnxscript"])
def test_user_errors_are_one_line(case: str, checkpoint: Path, photos: Path, tmp_path: Path,
                                  monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    onnx_file, expected = tmp_path / "model.onnx", {
        "no checkpoint": "missing.pt: no such checkpoint file", "no onnx file": "model.onnx: no such ONNX file",
        "not onnx": "model.onnx: not an ONNX file written by export.py",
        "no onnxruntime": "model.onnx: needs onnxruntime: pip install -r requirements-onnx.txt",
        "no onnxscript": "model.onnx: needs onnxscript: pip install -r requirements-onnx.txt"}[case]
    if case == "not onnx":
        onnx_file.write_bytes(b"not a protobuf")
    if case.startswith("no onnx") and case != "no onnx file":
        monkeypatch.setitem(sys.modules, case.split()[1], None)
    if case in ("no checkpoint", "no onnxscript"):
        source = tmp_path / "missing.pt" if case == "no checkpoint" else checkpoint
        status = export.main(["--checkpoint", str(source), "--output", str(onnx_file)])
    else:
        status = predict.main(["--checkpoint", str(onnx_file), "--input", str(photos), "--output", str(tmp_path)])
    error = capsys.readouterr().err
    assert status == 2 and error.startswith("error: ") and error.count("\n") == 1 and expected in error
