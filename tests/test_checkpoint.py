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
