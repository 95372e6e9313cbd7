r"""MDD: Margin Disparity Discrepancy (Zhang et al., "Bridging Theory and Algorithm for Domain
Adaptation", ICML 2019, arXiv 1904.05801), as tllib's ``ClassificationMarginDisparityDiscrepancy`` and
MDD ``ImageClassifier`` (``tllib/alignment/mdd.py``, example ``mdd.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tllab.align.grl import WarmStartGradientReverseLayer
from tllab.models.classifier import Classifier, as_classifier
from tllab.nn.functional import upcast_half
from tllab.plugin import Plugin, StepOutput


def margin_disparity_loss(y_s: Tensor, y_s_adv: Tensor, y_t: Tensor, y_t_adv: Tensor, margin: float = 4.0) -> Tensor:
    r"""The negated margin disparity discrepancy, the loss the adversarial head minimises:

    .. math:: L = \gamma\,\mathbb{E}_s\big[-\log \sigma(y^s_{adv})_{h(y^s)}\big]
              + \mathbb{E}_t\big[-\log\big(1 - \sigma(y^t_{adv})_{h(y^t)}\big)\big]

    with :math:`\sigma` the softmax, :math:`h(y) = \arg\max y` the main head's prediction (no
    gradient reaches the main head through it) and :math:`\log` computed as
    :math:`\log\min(x + 10^{-6}, 1)` (tllib's ``shift_log``). It is tllib's
    ``-mdd(y_s, y_s_adv, y_t, y_t_adv)``; source and target means are taken separately, so the
    two batches may differ in size.

    Args:
        y_s, y_t: main-head logits on source and target.
        y_s_adv, y_t_adv: adversarial-head logits on source and target.
        margin: :math:`\gamma`. Default: 4 (tllib).

    Shape:
        - y_s, y_s_adv: :math:`(N_s, C)`; y_t, y_t_adv: :math:`(N_t, C)`; Output: scalar.

    Example:
        >>> y = torch.tensor([[2.0, 0.0]])
        >>> round(margin_disparity_loss(y, torch.zeros(1, 2), y, torch.zeros(1, 2), margin=1).item(), 4)  # 2 log 2
        1.3863
    """
    y_s, y_s_adv, y_t, y_t_adv = (upcast_half(y) for y in (y_s, y_s_adv, y_t, y_t_adv))
    source = F.cross_entropy(y_s_adv, y_s.argmax(1))
    p_t = y_t_adv.softmax(1).gather(1, y_t.argmax(1, keepdim=True))
    target = -torch.log(torch.clamp(1 - p_t + 1e-6, max=1.0)).mean()
    return margin * source + target


def mdd_head(in_features: int, width: int, num_classes: int, dropout_p: float) -> nn.Sequential:
    """tllib's MDD head ``Linear(F, W)-ReLU-Dropout-Linear(W, C)``, weights N(0, 0.01), biases 0."""
    head = nn.Sequential(nn.Linear(in_features, width), nn.ReLU(), nn.Dropout(dropout_p), nn.Linear(width, num_classes))
    for layer in (head[0], head[3]):
        nn.init.normal_(layer.weight, 0, 0.01)
        nn.init.zeros_(layer.bias)
    return head


class MDD(Plugin):
    r"""Margin disparity discrepancy: an adversarial head :math:`f'` on gradient-reversed features
    minimises :func:`margin_disparity_loss` (it learns to agree with the main head's predictions
    on source and to disagree on target), and the features, through the reversal, maximise it:

    .. math:: L = \mathrm{CE} + \mathrm{trade\_off}\cdot L_{mdd}\big(y^s, f'(\mathcal{R}_\lambda(z^s)),
              y^t, f'(\mathcal{R}_\lambda(z^t))\big)

    The model becomes tllib's MDD classifier: a bottleneck ``Linear-BN-ReLU-Dropout``
    (weights N(0, 0.005), biases 0.1) replaces ``backbone.bottleneck_dim``'s, and the main and
    adversarial heads are :func:`mdd_head`. :math:`\lambda` follows tllib's warm start up to
    ``hi = 0.1``. The adversarial head joins the optimizer at the base lr, is saved with the
    plug-in and is not part of the model. Logged as ``train/align.mdd/transfer``.

    Args:
        trade_off: weight of :math:`L_{mdd}`. Default: 1.0 (tllib ``--trade-off``).
        margin: :math:`\gamma`. Default: 4.0 (tllib ``--margin``).
        bottleneck_dim: width of the bottleneck. Default: 1024 (tllib ``--bottleneck-dim``).
        width: hidden width of both heads, or ``None`` for ``bottleneck_dim`` (tllib's example passes
            ``width=bottleneck_dim``). Default: ``None``.
        dropout_p: dropout of the bottleneck and heads. Default: 0.5.
        alpha, lo, hi, max_iters: the :math:`\lambda` schedule (:func:`tllab.align.grl.warm_start_coeff`).
            Defaults: 1.0, 0.0, 0.1, 1000 (tllib's MDD).

    Example:
        ``tllab-train align=mdd`` (``dataset.setting=da``); ``norm=adabn align=mdd`` stacks.
    """

    uses_target = True
    exclusive = "head"

    def __init__(self, trade_off: float = 1.0, margin: float = 4.0, bottleneck_dim: int = 1024,
                 width: int | None = None, dropout_p: float = 0.5, alpha: float = 1.0, lo: float = 0.0,
                 hi: float = 0.1, max_iters: int = 1000) -> None:
        super().__init__()
        width = bottleneck_dim if width is None else width
        if bottleneck_dim < 1 or width < 1 or not 0 <= dropout_p < 1:
            raise ValueError(f"need bottleneck_dim >= 1, width >= 1 and dropout_p in [0, 1); got "
                             f"{bottleneck_dim}, {width}, {dropout_p}")
        self.trade_off, self.margin = trade_off, margin
        self.bottleneck_dim, self.width, self.dropout_p = bottleneck_dim, width, dropout_p
        self.grl = WarmStartGradientReverseLayer(alpha, lo, hi, max_iters)
        self.adv_head: nn.Module | None = None

    def transform_model(self, model: Classifier) -> Classifier:
        model = as_classifier(model, "align.mdd")
        bottleneck = nn.Sequential(nn.Linear(model.backbone.out_features, self.bottleneck_dim),
                                   nn.BatchNorm1d(self.bottleneck_dim), nn.ReLU(), nn.Dropout(self.dropout_p))
        nn.init.normal_(bottleneck[0].weight, 0, 0.005)
        nn.init.constant_(bottleneck[0].bias, 0.1)
        model.replace_bottleneck(bottleneck, self.bottleneck_dim, "align.mdd")
        model.head = mdd_head(self.bottleneck_dim, self.width, model.num_classes, self.dropout_p)
        self.adv_head = mdd_head(self.bottleneck_dim, self.width, model.num_classes, self.dropout_p)
        return model

    def loss(self, out: StepOutput) -> dict[str, Tensor]:
        y_adv = self.adv_head(self.grl(torch.cat([out.f_s, out.f_t]), out.step))
        n = len(out.f_s)
        return {"transfer": self.trade_off * margin_disparity_loss(out.logits_s, y_adv[:n], out.logits_t, y_adv[n:],
                                                                   self.margin)}
