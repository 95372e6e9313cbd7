"""Pretrained weights from a local file: a tllab checkpoint, a torchvision/timm state dict or a
self-supervised MoCo checkpoint (ImageNet weights by name: :mod:`tllab.models.weights`)."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from torch import Tensor, nn

from tllab.checkpoint import load_checkpoint
from tllab.errors import CheckpointError

# Query-encoder prefixes of self-supervised checkpoints (MoCo v1/v2 ``encoder_q``, MoCo v3 ``base_encoder``).
SSL_ENCODERS = ("module.encoder_q.", "encoder_q.", "module.base_encoder.", "base_encoder.")


def backbone_state_from_file(path: str | Path) -> dict[str, Tensor]:
    """Read backbone weights from a tllab checkpoint (its ``backbone.*`` entries), a state dict
    or a MoCo checkpoint.

    A ``module.`` prefix (DataParallel/DDP) and a ``backbone.`` prefix are stripped. A MoCo-style
    checkpoint (``{"state_dict": {"module.encoder_q.conv1.weight": ...}}``) gives its query
    encoder without the projection ``fc`` (as tllib's ``convert_moco_to_pretrained.py``); the
    key encoder and the queue are left out.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        what = "is a directory" if path.is_dir() else "does not exist"
        raise CheckpointError(f"pretrained checkpoint {str(path)!r} {what}; set backbone.pretrained "
                              "to a checkpoint file (e.g. <run dir>/checkpoints/last.pt) or to null.")
    obj = load_checkpoint(path, "The file is corrupt or not a torch checkpoint: set backbone.pretrained to "
                                "a tllab checkpoint or a state dict.")
    if isinstance(obj, Mapping) and "model" not in obj and isinstance(obj.get("state_dict"), Mapping):
        obj = obj["state_dict"]
    state: Mapping[str, Tensor] = obj.get("model", obj) if isinstance(obj, Mapping) else {}
    state = {k: v for k, v in state.items() if isinstance(v, Tensor)}
    encoder = next((p for p in SSL_ENCODERS if any(k.startswith(p) for k in state)), None)
    if encoder:
        state = {k.removeprefix(encoder): v for k, v in state.items() if k.startswith(encoder)}
        state = {k: v for k, v in state.items() if not k.startswith(("fc.", "head."))}
    state = {k.removeprefix("module."): v for k, v in state.items()}
    if any(k.startswith("backbone.") for k in state):
        state = {k.removeprefix("backbone."): v for k, v in state.items() if k.startswith("backbone.")}
    if not state:
        raise CheckpointError(f"{str(path)!r} holds no model weights.")
    return state


def classifier_prefix(backbone: nn.Module) -> str:
    """Where a full model's state dict keeps its classifier: timm's ``pretrained_cfg`` names it
    (``fc``, ``classifier``, ``head``...); torchvision ResNets and IBN-Net call it ``fc``."""
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    return f"{cfg.get('classifier', 'fc')}."


def load_backbone_checkpoint(backbone: nn.Module, path: str | Path) -> None:
    """Load :func:`backbone_state_from_file` into ``backbone`` strictly, with a readable error.
    The classifier of a full torchvision/timm state dict (``fc.*``...) is not part of the
    backbone and is left out."""
    state = backbone_state_from_file(path)
    own = backbone.state_dict()
    head = classifier_prefix(backbone)
    state = {k: v for k, v in state.items() if k in own or not k.startswith(head)}
    # BatchNorm fills in a missing num_batches_tracked itself (older checkpoints lack it)
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    mismatched = [k for k, v in own.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"pretrained checkpoint {str(path)!r} does not fit this backbone: "
            f"{len(missing)} missing (e.g. {missing[:3]}), {len(unexpected)} unexpected (e.g. {unexpected[:3]}), "
            f"{len(mismatched)} with other shapes (e.g. {mismatched[:3]}). Use a checkpoint of the same backbone.")
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

