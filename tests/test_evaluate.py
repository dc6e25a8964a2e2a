"""evaluate.py: a checkpoint's scores at the training size and at the original size, on its held-out images."""
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import evaluate
import predict
import utils
from dataset import load_mask
from conftest import one_epoch_run

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def run_dir(synthetic_dir, tmp_path_factory) -> Path:
    return one_epoch_run(synthetic_dir, tmp_path_factory.mktemp("run"), "--num-predictions", "0")


def scratch_copy(run_dir: Path, tmp_path: Path) -> Path:
    """A folder holding a copy of the run's best.pt: evaluate.py writes its report beside the checkpoint."""
    copy = tmp_path / "run"
    copy.mkdir()
    shutil.copy(run_dir / "best.pt", copy / "best.pt")
    return copy


def test_evaluate_prints_metrics_at_both_resolutions(run_dir, synthetic_dir, capsys):
    assert evaluate.main(["--checkpoint", str(run_dir / "best.pt"), "--data-dir", str(synthetic_dir),
                          "--workers", "0", "--tta"]) == 0
    out = capsys.readouterr().out
    assert "32x48 (training)" in out and "64x96 (original)" in out and "mean Dice" in out
    assert "16 images (1 car)" in out and "held out from training" in out
    rows = [line for line in out.splitlines() if line.startswith(("32x48", "64x96"))]
    assert len(rows) == 6  # training size, original size and one region, each with and without TTA
    assert sum(row.startswith("64x96, one region") for row in rows) == 2
    assert "mean Dice at the original size without TTA, by threshold: 0.3: " in out
    assert len((run_dir / "per_image.csv").read_text().splitlines()) == 1 + 16  # the header, then each image


def test_a_broken_photo_is_listed_and_left_out_not_a_reason_to_score_nothing(run_dir, synthetic_dir, tmp_path,
                                                                              capsys):
    data = tmp_path / "data"
    shutil.copytree(synthetic_dir, data)
    trained = json.loads((run_dir / "split.json").read_text())["train"][0]
    broken = sorted((data / "train").glob(f"{trained}_*.jpg"))[0]
    broken.write_bytes(b"")  # a training car's photo: the held-out cars can still be scored
    copy = scratch_copy(run_dir, tmp_path)
    assert evaluate.main(["--checkpoint", str(copy / "best.pt"), "--data-dir", str(data), "--workers", "0"]) == 0
    out, err = capsys.readouterr()
    assert f"{broken}: " in err and "leaving out 1 image(s) with the errors above" in err and "--skip-bad" not in err
    assert "16 images (1 car)" in out and "held out from training" in out


def test_amp_is_the_runs_unless_given(run_dir, synthetic_dir, tmp_path, monkeypatch):
    seen = []
    create = evaluate.Setup.create
    monkeypatch.setattr(evaluate.Setup, "create", lambda config, *a: seen.append(config.amp) or create(config, *a))
    copy = scratch_copy(run_dir, tmp_path)
    for extra in ([], ["--amp", "off"]):
        assert evaluate.main(["--checkpoint", str(copy / "best.pt"), "--data-dir", str(synthetic_dir),
                              "--workers", "0", *extra]) == 0
    assert seen == [utils.load_checkpoint(run_dir / "best.pt")["config"]["amp"], "off"]


def test_original_size_rows_score_what_predict_writes_at_several_sizes(run_dir, synthetic_dir, capsys, monkeypatch):
    monkeypatch.setattr(utils, "autocast_dtype", lambda device, amp="auto": None)  # float32, to compare exactly
    sizes = [(32, 48), (48, 64)]
    assert evaluate.main(["--checkpoint", str(run_dir / "best.pt"), "--data-dir", str(synthetic_dir),
                          "--workers", "0", "--size", "32x48", "48x64"]) == 0
    assert "the probabilities at inputs of 32x48 + 48x64 (averaged, " in capsys.readouterr().out
    assert "the model&#x27;s inputs: 32x48 + 48x64" in (run_dir / "report.html").read_text()  # what it scored
    with open(run_dir / "per_image.csv", newline="") as f:
        rows = {row["image"]: row for row in csv.DictReader(f)}
    model, _ = predict.load_segmentation_model(run_dir / "best.pt", torch.device("cpu"))
    paths = [synthetic_dir / "train" / name for name in sorted(rows)]
    for path, mask, _ in predict.predict_paths(model, paths, sizes, workers=0):
        truth = load_mask(synthetic_dir / "train_masks" / f"{path.stem}_mask.gif") > 0
        row = rows[path.name]
        assert (int(row["false_positive_px"]), int(row["false_negative_px"])) == ((mask & ~truth).sum(),
                                                                                  (~mask & truth).sum())


def test_training_size_rows_do_not_depend_on_size(run_dir, synthetic_dir, capsys):
    def rows(*flags: str) -> list[str]:
        assert evaluate.main(["--checkpoint", str(run_dir / "best.pt"), "--data-dir", str(synthetic_dir),
                              "--workers", "0", *flags]) == 0
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith(("32x48", "64x96"))]
    default, larger = rows(), rows("--size", "48x64")  # the training size (32x48) is not among the inputs
    assert [r for r in larger if r.startswith("32x48")] == [r for r in default if r.startswith("32x48")]
    assert len(larger) == len(default) == 3


def test_evaluate_all_reports_every_image_of_the_folder(run_dir, synthetic_dir):
    assert evaluate.main(["--checkpoint", str(run_dir), "--data-dir", str(synthetic_dir), "--all",
                          "--workers", "0"]) == 0
    assert len((run_dir / "per_image.csv").read_text().splitlines()) == 1 + 64
    assert len(list((run_dir / "errors").glob("*.jpg"))) == 64


def test_evaluate_all_scores_every_image_of_a_folder(run_dir, synthetic_dir, capsys):
    assert evaluate.main(["--checkpoint", str(run_dir), "--data-dir", str(synthetic_dir), "--all",
                          "--workers", "0"]) == 0
    assert "64 images (4 cars)" in capsys.readouterr().out


def test_a_folder_without_the_validation_cars_is_refused_in_one_line(run_dir, tmp_path):
    other = tmp_path / "other"
    import synthetic
    synthetic.generate_synthetic(other, cars=2, size=(96, 64), seed=7)
    result = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(run_dir / "best.pt"),
                             "--data-dir", str(other), "--workers", "0"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 1
    assert "--all" in result.stderr and "Traceback" not in result.stderr


def test_evaluate_help_names_every_flag():
    result = subprocess.run([sys.executable, "evaluate.py", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == 0
    for flag in ("--checkpoint", "--data-dir", "--all", "--tta", "--size", "--batch-size", "--workers", "--device"):
        assert flag in result.stdout
