"""Any timm model as a feature extractor (classifier removed, global pooling kept)."""

from __future__ import annotations

import difflib

import timm
from torch import nn

from tllab.errors import ConfigError


def timm_backbone(name: str, **kwargs) -> nn.Module:
    """``timm.create_model(name, num_classes=0)`` with ``out_features = num_features``.

    Raises:
        ConfigError: for an unknown model name, listing similar names.

    Example:
        >>> timm_backbone("resnet18").out_features
        512
    """
    if not timm.is_model(name):
        similar = difflib.get_close_matches(name, timm.list_models(), n=8, cutoff=0.6)
        raise ConfigError(f"unknown timm model {name!r}; similar names: {similar}. "
                          "Set backbone.name to a name from timm.list_models().")
    model = timm.create_model(name, pretrained=False, num_classes=0, **kwargs)
    model.out_features = model.num_features
    return model
