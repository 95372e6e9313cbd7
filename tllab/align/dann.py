r"""DANN: Domain-Adversarial Neural Networks (Ganin et al., JMLR 2016, arXiv 1505.07818), as tllib's
``DomainAdversarialLoss`` (``tllib/alignment/dann.py``, example ``dann.py``)."""

from __future__ import annotations

from torch import Tensor

from tllab.align.discriminator import AdversarialAlignment
from tllab.models.classifier import Classifier
from tllab.plugin import StepOutput


class DANN(AdversarialAlignment):
    r"""Domain-adversarial training on the features :math:`f` (the bottleneck's output, or the
    pooled backbone features without a bottleneck):

    .. math:: L_{adv} = \tfrac{1}{2}\big(\mathbb{E}_{s}\,\ell(D(\mathcal{R}_\lambda(f^s)), 1)
              + \mathbb{E}_{t}\,\ell(D(\mathcal{R}_\lambda(f^t)), 0)\big)

    with :math:`\ell` the binary cross-entropy, :math:`D` a :class:`DomainDiscriminator` and
    :math:`\mathcal{R}_\lambda` gradient reversal with tllib's warm-start :math:`\lambda`.

    Args:
        trade_off: weight of :math:`L_{adv}`. Default: 1.0 (tllib ``--trade-off``).
        hidden_size: width of the discriminator's hidden layers. Default: 1024.
        alpha, lo, hi, max_iters: the :math:`\lambda` schedule (:func:`tllab.align.grl.warm_start_coeff`).
            Defaults: 1.0, 0.0, 1.0, 1000 (tllib).

    Example:
        ``tllab-train align=dann`` (``dataset.setting=da``); ``norm=adabn align=dann`` stacks.
    """

    def discriminator_features(self, model: Classifier) -> int:
        return model.features_dim

    def inputs(self, out: StepOutput) -> tuple[Tensor, Tensor, None]:
        return out.f_s, out.f_t, None
