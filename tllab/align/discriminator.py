r"""What DANN and CDAN share: tllib's domain discriminator and the adversarial plug-in that trains
it through gradient reversal (``tllib/modules/domain_discriminator.py``, ``tllib/alignment/dann.py``)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tllab.align.grl import WarmStartGradientReverseLayer
from tllab.distributed import all_reduce_sum, world_size
from tllab.models.classifier import Classifier, as_classifier
from tllab.nn.functional import upcast_half
from tllab.plugin import Plugin, StepOutput


class DomainDiscriminator(nn.Sequential):
    r"""tllib's domain discriminator: ``Linear(F, H)-BN-ReLU-Linear(H, H)-BN-ReLU-Linear(H, 1)``.

    It returns the logit of "source" (tllib ends with a ``Sigmoid`` and ``binary_cross_entropy``;
    the logit with ``binary_cross_entropy_with_logits`` is the same loss without its overflow).

    Args:
        in_features: :math:`F`, the width of its input.
        hidden_size: :math:`H`. Default: 1024 (tllib).

    Shape:
        - Input: :math:`(N, F)`; Output: :math:`(N, 1)`.

    Example:
        >>> DomainDiscriminator(256)(torch.randn(8, 256)).shape
        torch.Size([8, 1])
    """

    def __init__(self, in_features: int, hidden_size: int = 1024) -> None:
        super().__init__(
            nn.Linear(in_features, hidden_size), nn.BatchNorm1d(hidden_size), nn.ReLU(),
            nn.Linear(hidden_size, hidden_size), nn.BatchNorm1d(hidden_size), nn.ReLU(),
            nn.Linear(hidden_size, 1),
        )


def domain_adversarial_loss(d_s: Tensor, d_t: Tensor, weight: Tensor | None = None) -> Tensor:
    r"""Binary cross-entropy of discriminator logits, source labelled 1 and target 0.

    Unweighted: :math:`\frac{1}{2}\big(\mathrm{mean}_i\,\ell(d^s_i, 1) + \mathrm{mean}_j\,\ell(d^t_j, 0)\big)`
    (tllib's DANN). Weighted (CDAN+E): :math:`\sum_k w_k \ell_k / \sum_k w_k` over the source
    then target samples (tllib normalises the weights to sum to the batch size and takes the mean).

    Args:
        d_s: source logits.
        d_t: target logits.
        weight: one weight per sample of ``cat([d_s, d_t])``, or ``None``.

    Shape:
        - d_s: :math:`(N_s, 1)`; d_t: :math:`(N_t, 1)`; weight: :math:`(N_s + N_t,)`; Output: scalar.

    Example:
        >>> round(domain_adversarial_loss(torch.zeros(4, 1), torch.zeros(4, 1)).item(), 4)  # log 2
        0.6931
    """
    d_s, d_t = upcast_half(d_s).flatten(), upcast_half(d_t).flatten()
    if weight is None:
        return 0.5 * (F.binary_cross_entropy_with_logits(d_s, torch.ones_like(d_s))
                      + F.binary_cross_entropy_with_logits(d_t, torch.zeros_like(d_t)))
    d = torch.cat([d_s, d_t])
    labels = torch.cat([torch.ones_like(d_s), torch.zeros_like(d_t)])
    losses = F.binary_cross_entropy_with_logits(d, labels, reduction="none")
    # under data parallelism the weights are normalised over every rank's samples (the gradient
    # average over ranks then equals one process on the concatenated batch)
    total = all_reduce_sum(weight.sum().detach()) / world_size()
    return (weight * losses).sum() / total


class AdversarialAlignment(Plugin):
    r"""A domain discriminator trained to tell source from target inputs ``h`` (:meth:`inputs`),
    with the gradient reaching the network reversed by a :class:`WarmStartGradientReverseLayer`:
    one minimisation of

    .. math:: L = \mathrm{CE} + \mathrm{trade\_off} \cdot
              L_{adv}\big(D(\mathcal{R}_\lambda(h_s)), D(\mathcal{R}_\lambda(h_t))\big)

    trains the discriminator to minimise :math:`L_{adv}` and the features to maximise it. The
    discriminator is built in ``transform_model`` (its width comes from the model), joins the
    optimizer at the base lr (tllib: lr multiplier 1.0, the weight decay of every group), is
    saved in checkpoints with the plug-in and is not part of the model (nor of an exported
    backbone). It is logged as ``train/align.<name>/transfer``.
    """

    uses_target = True

    def __init__(self, trade_off: float = 1.0, hidden_size: int = 1024, alpha: float = 1.0, lo: float = 0.0,
                 hi: float = 1.0, max_iters: int = 1000) -> None:
        super().__init__()
        self.trade_off, self.hidden_size = trade_off, hidden_size
        self.grl = WarmStartGradientReverseLayer(alpha, lo, hi, max_iters)
        self.discriminator: DomainDiscriminator | None = None

    def discriminator_features(self, model: Classifier) -> int:
        """The width of :meth:`inputs`' rows for this model."""
        raise NotImplementedError

    def inputs(self, out: StepOutput) -> tuple[Tensor, Tensor, Tensor | None]:
        """The discriminator's source and target inputs and the per-sample weights (or ``None``)."""
        raise NotImplementedError

    def transform_model(self, model: Classifier) -> Classifier:
        model = as_classifier(model, type(self).__name__)
        self.discriminator = DomainDiscriminator(self.discriminator_features(model), self.hidden_size)
        return model

    def loss(self, out: StepOutput) -> dict[str, Tensor]:
        h_s, h_t, weight = self.inputs(out)
        d = self.discriminator(self.grl(torch.cat([h_s, h_t]), out.step))
        return {"transfer": self.trade_off * domain_adversarial_loss(d[:len(h_s)], d[len(h_s):], weight)}
