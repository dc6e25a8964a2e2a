"""Crash safety and untrusted checkpoints: nothing lost, nothing run."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import report
import task
import train
import utils
from model import UNet
from stopping import signal_at_loss_call

ROOT = Path(train.__file__).parent
TINY = ["--features", "4", "8", "--height", "32", "--width", "48", "--batch-size", "8", "--workers", "0",
        "--val-cars", "1", "--num-predictions", "1"]


def weights(path):
    return utils.load_checkpoint(path)["model"]


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def metric_rows(run):
    """metrics.csv rows without the wall-clock column."""
    return [{k: v for k, v in r.items() if k != "seconds"} for r in report.read_metrics_csv(run / "metrics.csv")]


@pytest.fixture(scope="module")
def uninterrupted(synthetic_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    assert train.main(["--data-dir", str(synthetic_dir), "--out-dir", str(out), "--epochs", "3", *TINY]) == 0
    return out


def wait_for(predicate, timeout=120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def checkpoint_epoch(path):
    try:
        return utils.load_checkpoint(path)["epoch"]
    except utils.CheckpointError:
        return 0


def test_kill_9_then_resume_equals_the_uninterrupted_run(synthetic_dir, uninterrupted, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--data-dir", str(synthetic_dir), "--out-dir", str(out), "--epochs", "3", *TINY]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        assert wait_for(lambda: checkpoint_epoch(out / "last.pt") >= 1), "the run never finished epoch 1"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        proc.kill()
    killed_at = checkpoint_epoch(out / "last.pt")
    assert killed_at < 3, "the run finished before it could be killed; the test proves nothing"
    assert train.main(["--resume", str(out), "--workers", "0"]) == 0
    assert same_weights(weights(out / "last.pt"), weights(uninterrupted / "last.pt"))
    assert metric_rows(out) == metric_rows(uninterrupted)


def test_signal_mid_epoch_saves_and_resume_is_exact(synthetic_dir, uninterrupted, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    signal_at_loss_call(monkeypatch, 10)  # step 2 of epoch 2 (8 calls an epoch: 6 training steps, 2 validation)
    code = train.main(["--data-dir", str(synthetic_dir), "--out-dir", str(out), "--epochs", "3", *TINY])
    assert code == 130
    err = capsys.readouterr().err
    assert "Resume with: python train.py --resume" in err
    state = utils.load_checkpoint(out / "last.pt")
    assert state["epoch"] == 1 and state["progress"]["step"] > 0
    assert train.main(["--resume", str(out / "last.pt")]) == 0
    assert same_weights(weights(out / "last.pt"), weights(uninterrupted / "last.pt"))
    assert metric_rows(out) == metric_rows(uninterrupted)


def test_sigint_from_outside_exits_nonzero_and_says_how_to_resume(synthetic_dir, tmp_path):
    out = tmp_path / "run"
    cmd = [sys.executable, "train.py", "--data-dir", str(synthetic_dir), "--out-dir", str(out), "--epochs", "50", *TINY]
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert wait_for(lambda: checkpoint_epoch(out / "last.pt") >= 1)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode != 0
    assert "Resume with: python train.py --resume" in err and "Traceback" not in err
    assert utils.load_checkpoint(out / "last.pt")["epoch"] >= 1


def test_non_finite_loss_stops_with_epoch_and_step_and_keeps_the_last_good_checkpoint(
        synthetic_dir, tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    calls = []
    original = task.BinaryTask.loss

    def nan_in_epoch_2(self, logits, target, **kwargs):
        calls.append(1)
        loss = original(self, logits, target, **kwargs)
        return loss * float("nan") if len(calls) == 10 else loss

    monkeypatch.setattr(task.BinaryTask, "loss", nan_in_epoch_2)
    assert train.main(["--data-dir", str(synthetic_dir), "--out-dir", str(out), "--epochs", "3", *TINY]) == 1
    err = capsys.readouterr().err
    assert "epoch 2 at step 2" in err  # 8 calls per epoch: 6 training steps, 2 validation batches
    state = utils.load_checkpoint(out / "last.pt")
    assert state["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())


def test_interrupted_save_leaves_the_old_checkpoint_loadable(tmp_path, monkeypatch):
    model = UNet(features=(4,))
    path = tmp_path / "last.pt"
    utils.save_checkpoint({"model": model.state_dict(), "model_config": model.config, "epoch": 1}, path)

    def crash(*args):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(utils.os, "replace", crash)  # the temporary file is written, the rename fails
    with pytest.raises(OSError):
        utils.save_checkpoint({"model": model.state_dict(), "model_config": model.config, "epoch": 2}, path)
    monkeypatch.undo()
    assert utils.load_checkpoint(path)["epoch"] == 1
    assert list(tmp_path.iterdir()) == [path]  # no temporary file left behind


def test_a_checkpoint_that_cannot_be_written_stops_the_run_and_keeps_the_last_one_written(
        synthetic_dir, tmp_path, monkeypatch, capsys):
    """Checkpoints go to disk while the next epoch trains: a failed write is announced at once and stops the run
    at that epoch's end, with the last checkpoint that was written intact."""
    out = tmp_path / "run"
    calls = []
    original = utils.save_checkpoint

    def disk_full_after_epoch_1(state, path):
        calls.append(state["epoch"])
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        original(state, path)

    monkeypatch.setattr(utils, "save_checkpoint", disk_full_after_epoch_1)
    with pytest.raises(OSError, match="No space left"):
        train.main(["--data-dir", str(synthetic_dir), "--out-dir", str(out), "--epochs", "4", *TINY])
    assert calls == [1, 2]  # epoch 3 trained while epoch 2's write failed, then stopped before saving
    assert f"warning: could not write {out / 'last.pt'}: [Errno 28] No space left on device" in capsys.readouterr().err
    assert utils.load_checkpoint(out / "last.pt")["epoch"] == 1
    assert utils.load_checkpoint(out / "best.pt")["epoch"] == 1


def test_metrics_csv_held_open_elsewhere_warns_and_is_written_again_next_epoch(
        synthetic_dir, uninterrupted, tmp_path, monkeypatch, capsys):
    """Excel on Windows locks the csv it shows: the rename over it fails, which must not end the run."""
    out = tmp_path / "run"
    replace, renames = os.replace, []

    def locked_during_epoch_2(src, dst):
        if Path(dst).name == "metrics.csv":
            renames.append(dst)
            if len(renames) == 2:
                raise PermissionError(13, "Permission denied")
        replace(src, dst)

    monkeypatch.setattr(utils.os, "replace", locked_during_epoch_2)
    assert train.main(["--data-dir", str(synthetic_dir), "--out-dir", str(out), "--epochs", "3", *TINY]) == 0
    assert len(renames) == 3
    assert f"warning: {out / 'metrics.csv'} not updated (Permission denied)" in capsys.readouterr().err
    assert metric_rows(out) == metric_rows(uninterrupted)  # epoch 3 wrote all three rows
    assert len(utils.load_checkpoint(out / "last.pt")["metrics"]) == 3
    assert not list(out.glob(".metrics.csv.*"))  # the failed rename's temporary file is gone


class Payload:
    """Unpickling this runs code: it creates a file named by MARKER."""
    MARKER = None

    def __reduce__(self):
        return (os.system, (f"touch {self.MARKER}",))


@pytest.mark.parametrize("content", [b"# README\n", b"", b"PK\x03\x04 cut short"])
def test_a_file_that_is_no_checkpoint_is_called_that_not_unsafe(tmp_path, content):
    other = tmp_path / "notes.md"
    other.write_bytes(content)
    with pytest.raises(utils.CheckpointError, match="not a PyTorch checkpoint") as error:
        utils.load_checkpoint(other)
    assert "refused" not in str(error.value)


def test_malicious_checkpoint_is_refused_and_its_payload_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    Payload.MARKER = marker
    evil = tmp_path / "evil.pt"
    torch.save({"model": {}, "model_config": {}, "config": Payload()}, evil)
    with pytest.raises(utils.CheckpointError, match="refused"):
        utils.load_checkpoint(evil)
    assert not marker.exists()
    for program in (["train.py", "--resume"], ["evaluate.py", "--checkpoint"]):
        result = subprocess.run([sys.executable, *program, str(evil)], cwd=ROOT, capture_output=True, text=True)
        assert result.returncode != 0 and "refused" in result.stderr and "Traceback" not in result.stderr, program
    assert not marker.exists()
    torch.load(evil, weights_only=False)  # the payload is live: an unprotected load does run it
    assert marker.exists()


@pytest.mark.parametrize("case", ["other_architecture", "truncated", "not_a_checkpoint", "missing", "plain_dict"])
def test_bad_checkpoints_give_one_clear_line(case, tmp_path, synthetic_dir):
    path = tmp_path / "bad.pt"
    model = UNet(features=(4, 8))
    good = {"model": model.state_dict(), "model_config": model.config}
    if case == "other_architecture":
        torch.save({**good, "model_config": {"features": [8, 16]}}, path)
    elif case == "truncated":
        torch.save(good, path)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    elif case == "not_a_checkpoint":
        path.write_text("hello, I am a text file\n")
    elif case == "plain_dict":
        torch.save({"weights": torch.zeros(3)}, path)
    result = subprocess.run([sys.executable, "evaluate.py", "--checkpoint", str(path),
                             "--data-dir", str(synthetic_dir), "--workers", "0"],
                            cwd=ROOT, capture_output=True, text=True)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and str(path) in lines[0]
