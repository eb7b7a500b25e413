"""The tutorial's U-Net: building blocks and the full encoder-decoder."""
from typing import Dict

import torch
import torch.nn as nn
import torch.nn.functional as F


class DoubleConv(nn.Sequential):
    """(3x3 conv, BN, ReLU) twice; the convs have no bias because BN follows."""

    def __init__(self, in_channels, out_channels, mid_channels=None):
        if mid_channels is None:
            mid_channels = out_channels
        super().__init__(
            nn.Conv2d(in_channels, mid_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(mid_channels),
            nn.ReLU(inplace=True),
            nn.Conv2d(mid_channels, out_channels, kernel_size=3, padding=1, bias=False),
            nn.BatchNorm2d(out_channels),
            nn.ReLU(inplace=True),
        )


class Down(nn.Sequential):
    def __init__(self, in_channels, out_channels):
        super().__init__(
            nn.MaxPool2d(2, stride=2),
            DoubleConv(in_channels, out_channels),
        )


class Up(nn.Module):
    """Upsample ``x1``, pad it to the skip ``x2``'s size, concatenate, DoubleConv.

    ``in_channels`` is the channel count of the concatenation in the bilinear
    case (upsampling keeps channels) and of ``x1`` in the transposed case
    (the transposed conv halves them before the concatenation).
    """

    def __init__(self, in_channels, out_channels, bilinear=True):
        super().__init__()
        if bilinear:
            self.up = nn.Upsample(scale_factor=2, mode="bilinear", align_corners=True)
            self.conv = DoubleConv(in_channels, out_channels, in_channels // 2)
        else:
            self.up = nn.ConvTranspose2d(in_channels, in_channels // 2, kernel_size=2, stride=2)
            self.conv = DoubleConv(in_channels, out_channels)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        x1 = self.up(x1)
        # Odd sizes lose a row/column in max-pooling; pad back to the skip's size.
        diff_y = x2.size(2) - x1.size(2)
        diff_x = x2.size(3) - x1.size(3)
        # Eager mode skips the pad (a copy) when the sizes already match. Traced or exported
        # (ONNX, torch.export, torch.compile) it always pads, with amounts computed from the
        # shapes, so one graph serves every input size: an ``if`` on the sizes would be frozen
        # at the example input's parity.
        if _graph_capture() or diff_y or diff_x:
            top, left = _half_floor(diff_y), _half_floor(diff_x)
            x1 = F.pad(x1, [left, diff_x - left, top, diff_y - top])
        return self.conv(torch.cat([x2, x1], dim=1))


def _half_floor(d):
    """``d // 2``, written so that it stays exact for negative ``d`` in an exported graph.

    The MobileNet U-Net's skips can be a pixel smaller than the upsampled map
    (``d = -1``: the pad crops). torch.onnx turns ``//`` on sizes into ONNX's
    truncating ``Div`` (-1 // 2 would become 0, cropping the wrong side);
    ``d - d % 2`` is even, so any division of it is exact, and ONNX's ``Mod``
    follows Python's sign rule.
    """
    return (d - d % 2) // 2


def _graph_capture() -> bool:
    """True while torch.jit.trace, torch.export, torch.onnx or torch.compile records the model."""
    return torch.jit.is_tracing() or torch.compiler.is_compiling()


class OutConv(nn.Sequential):
    def __init__(self, in_channels, num_classes):
        super().__init__(nn.Conv2d(in_channels, num_classes, kernel_size=1))


class UNet(nn.Module):
    def __init__(self, in_channels: int = 1, num_classes: int = 2, bilinear: bool = True, base_c: int = 64):
        super().__init__()
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.bilinear = bilinear

        factor = 2 if bilinear else 1
        self.in_conv = DoubleConv(in_channels, base_c)
        self.down1 = Down(base_c, base_c * 2)
        self.down2 = Down(base_c * 2, base_c * 4)
        self.down3 = Down(base_c * 4, base_c * 8)
        self.down4 = Down(base_c * 8, base_c * 16 // factor)
        self.up1 = Up(base_c * 16, base_c * 8 // factor, bilinear)
        self.up2 = Up(base_c * 8, base_c * 4 // factor, bilinear)
        self.up3 = Up(base_c * 4, base_c * 2 // factor, bilinear)
        self.up4 = Up(base_c * 2, base_c, bilinear)
        self.out_conv = OutConv(base_c, num_classes)

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        x1 = self.in_conv(x)
        x2 = self.down1(x1)
        x3 = self.down2(x2)
        x4 = self.down3(x3)
        x5 = self.down4(x4)
        x = self.up1(x5, x4)
        x = self.up2(x, x3)
        x = self.up3(x, x2)
        x = self.up4(x, x1)
        return {"out": self.out_conv(x)}
