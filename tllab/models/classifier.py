"""Classifier = backbone -> optional bottleneck (or Deep TEN's encoding head) -> linear head."""

from __future__ import annotations

import logging
from typing import Any

from torch import Tensor, nn

from tllab.errors import ConfigError
from tllab.models.deep_ten import EncodingHead, feature_channels, feature_maps

log = logging.getLogger("tllab")


class Classifier(nn.Module):
    r"""Backbone, optional bottleneck and a linear head; returns logits and features.

    .. math:: f = \mathrm{bottleneck}(\mathrm{backbone}(x)),\quad \mathrm{logits} = W f + b

    The bottleneck (when ``bottleneck_dim`` is set) is ``Linear -> BatchNorm1d -> ReLU`` as in
    tllib. With ``head="encoding"`` it is Deep TEN's :class:`~tllab.models.deep_ten.EncodingHead`
    on the backbone's last feature map instead of its pooled features. Methods may replace
    ``bottleneck`` or ``head`` in ``Plugin.transform_model``.
    tllib's domain-generalization ``--freeze-bn`` (its PACS runs) is ``freeze_bn=True,
    dropout=0.1``: the backbone's BatchNorm layers stay in evaluation mode (running statistics
    used and never updated; their affine parameters still train) and the head sees the
    features through ``Dropout(dropout)``.

    Args:
        backbone: module with ``out_features`` mapping images to :math:`(N, D)`.
        num_classes: number of classes of the head.
        bottleneck_dim: width of the bottleneck, or ``None`` for none.
        dropout: dropout probability before the head. Default: 0.
        freeze_bn: keep the backbone's BatchNorm layers in evaluation mode. Default: False.
        head: ``"linear"`` (pooled features) or ``"encoding"`` (Deep TEN). Default: ``"linear"``.
        head_dim: the encoding head's :math:`D`. Default: 128.
        head_codes: the encoding head's :math:`K` codewords. Default: 32.

    Shape:
        - Input: :math:`(N, 3, H, W)`.
        - Output: ``(logits, features)`` of shapes :math:`(N, num\_classes)` and :math:`(N, F)`.

    Example:
        >>> from tllab.models import create_backbone
        >>> model = Classifier(create_backbone("tllab", "digits_cnn"), 10, bottleneck_dim=256)
        >>> logits, f = model(torch.randn(4, 3, 32, 32))
        >>> logits.shape, f.shape
        (torch.Size([4, 10]), torch.Size([4, 256]))
    """

    def __init__(self, backbone: nn.Module, num_classes: int, bottleneck_dim: int | None = None,
                 dropout: float = 0.0, freeze_bn: bool = False, head: str = "linear", head_dim: int = 128,
                 head_codes: int = 32) -> None:
        super().__init__()
        self.backbone, self.freeze_bn = backbone, freeze_bn
        self.encoding_head = head == "encoding"
        if self.encoding_head:
            if bottleneck_dim:
                raise ValueError("the encoding head replaces the bottleneck: drop bottleneck_dim")
            self.bottleneck: nn.Module = EncodingHead(feature_channels(backbone), head_dim, head_codes)
            self.features_dim = self.bottleneck.out_features
        elif bottleneck_dim:
            self.bottleneck: nn.Module = nn.Sequential(
                nn.Linear(backbone.out_features, bottleneck_dim), nn.BatchNorm1d(bottleneck_dim), nn.ReLU()
            )
            self.features_dim = bottleneck_dim
        else:
            self.bottleneck = nn.Identity()
            self.features_dim = backbone.out_features
        self.dropout = nn.Dropout(dropout) if dropout else nn.Identity()
        self.head = nn.Linear(self.features_dim, num_classes)
        self.num_classes = num_classes

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.bottleneck(feature_maps(self.backbone, x) if self.encoding_head else self.backbone(x))
        return self.head(self.dropout(f)), f

    def train(self, mode: bool = True) -> Classifier:
        super().train(mode)
        if self.freeze_bn:
            for m in self.backbone.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        return self

    def replace_bottleneck(self, bottleneck: nn.Module, features_dim: int, by: str) -> None:
        """Install a method's own bottleneck (AFN's blocks, MDD's) of width ``features_dim``,
        warning when it replaces the one ``backbone.bottleneck_dim`` built; ``by`` names the method."""
        if not isinstance(self.bottleneck, nn.Identity):
            log.warning("%s replaces the backbone's bottleneck (backbone.bottleneck_dim) by its own", by)
        self.bottleneck, self.features_dim = bottleneck, features_dim

    def get_parameters(self, base_lr: float, backbone_lr_mult: float = 1.0) -> list[dict[str, Any]]:
        """Optimizer parameter groups: the backbone at ``backbone_lr_mult * base_lr``, the rest at
        ``base_lr`` (tllib uses 0.1x for a pretrained backbone). Frozen parameters are skipped."""
        backbone = [p for p in self.backbone.parameters() if p.requires_grad]
        backbone_ids = {id(p) for p in self.backbone.parameters()}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in backbone_ids]
        groups = [{"params": backbone, "lr": backbone_lr_mult * base_lr, "name": "backbone"},
                  {"params": rest, "lr": base_lr, "name": "head"}]
        return [g for g in groups if g["params"]]


def as_classifier(model: nn.Module, by: str) -> Classifier:
    """``model``, which a plug-in (``by``, e.g. ``"align.mdd"``) changes or reads the features of:
    a one-line error when it is not a tllab :class:`Classifier`."""
    if not isinstance(model, Classifier):
        raise ConfigError(f"{by} works on a tllab Classifier (backbone, bottleneck, head), not on a "
                          f"{type(model).__name__}.")
    return model
