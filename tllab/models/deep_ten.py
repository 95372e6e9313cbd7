"""Deep TEN (Zhang et al., CVPR 2017): the Encoding layer as a classifier head on a backbone's
last feature map, instead of global average pooling (``backbone.head=encoding``).

The head keeps the backbone's own module names (checkpoints and DELTA's layer names are those of
the plain backbone) and reads its feature map with :func:`feature_maps`.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from tllab.errors import ConfigError
from tllab.nn import Encoding

_RESNET_STEM = ("conv1", "bn1", "relu", "maxpool", "layer1", "layer2", "layer3", "layer4")


def feature_maps(backbone: nn.Module, x: Tensor) -> Tensor:
    """The backbone's last feature map :math:`(N, C, H, W)`, before its global pooling: the
    stages of a torchvision (or IBN-) ResNet, else the model's ``forward_features`` (timm models,
    the digits CNN)."""
    if all(hasattr(backbone, name) for name in _RESNET_STEM):  # a torchvision-style ResNet
        for name in _RESNET_STEM:
            x = getattr(backbone, name)(x)
        return x
    return backbone.forward_features(x)


def feature_channels(backbone: nn.Module) -> int:
    """Channels :math:`C` of :func:`feature_maps` (``feature_channels``, timm's ``num_features``,
    or a ResNet's pooled width)."""
    return getattr(backbone, "feature_channels", None) or getattr(backbone, "num_features", None) \
        or backbone.out_features


class EncodingHead(nn.Module):
    r"""Deep TEN's encoder: ``1x1 conv -> BatchNorm2d -> ReLU -> Encoding(D, K) -> flatten -> L2-normalise``.

    .. math:: f = \frac{\mathrm{vec}(E)}{\lVert \mathrm{vec}(E) \rVert_2},\quad
        E = \mathrm{Encoding}(\mathrm{ReLU}(\mathrm{BN}(W_{1\times1} * X)))

    The classifier's linear head follows (``Linear(K * D, num_classes)``), as in PyTorch-Encoding's
    ``DeepTEN``. The features ``f`` are what methods that act on features (BSS, Bi-Tuning, MCC...) see.

    Args:
        in_channels: channels :math:`C` of the backbone's feature map.
        dim: :math:`D`, channels after the 1x1 convolution and width of each codeword. Default: 128.
        codes: :math:`K`, number of codewords. Default: 32.

    Shape:
        - Input: :math:`(N, C, H, W)`.
        - Output: :math:`(N, K \cdot D)`, unit L2 norm per sample.

    Example:
        >>> head = EncodingHead(64, dim=16, codes=4)
        >>> head(torch.randn(2, 64, 7, 7)).shape
        torch.Size([2, 64])
    """

    def __init__(self, in_channels: int, dim: int = 128, codes: int = 32) -> None:
        super().__init__()
        self.reduce = nn.Sequential(nn.Conv2d(in_channels, dim, 1, bias=False), nn.BatchNorm2d(dim),
                                    nn.ReLU(inplace=True))
        self.encoding = Encoding(dim, codes)
        self.out_features = dim * codes

    def forward(self, maps: Tensor) -> Tensor:
        if maps.dim() != 4:  # a transformer's tokens (N, L, C)
            raise ConfigError(f"backbone.head=encoding needs a feature map (N, C, H, W) but the backbone gives shape "
                              f"{tuple(maps.shape)}; use a convolutional backbone or backbone.head=linear.")
        return F.normalize(self.encoding(self.reduce(maps)).flatten(1), dim=1)
