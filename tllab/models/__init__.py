"""Backbones by name and the classifier built on them.

``create_backbone(library, name)`` is the one factory: ``library`` is ``tllab`` (own models),
``torchvision`` (ResNets) or ``timm`` (any timm model). Every backbone maps images to pooled
features and exposes ``out_features``.
"""

from __future__ import annotations

import re
from collections.abc import Callable

from torch import nn

from tllab.errors import ConfigError
from tllab.models.classifier import Classifier
from tllab.models.cnn import digits_cnn
from tllab.models.pretrained import load_backbone_checkpoint
from tllab.models.resnet import RESNETS, torchvision_resnet
from tllab.models.timm_models import timm_backbone


def _ibn_resnet(name: str) -> Callable[..., nn.Module]:
    def build(**kwargs) -> nn.Module:
        from tllab.norm.ibn import IBN_RESNETS  # imported on use: tllab.norm.ibn builds on this package

        return IBN_RESNETS[name](**kwargs)

    return build


# Own models: name -> builder(**kwargs).
TLLAB_MODELS: dict[str, Callable[..., nn.Module]] = {
    "digits_cnn": digits_cnn,
    **{f"resnet{d}_ibn_{v}": _ibn_resnet(f"resnet{d}_ibn_{v}") for d in (18, 34, 50, 101) for v in "ab"},
}

__all__ = ["Classifier", "TLLAB_MODELS", "create_backbone"]


def create_backbone(library: str, name: str, pretrained: str | None = None, weights: str | None = None,
                    **kwargs) -> nn.Module:
    """Build a backbone by name, optionally with pretrained weights.

    Args:
        library: ``"tllab"``, ``"torchvision"`` or ``"timm"``.
        name: model name in that library (``digits_cnn``, ``resnet50``, any timm name...).
        pretrained: ``None`` (random init), ``"imagenet"`` (:mod:`tllab.models.weights`) or the
            path of a tllab checkpoint, a torchvision/timm state dict or a MoCo checkpoint.
        weights: which ImageNet weights (torchvision weights name or timm tag; default: tllib's).
        **kwargs: passed to the model's builder.

    Returns:
        a module mapping :math:`(N, 3, H, W)` to :math:`(N, D)` with ``out_features = D``.

    Example:
        >>> create_backbone("tllab", "digits_cnn").out_features
        2048
    """
    try:
        return _create_backbone(library, name, pretrained, weights, **kwargs)
    except TypeError as e:
        unknown = re.search(r"unexpected keyword argument '(\w+)'", str(e))
        if not unknown:
            raise
        raise ConfigError(f"backbone.kwargs.{unknown[1]} is not an argument of the {library} model {name!r}; remove it "
                          "(see the model's builder for the arguments it takes).") from None


def _create_backbone(library: str, name: str, pretrained: str | None, weights: str | None, **kwargs) -> nn.Module:
    if pretrained == "imagenet":
        from tllab.models.weights import imagenet_backbone  # imports this module's builders

        return imagenet_backbone(library, name, weights, **kwargs)[0]
    if library == "tllab":
        if name not in TLLAB_MODELS:
            raise ConfigError(f"unknown tllab backbone {name!r}; available: {sorted(TLLAB_MODELS)}.")
        model = TLLAB_MODELS[name](**kwargs)
    elif library == "torchvision":
        if name not in RESNETS:
            raise ConfigError(f"unknown torchvision backbone {name!r}; available: {list(RESNETS)} "
                              "(or use backbone=timm backbone.name=... for any timm model).")
        model = torchvision_resnet(name, **kwargs)
    elif library == "timm":
        model = timm_backbone(name, **kwargs)
    else:
        raise ConfigError(f"unknown backbone library {library!r}; use tllab, torchvision or timm.")

    if pretrained:
        load_backbone_checkpoint(model, pretrained)
    return model
