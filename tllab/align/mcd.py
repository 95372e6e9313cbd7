r"""MCD: Maximum Classifier Discrepancy (Saito et al., CVPR 2018, arXiv 1712.02560), as tllib's
``classifier_discrepancy``, ``entropy`` and ``ImageClassifierHead`` (``tllib/alignment/mcd.py``) with the
three-step update of its example ``mcd.py``."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tllab.models.classifier import Classifier, as_classifier
from tllab.nn.functional import upcast_half
from tllab.plugin import Forward, Plugin, StepOutput, Update


def classifier_discrepancy(p1: Tensor, p2: Tensor) -> Tensor:
    r"""Mean absolute difference of two heads' class probabilities,
    :math:`d(p_1, p_2) = \frac{1}{N K}\sum_{i,k} |p_{1,ik} - p_{2,ik}|`.

    Shape:
        - p1, p2: :math:`(N, K)`; Output: scalar.

    Example:
        >>> classifier_discrepancy(torch.tensor([[1., 0.]]), torch.tensor([[.5, .5]]))
        tensor(0.5000)
    """
    return (p1 - p2).abs().mean()


def class_balance_entropy(p: Tensor) -> Tensor:
    r"""tllib's MCD ``entropy``: :math:`-\frac{1}{K}\sum_k \log\big(\frac{1}{N}\sum_i p_{ik} + 10^{-6}\big)`,
    smallest when the batch's mean prediction is uniform (it keeps a head from predicting one
    class for every target sample; it is not the mean per-sample entropy).

    Shape:
        - p: :math:`(N, K)` probabilities; Output: scalar.

    Example:
        >>> round(class_balance_entropy(torch.tensor([[1., 0.], [0., 1.]])).item(), 4)  # log 2
        0.6931
    """
    return -(p.mean(0) + 1e-6).log().mean()


class MCDHead(nn.Sequential):
    r"""tllib's MCD head on pooled features:
    ``Dropout-Linear(F, B)-BN-ReLU-Dropout-Linear(B, B)-BN-ReLU-Linear(B, C)``.

    Args:
        in_features: :math:`F`.
        num_classes: :math:`C`.
        bottleneck_dim: :math:`B`. Default: 1024 (tllib ``--bottleneck-dim``).
        dropout_p: both dropouts. Default: 0.5.

    Shape:
        - Input: :math:`(N, F)`; Output: :math:`(N, C)`.

    Example:
        >>> MCDHead(128, 10, 64)(torch.randn(4, 128)).shape
        torch.Size([4, 10])
    """

    def __init__(self, in_features: int, num_classes: int, bottleneck_dim: int = 1024, dropout_p: float = 0.5) -> None:
        super().__init__(
            nn.Dropout(dropout_p), nn.Linear(in_features, bottleneck_dim), nn.BatchNorm1d(bottleneck_dim), nn.ReLU(),
            nn.Dropout(dropout_p), nn.Linear(bottleneck_dim, bottleneck_dim), nn.BatchNorm1d(bottleneck_dim),
            nn.ReLU(), nn.Linear(bottleneck_dim, num_classes),
        )


class MCD(Plugin):
    r"""Two heads :math:`F_1` (the model's head, the one evaluated) and :math:`F_2` on the features
    of :math:`G` (everything else of the model), trained in three updates per batch, with
    :math:`p_j = \mathrm{softmax}(F_j(G(x_t)))`, :math:`E` = :func:`class_balance_entropy` and
    :math:`d` = :func:`classifier_discrepancy`:

    A. (the trainer's step) all of :math:`G, F_1, F_2` minimise
       :math:`\mathrm{CE}_1 + \mathrm{CE}_2 + \mathrm{entropy\_weight}\,(E(p_1) + E(p_2))`;
    B. :math:`F_1, F_2` only: the same minus :math:`\mathrm{trade\_off}\cdot d(p_1, p_2)`, i.e. the
       heads disagree as much as they can on target while staying right on source;
    C. :math:`G` only, ``num_k`` times: :math:`\mathrm{trade\_off}\cdot d(p_1, p_2)`, the features
       move so that the heads agree on target.

    B and C run in :meth:`extra_updates` with the trainer's forward pass, optimizer and (under
    data parallelism) gradient averaging. Logged as ``train/align.mcd/{ce2,entropy,discrepancy}``
    (``discrepancy`` after the last C update). :math:`F_2` joins the optimizer at the base lr, is
    saved with the plug-in and is not part of the model.

    Differences from tllib's example: one optimizer with the run's settings (tllib: SGD without
    momentum for :math:`G`, momentum 0.9 for the heads, fixed lr 0.001 and weight decay 5e-4), and
    the model's head is evaluated (tllib reports the better of the two heads on the test labels).

    Args:
        trade_off: weight of the discrepancy. Default: 1.0 (tllib ``--trade-off``).
        entropy_weight: weight of :math:`E`. Default: 0.01 (tllib ``--trade-off-entropy``).
        num_k: C updates per batch. Default: 4 (tllib ``--num-k``).
        bottleneck_dim: width of both :class:`MCDHead`. Default: 1024 (tllib ``--bottleneck-dim``).
        dropout_p: dropout in the heads. Default: 0.5.

    Example:
        ``tllab-train align=mcd`` (``dataset.setting=da``); ``norm=adabn align=mcd`` stacks.
    """

    uses_target = True
    exclusive = "head"

    def __init__(self, trade_off: float = 1.0, entropy_weight: float = 0.01, num_k: int = 4,
                 bottleneck_dim: int = 1024, dropout_p: float = 0.5) -> None:
        super().__init__()
        if num_k < 0 or bottleneck_dim < 1 or not 0 <= dropout_p < 1:
            raise ValueError(f"need num_k >= 0, bottleneck_dim >= 1 and dropout_p in [0, 1); got "
                             f"{num_k}, {bottleneck_dim}, {dropout_p}")
        self.trade_off, self.entropy_weight, self.num_k = trade_off, entropy_weight, num_k
        self.bottleneck_dim, self.dropout_p = bottleneck_dim, dropout_p
        self.head2: nn.Module | None = None

    def transform_model(self, model: Classifier) -> Classifier:
        model = as_classifier(model, "align.mcd")
        model.head = MCDHead(model.features_dim, model.num_classes, self.bottleneck_dim, self.dropout_p)
        self.head2 = MCDHead(model.features_dim, model.num_classes, self.bottleneck_dim, self.dropout_p)
        return model

    def _heads(self, out: StepOutput) -> tuple[Tensor, Tensor, Tensor]:
        """Source CE of F_2 and the target probabilities of F_1 and F_2."""
        logits2 = upcast_half(self.head2(torch.cat([out.f_s, out.f_t])))
        n = len(out.f_s)
        return F.cross_entropy(logits2[:n], out.y_s), upcast_half(out.logits_t).softmax(1), logits2[n:].softmax(1)

    def _source_terms(self, out: StepOutput) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        ce2, p1, p2 = self._heads(out)
        return ce2, self.entropy_weight * (class_balance_entropy(p1) + class_balance_entropy(p2)), p1, p2

    def loss(self, out: StepOutput) -> dict[str, Tensor]:
        ce2, entropy, _, _ = self._source_terms(out)
        return {"ce2": ce2, "entropy": entropy}

    def extra_updates(self, out: StepOutput, forward: Forward, update: Update) -> dict[str, Tensor]:
        heads = [*out.model.head.parameters(), *self.head2.parameters()]
        ids = {id(p) for p in heads}
        features = [p for p in out.model.parameters() if p.requires_grad and id(p) not in ids]
        # B: the heads maximise their discrepancy on target while fitting the source labels
        step = forward(out)
        ce2, entropy, p1, p2 = self._source_terms(step)
        update(F.cross_entropy(upcast_half(step.logits_s), step.y_s) + ce2 + entropy
               - self.trade_off * classifier_discrepancy(p1, p2), heads)
        # C: the features minimise it
        discrepancy = torch.zeros(())
        for _ in range(self.num_k):
            _, p1, p2 = self._heads(forward(out))
            discrepancy = self.trade_off * classifier_discrepancy(p1, p2)
            update(discrepancy, features)
        return {"discrepancy": discrepancy.detach()}
