"""Any timm model as a feature extractor (classifier removed, global pooling kept)."""

from __future__ import annotations

import difflib

from torch import nn

from tllab.errors import ConfigError


def timm_backbone(name: str, pretrained: bool = False, num_classes: int = 0, **kwargs) -> nn.Module:
    """``timm.create_model(name, pretrained, num_classes)`` with ``out_features = num_features``.

    ``name`` may carry a pretrained tag (``resnet50.a1_in1k``). With the default
    ``num_classes=0`` the model returns pooled features; the weights module asks for the
    1000-class head to split it off after loading.

    Raises:
        ConfigError: for an unknown model name, listing similar names.

    Example:
        >>> timm_backbone("resnet18").out_features
        512
    """
    import timm  # on use: a digits run need not import it

    if not timm.is_model(name):
        similar = difflib.get_close_matches(name, timm.list_models(), n=8, cutoff=0.6)
        raise ConfigError(f"unknown timm model {name!r}; similar names: {similar}. "
                          "Set backbone.name to a name from timm.list_models().")
    model = timm.create_model(name, pretrained=pretrained, num_classes=num_classes, **kwargs)
    model.out_features = model.num_features
    return model
