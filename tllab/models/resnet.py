"""torchvision ResNets as feature extractors (the ``fc`` layer removed)."""

from __future__ import annotations

from torch import nn


def torchvision_resnet(name: str, **kwargs) -> nn.Module:
    """Build ``torchvision.models.<name>`` (random init) with ``fc`` replaced by the identity.

    The returned module maps :math:`(N, 3, H, W)` to pooled features :math:`(N, D)` and has
    ``out_features = D`` (512 for ResNet-18/34, 2048 for ResNet-50).

    Example:
        >>> torchvision_resnet("resnet18").out_features
        512
    """
    from torchvision import models as tvm  # on use: importing torchvision costs ~1.7 s (its ops import dynamo)

    model = getattr(tvm, name)(weights=None, **kwargs)
    model.out_features = model.fc.in_features
    model.fc = nn.Identity()
    return model


RESNETS = ("resnet18", "resnet34", "resnet50", "resnet101", "resnet152")
