r"""BSS: Batch Spectral Shrinkage (Chen, Wang, Fu, Long and Wang, "Catastrophic Forgetting Meets
Negative Transfer: Batch Spectral Shrinkage for Safe Transfer Learning", NeurIPS 2019).

Fine-tuning transfers some pretrained feature directions that hurt the target task (negative
transfer); they show up as the *small* singular values of a batch's feature matrix. BSS
penalizes the :math:`k` smallest:

.. math:: \mathcal{L}_{bss} = \eta \sum_{i=1}^{k} \sigma_{-i}^2(F), \qquad F \in \mathbb{R}^{b \times d}

where :math:`F` stacks the batch's features (the classifier's features: pooled backbone output,
after the bottleneck if there is one) and :math:`\sigma_{-1} \le \sigma_{-2} \le \dots` are its
smallest singular values, of :math:`\min(b, d)` in all. As tllib's ``BatchSpectralShrinkage``
(``tllib/regularization/bss.py``, which takes the SVD of :math:`F^\top`: same singular values).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from tllab.distributed import all_gather_cat, is_dist, rank, world_size
from tllab.errors import ConfigError
from tllab.nn.functional import upcast_half
from tllab.plugin import Plugin, SetupContext, StepOutput


def batch_spectral_shrinkage(features: Tensor, k: int = 1) -> Tensor:
    r"""Sum of the squares of the ``k`` smallest singular values of ``features``:
    :math:`\sum_{i=1}^{k} \sigma_{-i}^2`.

    Half-precision inputs (AMP) are upcast to float32 (the SVD has no half kernels, and the small
    singular values are what float16 loses first); float32/float64 are kept. Differentiable: the
    gradient of :math:`\sigma_i^2` is :math:`2\sigma_i u_i v_i^\top`, well defined even for
    repeated or zero singular values (``torch.linalg.svdvals``).

    Args:
        features: the batch's feature matrix.
        k: how many of the smallest singular values to penalize, :math:`1 \le k \le \min(b, d)`.

    Shape:
        - features: :math:`(b, d)`.
        - Output: scalar (0-d), float32 or float64.

    Raises:
        ValueError: ``features`` is not 2-d, or ``k`` is out of range.

    Example:
        >>> f = torch.diag(torch.tensor([3.0, 2.0, 1.0]))  # singular values 3, 2, 1
        >>> batch_spectral_shrinkage(f, k=1).item(), batch_spectral_shrinkage(f, k=2).item()
        (1.0, 5.0)
    """
    if features.dim() != 2:
        raise ValueError(f"BSS needs a (batch, features) matrix, got shape {tuple(features.shape)}.")
    n = min(features.shape)
    if not 1 <= k <= n:
        raise ValueError(f"k={k} is out of range: a {tuple(features.shape)} feature matrix has {n} singular values.")
    return torch.linalg.svdvals(upcast_half(features))[n - k:].square().sum()  # svdvals are in descending order


class _ScaleGrad(torch.autograd.Function):
    """Identity whose backward multiplies the gradient by ``scale``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, scale: float) -> Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.scale, None


def gather_features(features: Tensor) -> Tensor:
    r"""Every rank's ``features`` concatenated in rank order, differentiable in the local part only.

    The other ranks' rows are constants here. Their gradients are computed on their own ranks:
    every rank evaluates the same loss of the gathered matrix, and its backward reaches its own
    rows. The local rows' gradient is multiplied by the world size :math:`W` because the trainer
    *averages* parameter gradients over ranks: the average of the :math:`W` local contributions
    :math:`W \cdot \partial\mathcal{L}/\partial F_r \cdot \partial F_r/\partial\theta` is then
    exactly :math:`\partial\mathcal{L}/\partial\theta` of one process on the concatenated batch.
    In one process this returns ``features`` itself.

    Shape:
        - features: :math:`(b_r, d)`, batch sizes may differ between ranks.
        - Output: :math:`(\sum_r b_r, d)`.
    """
    if not is_dist():
        return features
    sizes = all_gather_cat(torch.tensor([len(features)], device=features.device))
    start = int(sizes[:rank()].sum())
    everything = all_gather_cat(features.detach())
    local = _ScaleGrad.apply(features, world_size())
    return torch.cat([everything[:start], local, everything[start + len(features):]])


class BSS(Plugin):
    r"""Batch Spectral Shrinkage as a fine-tuning regularizer:

    .. math:: \mathcal{L} = \mathrm{weight} \cdot \sum_{i=1}^{k} \sigma_{-i}^2(F_s)

    on the labelled batch's features ``out.f_s`` (:func:`batch_spectral_shrinkage`), logged
    (weighted) as ``train/regularizer.bss/spectral``.

    Under data parallelism the SVD is over each rank's local batch by default (as tllib, where
    it is the only batch); ``gather=True`` takes it over all ranks' features together
    (:func:`gather_features`), so a run on :math:`W` ranks of batch :math:`b` has the loss,
    value and gradient, of one process with batch :math:`Wb` (more singular values: the
    :math:`k` smallest of :math:`\min(Wb, d)`). It costs one all-gather of the features per step.

    Args:
        weight: :math:`\eta`. Default 0.001 (tllib ``--trade-off``; Chen et al. 2019).
        k: number of smallest singular values penalized. Default 1 (tllib ``-k``; the paper's
            choice). Must not exceed :math:`\min(b, d)` (checked at start).
        gather: SVD over the features of all ranks (see above). Default False (local batch).

    Shape:
        - ``out.f_s``: :math:`(b, d)`; output of :meth:`loss`: ``{"spectral": 0-d tensor}``,
          float32 (float64 for float64 features).

    Example:
        >>> bss = BSS(weight=1.0, k=2)
        >>> f = torch.diag(torch.tensor([3.0, 2.0, 1.0]))
        >>> bss.loss(StepOutput(0, 1, None, *[torch.zeros(1)] * 4, f_s=f))["spectral"].item()  # 2² + 1²
        5.0

        From the command line: ``tllab-train experiment=digits_finetune
        backbone.pretrained=<run>/checkpoints/last.pt regularizer=bss`` (tllib's recipe:
        ``configs/regularizer/bss.yaml``).
    """

    def __init__(self, weight: float = 0.001, k: int = 1, gather: bool = False) -> None:
        super().__init__()
        if k < 1:
            raise ValueError(f"k={k} must be at least 1 (the number of smallest singular values penalized).")
        self.weight, self.k, self.gather = weight, k, gather

    def setup(self, ctx: SetupContext) -> None:
        """Refuse a ``k`` larger than the number of singular values of a batch, before training."""
        batch = ctx.config.get("trainer", {}).get("batch_size")
        dim = getattr(ctx.model, "features_dim", None)
        if batch is None or dim is None:
            return
        batch *= world_size() if self.gather else 1
        if self.k > min(batch, dim):
            raise ConfigError(f"regularizer.bss.k={self.k} exceeds the {min(batch, dim)} singular values of a "
                              f"batch's {batch} x {dim} feature matrix; lower k or raise trainer.batch_size.")

    def loss(self, out: StepOutput) -> dict[str, Tensor]:
        f = gather_features(out.f_s) if self.gather else out.f_s
        return {"spectral": self.weight * batch_spectral_shrinkage(f, self.k)}
