r"""CDAN and CDAN+E: Conditional Adversarial Domain Adaptation (Long et al., NeurIPS 2018,
arXiv 1705.10667), as tllib's ``ConditionalDomainAdversarialLoss`` (``tllib/alignment/cdan.py``,
example ``cdan.py``)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from tllab.align.discriminator import AdversarialAlignment
from tllab.models.classifier import Classifier
from tllab.nn.functional import upcast_half
from tllab.plugin import StepOutput


class MultiLinearMap(nn.Module):
    r"""The multilinear map :math:`T_\otimes(f, g) = g \otimes f`, flattened (tllib's order: row
    :math:`c` of the outer product is :math:`g_c f`).

    Shape:
        - f: :math:`(N, F)`; g: :math:`(N, C)`; Output: :math:`(N, C \cdot F)`.

    Example:
        >>> MultiLinearMap()(torch.tensor([[1., 2.]]), torch.tensor([[3., 4.]]))
        tensor([[3., 6., 4., 8.]])
    """

    def forward(self, f: Tensor, g: Tensor) -> Tensor:
        return (g.unsqueeze(2) * f.unsqueeze(1)).flatten(1)


class RandomizedMultiLinearMap(nn.Module):
    r"""The randomized multilinear map

    .. math:: T_\odot(f, g) = \frac{1}{\sqrt{d}} (f R_f) \odot (g R_g)

    with :math:`R_f, R_g` standard normal, drawn once (buffers: saved in checkpoints, moved with
    the plug-in). Inner products are preserved in expectation,
    :math:`\mathbb{E}\langle T_\odot(f, g), T_\odot(f', g')\rangle = \langle f, f'\rangle\langle g, g'\rangle
    = \langle T_\otimes(f, g), T_\otimes(f', g')\rangle`, at width :math:`d` instead of :math:`F C`.

    Args:
        features_dim: :math:`F`.
        num_classes: :math:`C`.
        output_dim: :math:`d`. Default: 1024 (tllib ``-rd``).

    Shape:
        - f: :math:`(N, F)`; g: :math:`(N, C)`; Output: :math:`(N, d)`.

    Example:
        >>> RandomizedMultiLinearMap(256, 10)(torch.randn(4, 256), torch.randn(4, 10)).shape
        torch.Size([4, 1024])
    """

    def __init__(self, features_dim: int, num_classes: int, output_dim: int = 1024) -> None:
        super().__init__()
        self.register_buffer("Rf", torch.randn(features_dim, output_dim))
        self.register_buffer("Rg", torch.randn(num_classes, output_dim))
        self.output_dim = output_dim

    def forward(self, f: Tensor, g: Tensor) -> Tensor:
        return (f @ self.Rf.to(f.dtype)) * (g @ self.Rg.to(g.dtype)) / math.sqrt(self.output_dim)


def entropy_weights(p: Tensor) -> Tensor:
    r"""CDAN+E's sample weights :math:`w_i = 1 + e^{-H(p_i)}`,
    :math:`H(p) = -\sum_c p_c \log(p_c + 10^{-5})` (tllib's ``entropy``): confident predictions
    weigh up to 2, uniform ones about 1.

    Shape:
        - p: :math:`(N, C)` probabilities; Output: :math:`(N,)`.

    Example:
        >>> entropy_weights(torch.tensor([[1., 0.], [.5, .5]]))
        tensor([2.0000, 1.5000])
    """
    return 1 + torch.exp((p * (p + 1e-5).log()).sum(1))


class CDAN(AdversarialAlignment):
    r"""Domain-adversarial training conditioned on the predictions: the discriminator sees
    :math:`h = T(f, g)`, :math:`g = \mathrm{softmax}(\text{logits})` detached (as tllib: the
    classifier is trained only through :math:`f`), :math:`T` the :class:`MultiLinearMap` or, with
    ``randomized``, the :class:`RandomizedMultiLinearMap`:

    .. math:: L_{adv} = \frac{\sum_i w_i\, \ell(D(\mathcal{R}_\lambda(h_i)), y^{dom}_i)}{\sum_i w_i}

    over source (:math:`y^{dom} = 1`) and target (0) samples; :math:`w_i = 1` (CDAN) or
    :func:`entropy_weights` of :math:`g_i` (``entropy=true``, CDAN+E).

    Args:
        trade_off: weight of :math:`L_{adv}`. Default: 1.0 (tllib ``--trade-off``).
        entropy: CDAN+E's entropy conditioning. Default: false (tllib ``--entropy``).
        randomized: the randomized map (the paper's choice when :math:`F C` is large, e.g. 4096+).
            Default: false (tllib ``-r``).
        randomized_dim: its width :math:`d`. Default: 1024 (tllib ``-rd``).
        hidden_size, alpha, lo, hi, max_iters: as :class:`tllab.align.dann.DANN`.

    Example:
        ``tllab-train align=cdan align.cdan.entropy=true`` (CDAN+E); ``norm=adabn align=cdan`` stacks.
    """

    def __init__(self, trade_off: float = 1.0, entropy: bool = False, randomized: bool = False,
                 randomized_dim: int = 1024, hidden_size: int = 1024, alpha: float = 1.0, lo: float = 0.0,
                 hi: float = 1.0, max_iters: int = 1000) -> None:
        super().__init__(trade_off, hidden_size, alpha, lo, hi, max_iters)
        if randomized_dim < 1:
            raise ValueError(f"randomized_dim={randomized_dim} must be >= 1")
        self.entropy, self.randomized, self.randomized_dim = entropy, randomized, randomized_dim
        self.map: nn.Module = MultiLinearMap()

    def discriminator_features(self, model: Classifier) -> int:
        if self.randomized:
            self.map = RandomizedMultiLinearMap(model.features_dim, model.num_classes, self.randomized_dim)
            return self.randomized_dim
        return model.features_dim * model.num_classes

    def inputs(self, out: StepOutput) -> tuple[Tensor, Tensor, Tensor | None]:
        g_s, g_t = (upcast_half(g).softmax(1).detach() for g in (out.logits_s, out.logits_t))
        weight = entropy_weights(torch.cat([g_s, g_t])) if self.entropy else None
        f_s, f_t = upcast_half(out.f_s), upcast_half(out.f_t)
        return self.map(f_s, g_s), self.map(f_t, g_t), weight
