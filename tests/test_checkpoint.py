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
