import pytest
import torch

from model import UNet
from task import bce_dice_loss


@pytest.mark.parametrize("features", [(4,), (4, 8), (8, 16, 32), (4, 8, 16, 32)])
@pytest.mark.parametrize("height,width", [(161, 243), (64, 96), (33, 17)])
def test_output_shape_equals_input_shape(features, height, width):
    model = UNet(in_channels=3, out_channels=1, features=features).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, height, width))
    assert out.shape == (2, 1, height, width)


def test_out_channels_and_in_channels():
    model = UNet(in_channels=1, out_channels=3, features=(4, 8)).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, 20, 30)).shape == (1, 3, 20, 30)


def test_config_rebuilds_the_same_architecture():
    model = UNet(features=(4, 8, 16))
    clone = UNet(**model.config)
    clone.load_state_dict(model.state_dict())  # raises if any shape differs


def test_input_too_small_for_the_depth_is_a_clear_error():
    with pytest.raises(ValueError, match="at least 32"):
        UNet(features=(4, 8, 16, 32, 64))(torch.randn(1, 3, 33, 17))


def test_empty_features_rejected():
    with pytest.raises(ValueError):
        UNet(features=())


def test_training_steps_lower_the_loss_on_a_tiny_batch():
    torch.manual_seed(0)
    model = UNet(features=(8, 16))
    images = torch.rand(4, 3, 32, 48)
    masks = torch.zeros(4, 1, 32, 48)
    masks[:, :, 8:24, 12:36] = 1
    images[:, 0:1] += masks  # make the target visible in the red channel
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        loss = bce_dice_loss(model(images), masks)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]
