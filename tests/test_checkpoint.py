import threading

import pytest
import torch

import utils
from model import UNet


def test_saved_and_loaded_checkpoint_gives_identical_outputs(tmp_path):
    torch.manual_seed(0)
    model = UNet(features=(4, 8, 16)).eval()
    path = tmp_path / "best.pt"
    utils.save_checkpoint({"model": model.state_dict(), "model_config": model.config, "config": {}}, path)
    state = utils.load_checkpoint(path)
    loaded = utils.model_from_checkpoint(state, path).eval()
    x = torch.randn(2, 3, 37, 53)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    assert state["model_config"] == {"in_channels": 3, "out_channels": 1, "features": [4, 8, 16]}
    assert not list(tmp_path.glob(".*tmp"))  # no temporary file left behind


def test_run_folder_means_its_last_checkpoint(tmp_path):
    model = UNet(features=(4,))
    utils.save_checkpoint({"model": model.state_dict(), "model_config": model.config}, tmp_path / "last.pt")
    assert utils.load_checkpoint(tmp_path)["model_config"] == model.config


def test_error_messages_are_cut_to_one_bounded_line():
    message = utils.one_line(RuntimeError("Error(s) in loading state_dict for UNet:\n\tMissing key(s): " + "k" * 300))
    assert message.startswith("Error(s) in loading state_dict for UNet: Missing key(s): kkk")
    assert "\n" not in message and len(message) == 200 and message.endswith("...")
    assert utils.one_line(KeyError("short"), limit=120) == "'short'"
    assert utils.one_line(ValueError()) == "ValueError"  # no message: its type says what happened


def tiny_state(epoch: int) -> tuple[dict, UNet]:
    model = UNet(features=(4,))
    state = {"model": model.state_dict(), "model_config": model.config, "epoch": epoch, "metrics": [{"epoch": epoch}]}
    return state, model


def test_checkpoint_writer_writes_the_state_as_it_was_when_saved(tmp_path, monkeypatch):
    """Training changes the weights in place while the writer's thread writes: the file holds them as saved."""
    release = threading.Event()
    original = utils.save_checkpoint

    def slow_save(state, path):
        assert release.wait(timeout=30)
        original(state, path)

    monkeypatch.setattr(utils, "save_checkpoint", slow_save)
    state, model = tiny_state(epoch=1)
    expected = {name: tensor.clone() for name, tensor in state["model"].items()}
    writer = utils.CheckpointWriter()
    writer.save(state, tmp_path / "last.pt")
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(1.0)  # the next optimizer step, before the write has begun
    state["metrics"].append({"epoch": 2})
    release.set()
    writer.wait()
    saved = utils.load_checkpoint(tmp_path / "last.pt")
    assert all(torch.equal(saved["model"][name], tensor) for name, tensor in expected.items())
    assert saved["metrics"] == [{"epoch": 1}]
    assert saved["model"]._metadata == state["model"]._metadata  # BatchNorm's version, which loading reads


@pytest.mark.parametrize("hard_links", [True, False], ids=["hard link", "no hard links: a copy"])
def test_best_keeps_its_epoch_when_last_is_written_again(tmp_path, monkeypatch, hard_links):
    if not hard_links:
        monkeypatch.setattr(utils.os, "link", lambda *args: (_ for _ in ()).throw(OSError(1, "not permitted")))
    writer = utils.CheckpointWriter()
    writer.save(tiny_state(epoch=1)[0], tmp_path / "last.pt", links=[tmp_path / "best.pt"])
    writer.wait()
    assert (tmp_path / "best.pt").samefile(tmp_path / "last.pt") == hard_links  # one file, written once
    writer.save(tiny_state(epoch=2)[0], tmp_path / "last.pt")
    writer.wait()
    assert utils.load_checkpoint(tmp_path / "best.pt")["epoch"] == 1
    assert utils.load_checkpoint(tmp_path / "last.pt")["epoch"] == 2
    assert (tmp_path / "best.pt").stat().st_nlink == 1  # last.pt was replaced, not written through the link
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "last.pt"]  # no temporary file left


def test_a_failed_background_write_is_raised_in_the_training_thread(tmp_path, capsys):
    writer = utils.CheckpointWriter()
    writer.save(tiny_state(epoch=1)[0], tmp_path / "missing-folder" / "last.pt")
    with pytest.raises(FileNotFoundError):
        writer.wait()
    writer.wait()  # raised once; the writer goes on
    writer.save(tiny_state(epoch=2)[0], tmp_path / "missing-folder" / "last.pt")
    with pytest.raises(FileNotFoundError):  # by the next save, before it writes anything
        writer.save(tiny_state(epoch=3)[0], tmp_path / "last.pt")
    assert not (tmp_path / "last.pt").exists()
    assert capsys.readouterr().err.count("warning: could not write") == 2  # each failure, as it happened
