r"""MCC: Minimum Class Confusion (Jin et al., "Minimum Class Confusion for Versatile Domain
Adaptation", ECCV 2020, arXiv 1912.03699), as tllib's ``MinimumClassConfusionLoss``
(``tllib/self_training/mcc.py``, example ``mcc.py``)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tllab.nn.functional import upcast_half
from tllab.plugin import Plugin, StepOutput


class MinimumClassConfusionLoss(nn.Module):
    r"""Class confusion of the target predictions, to be minimised.

    With :math:`P = \mathrm{softmax}(\text{logits} / T)` (:math:`N \times C`), sample weights
    :math:`w_i = N \frac{1 + e^{-H(P_i)}}{\sum_j (1 + e^{-H(P_j)})}` (detached;
    :math:`H(p) = -\sum_c p_c \log(p_c + 10^{-5})`), the confusion matrix
    :math:`M = P^\top \mathrm{diag}(w) P` and its row-normalised :math:`\tilde M_{jk} = M_{jk} / \sum_l M_{jl}`:

    .. math:: L_{mcc} = \frac{1}{C} \sum_{j \ne k} \tilde M_{jk}

    tllib divides by ``M.sum(dim=1)`` without ``keepdim``, which broadcasts over columns (divides
    column :math:`k` by row sum :math:`k`); :math:`M` is symmetric, so that matrix is the transpose
    of :math:`\tilde M` and the loss is the same.

    Args:
        temperature: :math:`T > 0`. Default: 2.5 (tllib).

    Shape:
        - Input: :math:`(N, C)` logits; Output: scalar (float32 for half-precision inputs).

    Example:
        >>> loss = MinimumClassConfusionLoss(2.5)(torch.randn(8, 5))
        >>> 0 <= loss.item() <= 1
        True
    """

    def __init__(self, temperature: float = 2.5) -> None:
        super().__init__()
        if temperature <= 0:
            raise ValueError(f"temperature={temperature} must be > 0")
        self.temperature = temperature

    def forward(self, logits: Tensor) -> Tensor:
        n, c = logits.shape
        p = (upcast_half(logits) / self.temperature).softmax(1)
        h = -(p * (p + 1e-5).log()).sum(1).detach()
        w = 1 + torch.exp(-h)
        w = n * w / w.sum()
        m = (p * w.unsqueeze(1)).T @ p
        m = m / m.sum(1, keepdim=True)
        return (m.sum() - m.trace()) / c

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}"


class MCC(Plugin):
    r"""Adds :math:`\mathrm{trade\_off} \cdot L_{mcc}(\text{target logits})`
    (:class:`MinimumClassConfusionLoss`), logged as ``train/align.mcc/transfer``.

    Args:
        trade_off: its weight. Default: 1.0 (tllib ``--trade-off``).
        temperature: :math:`T`. Default: 2.5 (tllib ``--temperature``).

    Example:
        ``tllab-train align=mcc`` (``dataset.setting=da``); ``align=[cdan,mcc]`` stacks.
    """

    uses_target = True

    def __init__(self, trade_off: float = 1.0, temperature: float = 2.5) -> None:
        super().__init__()
        self.trade_off = trade_off
        self.mcc = MinimumClassConfusionLoss(temperature)

    def loss(self, out: StepOutput) -> dict[str, Tensor]:
        return {"transfer": self.trade_off * self.mcc(out.logits_t)}
