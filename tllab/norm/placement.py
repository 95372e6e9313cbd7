"""Where normalization strategies go in a backbone: stages, insertion points, BatchNorm swaps.

Strategies work on the digits CNN, torchvision ResNets and timm ResNet-family models through
these helpers, and fail with one clear message on a backbone without the structure they need:

- :func:`stages`: the backbone's stages in order — ``layer1`` ... ``layer4`` of a ResNet
  (torchvision or timm), ``block1`` ... ``block3`` of the digits CNN.
- :func:`attach_after`: run a module on a stage's output (MixStyle, CrossNorm, SelfNorm). The
  module lives in ``model.norm_layers`` (so it is saved, moved and printed with the model) and a
  forward hook on the stage calls it; the backbone's own parameter names do not change, so
  pretrained weights and checkpoints still load.
- :func:`replace_batchnorm`: swap every BatchNorm of given dimensions for a new layer built from
  it (StochNorm, BIN, DomainNorm).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from tllab.errors import ConfigError


def stages(backbone: nn.Module) -> dict[str, nn.Module]:
    """The backbone's stages by name, in forward order.

    Raises:
        ConfigError: the backbone is neither a ResNet (``layer1``..``layer4``) nor the digits CNN.
    """
    from tllab.models.cnn import DigitsCNN  # here: importing tllab.models loads timm and torchvision

    if isinstance(backbone, DigitsCNN):
        pools = [m for m in backbone.features if isinstance(m, nn.MaxPool2d)]  # each block ends in a pool
        return {f"block{i + 1}": m for i, m in enumerate(pools)}
    found = {name: getattr(backbone, name) for name in ("layer1", "layer2", "layer3", "layer4")
             if isinstance(getattr(backbone, name, None), nn.Module)}
    if len(found) < 4:
        raise ConfigError(f"{type(backbone).__name__} has no ResNet stages (layer1..layer4) and is not the digits "
                          "CNN; use backbone=digits_cnn, a torchvision ResNet or a timm ResNet-family model.")
    return found


def resolve_stages(backbone: nn.Module, names: Sequence[str], what: str) -> dict[str, nn.Module]:
    """The stages ``names`` of ``backbone``; an unknown name fails naming the valid ones."""
    available = stages(backbone)
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ConfigError(f"{what}: unknown stage(s) {unknown} for {type(backbone).__name__}; "
                          f"valid stages: {list(available)}.")
    return {n: available[n] for n in names}


def stage_channels(backbone: nn.Module, stage: nn.Module) -> int:
    """Output channels of one of ``backbone``'s stages: those of the last BatchNorm (else conv) up
    to the end of the stage, in module order (the digits CNN's stages are its pools, which hold
    neither, so the block's BatchNorm before them counts)."""
    order = list(backbone.modules())
    upto = order[:order.index(stage) + 1] + list(stage.modules())
    for kind, attr in ((_BatchNorm, "num_features"), (nn.Conv2d, "out_channels")):
        found = [m for m in upto if isinstance(m, kind)]
        if found:
            return getattr(found[-1], attr)
    raise ConfigError(f"cannot tell the channels of {type(stage).__name__}: no BatchNorm or conv up to it.")


class _AfterStage:
    """Forward hook replacing a stage's output by ``module(output)``. A plain object holding the
    module, so ``copy.deepcopy(model)`` gives a copy whose hook calls the copied module."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def __call__(self, stage: nn.Module, args: tuple[Tensor, ...], output: Tensor) -> Tensor:
        return self.module(output)


def attach_after(model: nn.Module, stage: nn.Module, name: str, module: nn.Module) -> None:
    """Run ``module`` on ``stage``'s output; ``module`` is registered as ``model.norm_layers[name]``."""
    if not hasattr(model, "norm_layers"):
        model.norm_layers = nn.ModuleDict()
    if name in model.norm_layers:
        raise ConfigError(f"a module named {name!r} is already attached; give each insertion its own name.")
    model.norm_layers[name] = module
    stage.register_forward_hook(_AfterStage(module))


def replace_batchnorm(model: nn.Module, build: Callable[[_BatchNorm], nn.Module],
                      types: tuple[type[_BatchNorm], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)) -> int:
    """Replace every module of exactly the given BatchNorm ``types`` (subclasses are left alone)
    by ``build(bn)``; returns how many were replaced."""
    count = 0
    for parent in list(model.modules()):
        for child_name, child in list(parent.named_children()):
            if type(child) in types:
                setattr(parent, child_name, build(child))
                count += 1
    return count
