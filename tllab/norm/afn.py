r"""AFN: Adaptive Feature Norm (Xu et al., "Larger Norm More Transferable: An Adaptive Feature Norm
Approach for Unsupervised Domain Adaptation", ICCV 2019, arXiv 1811.07456; official code
jihanyang/AFN, tllib ``tllib/normalization/afn.py``).

The stepwise variant (SAFN): a loss that enlarges every sample's bottleneck feature norm by a
fixed step :math:`\Delta r` per update, on source and target features, plus a bottleneck whose
dropout preserves the expected squared feature norm. Training loss:

.. math:: L = \mathrm{CE}(y_s) + \lambda \,\big(L_{afn}(f_s) + L_{afn}(f_t)\big)
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from tllab.models.classifier import Classifier, as_classifier
from tllab.nn.functional import upcast_half
from tllab.plugin import Plugin, StepOutput


class AdaptiveFeatureNorm(nn.Module):
    r"""Stepwise adaptive feature norm loss (SAFN).

    .. math:: L_{afn}(f) = \frac{1}{N} \sum_{i=1}^{N}
              \Big(\|f_i\|_2 - \big(\mathrm{sg}(\|f_i\|_2) + \Delta r\big)\Big)^2

    with :math:`\mathrm{sg}` stop-gradient. The value is always :math:`\Delta r^2` (log the mean
    feature norm, not this loss); the gradient :math:`-2\Delta r\, f_i / (\|f_i\|_2 N)` moves every
    norm outward by the same step, whatever its current size (0 for an all-zero row).

    Args:
        delta: the step :math:`\Delta r`. Default: 1.0 (official Office-31/ImageCLEF and tllib;
            VisDA-2017 uses 0.3).

    Shape:
        - Input: :math:`(N, F)` features.
        - Output: scalar (float32 for half-precision inputs).

    Example:
        >>> loss = AdaptiveFeatureNorm(delta=1.0)(torch.randn(8, 16))
        >>> round(loss.item(), 4)  # delta ** 2 whatever the features
        1.0
    """

    def __init__(self, delta: float = 1.0) -> None:
        super().__init__()
        self.delta = delta

    def forward(self, f: Tensor) -> Tensor:
        norm = upcast_half(f).norm(p=2, dim=1)
        return (norm - (norm.detach() + self.delta)).square().mean()

    def extra_repr(self) -> str:
        return f"delta={self.delta}"


class Block(nn.Module):
    r"""AFN bottleneck block: ``Linear -> BatchNorm1d -> ReLU -> Dropout``, with L2-preserved dropout.

    .. math:: h = \sqrt{1 - p}\; \mathrm{Dropout}_p(\mathrm{ReLU}(\mathrm{BN}(W x + b)))

    in training: ``nn.Dropout`` scales kept units by :math:`1/(1-p)`, the extra
    :math:`\sqrt{1-p}` makes it :math:`1/\sqrt{1-p}`, so :math:`E\|h\|_2^2` equals the squared norm
    without dropout (the paper's "L2-preserved dropout"; jihanyang/AFN issue #7). In eval mode
    the dropout is the identity.

    Args:
        in_features: input width.
        bottleneck_dim: output width. Default: 1000.
        dropout_p: drop probability in [0, 1). Default: 0.5.

    Shape:
        - Input: :math:`(N, in\_features)`; Output: :math:`(N, bottleneck\_dim)`.

    Example:
        >>> Block(2048, 1000, 0.5)(torch.randn(4, 2048)).shape
        torch.Size([4, 1000])
    """

    def __init__(self, in_features: int, bottleneck_dim: int = 1000, dropout_p: float = 0.5) -> None:
        super().__init__()
        if not 0 <= dropout_p < 1:
            raise ValueError(f"dropout_p={dropout_p} must be in [0, 1)")
        self.fc = nn.Linear(in_features, bottleneck_dim)
        self.bn = nn.BatchNorm1d(bottleneck_dim)
        self.relu = nn.ReLU(inplace=True)
        self.dropout = nn.Dropout(dropout_p)
        self.dropout_p = dropout_p

    def forward(self, x: Tensor) -> Tensor:
        h = self.dropout(self.relu(self.bn(self.fc(x))))
        return h * math.sqrt(1 - self.dropout_p) if self.training else h


class AFNHead(nn.Module):
    r"""AFN's bottleneck and classifier: ``num_blocks`` :class:`Block` s then ``Linear``.

    Initialised as in the official code and tllib: Linear weights and biases
    :math:`\sim N(0, 0.01^2)`, BatchNorm weights :math:`\sim N(1, 0.01^2)`, BatchNorm biases 0.

    Args:
        in_features: width of the backbone's features.
        num_classes: outputs of the classifier.
        num_blocks: bottleneck blocks. Default: 1 (Office-31; VisDA-2017: 2).
        bottleneck_dim: width of every block. Default: 1000.
        dropout_p: dropout of every block. Default: 0.5.

    Shape:
        - Input: :math:`(N, in\_features)`.
        - Output: ``(logits, features)``, :math:`(N, num\_classes)` and :math:`(N, bottleneck\_dim)`;
          the features (the last block's output) are those the AFN loss acts on.

    Example:
        >>> logits, f = AFNHead(2048, 10)(torch.randn(4, 2048))
        >>> logits.shape, f.shape
        (torch.Size([4, 10]), torch.Size([4, 1000]))
    """

    def __init__(self, in_features: int, num_classes: int, num_blocks: int = 1, bottleneck_dim: int = 1000,
                 dropout_p: float = 0.5, entropy_weight: float = 0.0) -> None:
        super().__init__()
        if num_blocks < 1:
            raise ValueError(f"num_blocks={num_blocks} must be >= 1")
        widths = [in_features] + [bottleneck_dim] * num_blocks
        self.bottleneck = nn.Sequential(*(Block(w, bottleneck_dim, dropout_p) for w in widths[:-1]))
        self.head = nn.Linear(bottleneck_dim, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.normal_(m.bias, 0, 0.01)
            elif isinstance(m, nn.BatchNorm1d):
                nn.init.normal_(m.weight, 1, 0.01)
                nn.init.zeros_(m.bias)

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        f = self.bottleneck(x)
        return self.head(f), f


class AFNStrategy(Plugin):
    r"""Stepwise AFN for domain adaptation: the model's bottleneck and head become an
    :class:`AFNHead`, and every step adds :math:`\lambda L_{afn}(f_s)` and
    :math:`\lambda L_{afn}(f_t)` (:class:`AdaptiveFeatureNorm`) on the source and target
    bottleneck features (logged as ``norm_s`` and ``norm_t``; their values are constant,
    :math:`\lambda \Delta r^2`, by design), and optionally tllib's entropy term on the target
    predictions, :math:`\mu \cdot \frac{1}{N}\sum_i -\sum_c p_{ic} \log(p_{ic} + 10^{-5})`
    (``entropy``; tllib's ``--trade-off-entropy``, 0.1 in its Office-31 runs).

    Defaults are those of the official ``train.py`` (Office-31 / ImageCLEF, SAFN) and tllib's
    ``afn.py``; VisDA-2017 uses ``delta=0.3, weight=0.01, num_blocks=2``. The backbone's own
    ``bottleneck_dim`` is ignored: AFN's blocks replace that bottleneck.

    Args:
        delta: :math:`\Delta r`, the norm increase per step. Default: 1.0.
        weight: :math:`\lambda`, applied to each domain's term. Default: 0.05.
        num_blocks: bottleneck blocks. Default: 1.
        bottleneck_dim: width of the blocks (the features). Default: 1000.
        dropout_p: the blocks' L2-preserved dropout. Default: 0.5.
        entropy_weight: :math:`\mu`; 0 leaves the term out. Default: 0.

    Example:
        ``tllab-train norm=afn`` (unlabelled target batches are drawn, ``dataset.setting=da``).
    """

    uses_target = True
    exclusive = "head"

    def __init__(self, delta: float = 1.0, weight: float = 0.05, num_blocks: int = 1, bottleneck_dim: int = 1000,
                 dropout_p: float = 0.5, entropy_weight: float = 0.0) -> None:
        super().__init__()
        if num_blocks < 1 or bottleneck_dim < 1 or not 0 <= dropout_p < 1:
            raise ValueError(f"need num_blocks >= 1, bottleneck_dim >= 1 and dropout_p in [0, 1); got "
                             f"num_blocks={num_blocks}, bottleneck_dim={bottleneck_dim}, dropout_p={dropout_p}")
        self.weight, self.num_blocks, self.bottleneck_dim = weight, num_blocks, bottleneck_dim
        self.dropout_p, self.entropy_weight = dropout_p, entropy_weight
        self.afn = AdaptiveFeatureNorm(delta)

    def transform_model(self, model: Classifier) -> Classifier:
        model = as_classifier(model, "norm.afn")
        head = AFNHead(model.backbone.out_features, model.num_classes, self.num_blocks, self.bottleneck_dim,
                       self.dropout_p)
        # Classifier.forward returns (head(f), f): f is now the last block's output, the AFN features.
        model.replace_bottleneck(head.bottleneck, self.bottleneck_dim, "norm.afn")
        model.head = head.head
        return model

    def loss(self, out: StepOutput) -> dict[str, Tensor]:
        terms = {"norm_s": self.weight * self.afn(out.f_s), "norm_t": self.weight * self.afn(out.f_t)}
        if self.entropy_weight:
            p = out.logits_t.softmax(1, dtype=torch.promote_types(out.logits_t.dtype, torch.float32))
            terms["entropy"] = self.entropy_weight * -(p * (p + 1e-5).log()).sum(1).mean()
        return terms
