"""The small digits CNN of the embedded benchmark."""

from __future__ import annotations

from torch import Tensor, nn


class DigitsCNN(nn.Module):
    r"""Three ``conv3x3 (no bias) -> BatchNorm2d -> ReLU -> MaxPool2d(2)`` blocks, then flatten.

    With the default widths (32, 64, 128) and 32x32 inputs the feature map is 128x4x4, so the
    features have 2048 dimensions (113,962 parameters with a 10-class linear head). An adaptive
    average pool to 4x4 keeps ``out_features`` fixed for other input sizes.

    Args:
        in_channels: input channels. Default: 3.
        widths: output channels of the three blocks. Default: (32, 64, 128).

    Shape:
        - Input: :math:`(N, C_{in}, H, W)` with :math:`H, W \ge 8`.
        - Output: :math:`(N, 16 \cdot widths[-1])`.

    Example:
        >>> net = DigitsCNN()
        >>> net(torch.randn(2, 3, 32, 32)).shape
        torch.Size([2, 2048])
    """

    def __init__(self, in_channels: int = 3, widths: tuple[int, ...] = (32, 64, 128)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out in zip((in_channels, *widths[:-1]), widths):
            layers += [
                nn.Conv2d(c_in, c_out, 3, padding=1, bias=False),
                nn.BatchNorm2d(c_out),
                nn.ReLU(inplace=True),
                nn.MaxPool2d(2),
            ]
        self.features = nn.Sequential(*layers, nn.AdaptiveAvgPool2d(4), nn.Flatten())
        self.out_features = widths[-1] * 16
        self.feature_channels = widths[-1]

    def forward(self, x: Tensor) -> Tensor:
        return self.features(x)

    def forward_features(self, x: Tensor) -> Tensor:
        """The last block's feature map :math:`(N, widths[-1], H/8, W/8)`, before the pooling."""
        return self.features[:-2](x)


def digits_cnn(**kwargs) -> DigitsCNN:
    return DigitsCNN(**kwargs)
