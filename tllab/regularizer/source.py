"""The pretrained model's *source head*: what LwF and Co-Tuning keep of the source task.

tllib's ``backbone.copy_head()`` (a deep copy of the ImageNet ``fc``) becomes
:func:`load_source_head`: the layers that map the backbone's pooled features to the source
task's logits, rebuilt from whatever ``backbone.pretrained`` names.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from tllab.checkpoint import load_checkpoint
from tllab.errors import CheckpointError, ConfigError
from tllab.models.weights import imagenet_backbone

NO_SOURCE = ("{method} needs the pretrained model's classifier (its source head): set backbone.pretrained to a "
             "tllab checkpoint of a trained classifier (<run dir>/checkpoints/last.pt) or to imagenet.")


def load_source_head(backbone_cfg: Mapping[str, Any], method: str = "this regularizer",
                     dtype: torch.dtype = torch.float32) -> tuple[nn.Module, list[str]]:
    r"""The source head of ``backbone.pretrained`` and the names of its classes.

    .. math:: \mathrm{logits}_s = \mathrm{head}(\mathrm{bottleneck}(f)),\quad f = \mathrm{backbone}(x)

    - a tllab checkpoint (``<run>/checkpoints/*.pt``): its ``bottleneck.*`` (if any:
      ``Linear -> BatchNorm1d -> ReLU`` as in :class:`tllab.models.Classifier`) and ``head.*``
      weights; class names from the checkpoint's ``classes``, else ``"0", "1", ...``;
    - ``imagenet``: the 1000-way ImageNet classifier of the backbone's weights
      (:func:`tllab.models.weights.imagenet_backbone`, tllib's ``copy_head()``); class names
      from timm's bundled ImageNet info.

    Args:
        backbone_cfg: the ``backbone`` config (``library``, ``name``, ``pretrained``, ``weights``, ``kwargs``).
        method: how error messages name the caller (``"regularizer=lwf"``).
        dtype: the head's dtype, the model's: the stored weights are copied into layers of this
            dtype, so a float64 run keeps a float64 checkpoint's head exactly (never rounded
            through float32).

    Returns:
        ``(head, classes)``: ``head`` is an ``nn.Sequential`` (children ``bottleneck`` (optional)
        and ``head``, named as in the checkpoint) in train mode, on CPU, in ``dtype``.

    Shape:
        - ``head`` input: :math:`(N, D)` pooled backbone features (``backbone.out_features``).
        - ``head`` output: :math:`(N, S)`, ``S = len(classes)``.

    Raises:
        ConfigError: ``backbone.pretrained`` is unset, or names ImageNet weights that do not exist.
        WeightsError: the ImageNet weights are not cached and cannot be downloaded.
        CheckpointError: the file is unreadable or holds no classifier head.

    Example:
        >>> head, classes = load_source_head({"library": "timm", "name": "tf_efficientnet_lite0",
        ...                                   "pretrained": "imagenet"})
        >>> head.head.weight.shape, classes[285]
        (torch.Size([1000, 1280]), 'Egyptian cat')
    """
    pretrained = backbone_cfg.get("pretrained")
    if not pretrained:
        raise ConfigError(NO_SOURCE.format(method=method))
    if pretrained == "imagenet":
        return _imagenet_head(backbone_cfg, dtype)
    return _checkpoint_head(Path(str(pretrained)).expanduser(), method, dtype)


def _checkpoint_head(path: Path, method: str, dtype: torch.dtype) -> tuple[nn.Module, list[str]]:
    if not path.is_file():
        raise CheckpointError(f"backbone.pretrained={str(path)!r} is not a file; {NO_SOURCE.format(method=method)}")
    obj = load_checkpoint(path, "Set backbone.pretrained to a tllab checkpoint (<run dir>/checkpoints/last.pt).")
    model = obj.get("model", obj) if isinstance(obj, Mapping) else {}
    state = {k.removeprefix("module."): v for k, v in model.items() if isinstance(v, Tensor)}
    if "head.weight" not in state:
        raise CheckpointError(f"{str(path)!r} holds no classifier head (head.weight): a backbone-only state dict "
                              f"has no source task. {NO_SOURCE.format(method=method)}")
    layers: OrderedDict[str, nn.Module] = OrderedDict()
    if "bottleneck.0.weight" in state:
        dim, in_features = state["bottleneck.0.weight"].shape
        layers["bottleneck"] = nn.Sequential(nn.Linear(in_features, dim, dtype=dtype),
                                             nn.BatchNorm1d(dim, dtype=dtype), nn.ReLU())
    num_classes, features = state["head.weight"].shape
    layers["head"] = nn.Linear(features, num_classes, dtype=dtype)
    head = nn.Sequential(layers)
    try:
        head.load_state_dict({k: v for k, v in state.items() if k.startswith(("bottleneck.", "head."))})
    except RuntimeError as e:  # e.g. a bottleneck changed by a normalization strategy
        raise CheckpointError(f"{str(path)!r}: its bottleneck/head is not Linear -> BatchNorm1d -> ReLU -> Linear "
                              f"({str(e).splitlines()[0]}).") from e
    classes = obj.get("classes") if isinstance(obj, Mapping) else None
    return head, list(classes) if classes else [str(i) for i in range(num_classes)]


def _imagenet_head(backbone_cfg: Mapping[str, Any], dtype: torch.dtype) -> tuple[nn.Module, list[str]]:
    from timm.data import ImageNetInfo

    _, head = imagenet_backbone(str(backbone_cfg.get("library")), str(backbone_cfg.get("name")),
                                backbone_cfg.get("weights"), **backbone_cfg.get("kwargs", {}))
    # the classifier acts on the pooled features, which is what every tllab backbone returns;
    # ImageNet weights are stored in float32 (or narrower), so its float64 copy is exact
    return nn.Sequential(OrderedDict(head=head)).to(dtype), list(ImageNetInfo().label_descriptions())


def frozen_copy(module: nn.Module) -> nn.Module:
    """A deep copy in eval mode with ``requires_grad=False`` and no forward hooks: a teacher that
    never changes and never feeds the hooks other plug-ins put on the trained model (their
    deep-copied recorders would otherwise collect the teacher's outputs every step)."""
    module = copy.deepcopy(module).eval().requires_grad_(False)
    for m in module.modules():
        m._forward_hooks.clear()
        m._forward_pre_hooks.clear()
    return module


class FeatureTap:
    """Keeps the last output of ``module`` (the backbone's pooled features) through a forward hook,
    so a regularizer can reuse the features of the trainer's own forward pass instead of running
    the backbone again. Copies of ``module`` (a frozen teacher, AdaBN's evaluation copy) carry the
    hook but are ignored: only ``module`` itself is recorded.

    Example:
        >>> import torch
        >>> lin = nn.Linear(2, 3)
        >>> tap = FeatureTap(lin)
        >>> _ = lin(torch.zeros(4, 2))
        >>> tap.take(4).shape
        torch.Size([4, 3])
    """

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.value: Tensor | None = None

        def hook(mod: nn.Module, args: Any, output: Tensor) -> None:  # a closure: deepcopy keeps it as is
            if mod is self.module:
                self.value = output

        self.handle = module.register_forward_hook(hook)

    def take(self, n: int) -> Tensor:
        """The first ``n`` rows of the last output (the labelled part of a ``cat([x_s, x_t])`` pass)."""
        if self.value is None or self.value.shape[0] < n:
            raise RuntimeError("the backbone's features of this step were not recorded; a plug-in that replaces "
                               "the forward pass must call model.backbone on the labelled batch.")
        value, self.value = self.value, None  # each step's features are used once
        return value[:n]

    def remove(self) -> None:
        self.handle.remove()
