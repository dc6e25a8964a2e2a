"""A hand-written U-Net (Ronneberger et al., 2015) for binary or multi-class segmentation.

Read top to bottom: a double-conv block, then the encoder (down path), the bottleneck, the decoder
(up path with skip connections) and a 1x1 head. Shapes in comments are for a (N, 3, 160, 240) input
with the default features (64, 128, 256, 512).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


class DoubleConv(nn.Sequential):
    """(3x3 conv -> BatchNorm -> ReLU) twice; the convs have no bias because BatchNorm follows."""

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__(
            nn.Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(out_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class UNet(nn.Module):
    """U-Net returning logits of shape (N, out_channels, H, W) for any input size H x W."""

    def __init__(self, in_channels: int = 3, out_channels: int = 1,
                 features: Sequence[int] = (64, 128, 256, 512)):
        super().__init__()
        features = tuple(int(f) for f in features)
        if not features:
            raise ValueError("features must list at least one channel count, e.g. (64, 128, 256, 512)")
        # Everything needed to rebuild this model; stored in checkpoints so predict.py needs no flags.
        self.config = {"in_channels": in_channels, "out_channels": out_channels, "features": list(features)}

        self.downs = nn.ModuleList()
        channels = in_channels
        for f in features:
            self.downs.append(DoubleConv(channels, f))
            channels = f
        self.pool = nn.MaxPool2d(kernel_size=2, stride=2)
        self.bottleneck = DoubleConv(features[-1], features[-1] * 2)

        self.ups = nn.ModuleList()      # transposed convs that double the spatial size
        self.up_convs = nn.ModuleList()  # double convs over [upsampled, skip] concatenated
        for f in reversed(features):
            self.ups.append(nn.ConvTranspose2d(f * 2, f, kernel_size=2, stride=2))
            self.up_convs.append(DoubleConv(f * 2, f))
        self.head = nn.Conv2d(features[0], out_channels, kernel_size=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        min_size = 2 ** len(self.downs)  # each level halves the size; the bottleneck needs >= 1 pixel
        if min(x.shape[-2:]) < min_size:
            raise ValueError(f"input {tuple(x.shape[-2:])} is too small for {len(self.downs)} levels: "
                             f"height and width must be at least {min_size}")
        skips = []
        for down in self.downs:
            x = down(x)        # (N, 64, 160, 240), (N, 128, 80, 120), (N, 256, 40, 60), (N, 512, 20, 30)
            skips.append(x)
            x = self.pool(x)   # halves H and W, rounding down for odd sizes
        x = self.bottleneck(x)  # (N, 1024, 10, 15)

        for up, up_conv, skip in zip(self.ups, self.up_convs, reversed(skips)):
            x = up(x)           # doubles H and W: may be one pixel short of the skip for odd sizes
            x = _pad_to(x, skip)
            x = up_conv(torch.cat([skip, x], dim=1))  # (N, 512, 20, 30) ... (N, 64, 160, 240)
        return self.head(x)     # (N, out_channels, 160, 240)


def _pad_to(x: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """Zero-pad x on the bottom/right so its H and W equal the reference's (no-op when they match)."""
    dh = reference.shape[-2] - x.shape[-2]
    dw = reference.shape[-1] - x.shape[-1]
    if dh == 0 and dw == 0:
        return x
    return F.pad(x, [0, dw, 0, dh])


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


if __name__ == "__main__":
    model = UNet()
    x = torch.randn(1, 3, 161, 243)
    print(f"UNet {model.config}: {count_parameters(model) / 1e6:.1f} M parameters, "
          f"{tuple(x.shape)} -> {tuple(model(x).shape)}")
