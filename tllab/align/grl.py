r"""Gradient reversal (Ganin & Lempitsky, "Unsupervised Domain Adaptation by Backpropagation",
ICML 2015) and tllib's warm-start schedule of its coefficient (``tllib/modules/grl.py``)."""

from __future__ import annotations

import math
from typing import Any

from torch import Tensor, nn
from torch.autograd import Function


class GradientReverseFunction(Function):
    r"""Identity forward, gradient multiplied by :math:`-\lambda` backward.

    .. math:: \mathcal{R}_\lambda(x) = x, \qquad \frac{\partial \mathcal{R}_\lambda}{\partial x} = -\lambda I

    Example:
        >>> x = torch.ones(3, requires_grad=True)
        >>> GradientReverseFunction.apply(x, 0.5).sum().backward()
        >>> x.grad
        tensor([-0.5000, -0.5000, -0.5000])
    """

    @staticmethod
    def forward(ctx: Any, x: Tensor, coeff: float) -> Tensor:
        ctx.coeff = coeff
        return x.view_as(x)  # a new autograd node; no copy

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * -ctx.coeff, None


def warm_start_coeff(step: int, alpha: float = 1.0, lo: float = 0.0, hi: float = 1.0,
                     max_iters: int = 1000) -> float:
    r"""tllib's ``WarmStartGradientReverseLayer`` coefficient at iteration ``step``:

    .. math:: \lambda(p) = \frac{2(hi - lo)}{1 + \exp(-\alpha p)} - (hi - lo) + lo, \qquad p = \frac{step}{max\_iters}

    It rises from ``lo`` at step 0 towards ``hi``. With tllib's defaults :math:`p` is not the
    training progress: :math:`\lambda` is 0.46 at step 1000 and 0.96 at step 4000, whatever the
    run's length (the DANN paper uses :math:`p` = progress in [0, 1] and :math:`\alpha = 10`:
    ``max_iters`` = the run's steps, ``alpha=10``).

    Args:
        step: optimizer steps taken before this one (tllib's ``iter_num``).
        alpha: :math:`\alpha`. Default: 1.0.
        lo: :math:`\lambda` at step 0. Default: 0.0.
        hi: the limit of :math:`\lambda`. Default: 1.0.
        max_iters: steps that make :math:`p = 1`. Default: 1000.

    Example:
        >>> warm_start_coeff(0), round(warm_start_coeff(1000), 4)
        (0.0, 0.4621)
    """
    return 2.0 * (hi - lo) / (1.0 + math.exp(-alpha * step / max_iters)) - (hi - lo) + lo


class WarmStartGradientReverseLayer(nn.Module):
    r"""Gradient reversal whose coefficient follows :func:`warm_start_coeff` of the step passed
    in, so it holds no counter (tllib's counts its own calls): a resumed run uses the same
    coefficients as an uninterrupted one.

    Args:
        alpha, lo, hi, max_iters: see :func:`warm_start_coeff` (tllib's defaults 1, 0, 1, 1000).

    Shape:
        - Input: any; Output: the same.

    Example:
        >>> grl = WarmStartGradientReverseLayer()
        >>> x = torch.ones(2, requires_grad=True)
        >>> grl(x, step=1000).sum().backward()
        >>> x.grad
        tensor([-0.4621, -0.4621])
    """

    def __init__(self, alpha: float = 1.0, lo: float = 0.0, hi: float = 1.0, max_iters: int = 1000) -> None:
        super().__init__()
        if max_iters < 1:
            raise ValueError(f"max_iters={max_iters} must be >= 1")
        self.alpha, self.lo, self.hi, self.max_iters = alpha, lo, hi, max_iters

    def coeff(self, step: int) -> float:
        return warm_start_coeff(step, self.alpha, self.lo, self.hi, self.max_iters)

    def forward(self, x: Tensor, step: int) -> Tensor:
        return GradientReverseFunction.apply(x, self.coeff(step))

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}, lo={self.lo}, hi={self.hi}, max_iters={self.max_iters}"
