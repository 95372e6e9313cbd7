r"""JAN: Joint Adaptation Networks (Long et al., ICML 2017, arXiv 1605.06636), as tllib's
``JointMultipleKernelMaximumMeanDiscrepancy`` and ``Theta`` (``tllib/alignment/jan.py``, example ``jan.py``)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from tllab.align.grl import GradientReverseFunction
from tllab.align.mmd import GaussianKernel, default_alphas, mmd, multi_kernel
from tllab.models.classifier import Classifier, as_classifier
from tllab.plugin import Plugin, StepOutput


class Theta(nn.Module):
    r"""tllib's adversarial layer transform :math:`\theta(z) = \mathcal{R}_1(A\,\mathcal{R}_1(z) + b)`,
    :math:`A = I`, :math:`b = 0` at start: identity forward; the two reversals cancel on the
    gradient reaching :math:`z` (the features still minimise the JMMD) while :math:`A, b` get it
    reversed once (they maximise it).

    Args:
        dim: the layer's width.

    Shape:
        - Input: :math:`(N, \text{dim})`; Output: the same.

    Example:
        >>> z = torch.randn(4, 3)
        >>> torch.equal(Theta(3)(z), z)
        True
    """

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.layer = nn.Linear(dim, dim)
        nn.init.eye_(self.layer.weight)
        nn.init.zeros_(self.layer.bias)

    def forward(self, z: Tensor) -> Tensor:
        return GradientReverseFunction.apply(self.layer(GradientReverseFunction.apply(z, 1.0)), 1.0)


class JointMultipleKernelMaximumMeanDiscrepancy(nn.Module):
    r"""JMMD: the MMD estimate (:func:`tllab.align.mmd.mmd`) with the joint kernel, the product
    over layers :math:`l` of each layer's multi-kernel:

    .. math:: K_{ij} = \prod_l \sum_u k^l_u\big(\theta_l(z^l_i), \theta_l(z^l_j)\big)

    over :math:`z_i` the source then the target samples; :math:`\theta_l` the identity or a
    :class:`Theta`.

    Args:
        kernels: one sequence of kernels per layer.
        linear: the linear estimator. Default: False (tllib).
        thetas: one module per layer, or None (identities). Default: None.

    Shape:
        - z_s: one :math:`(n_s, F_l)` tensor per layer; z_t: one :math:`(n_t, F_l)` per layer; Output: scalar.

    Example:
        >>> jmmd = JointMultipleKernelMaximumMeanDiscrepancy(
        ...     ([GaussianKernel(alpha=1.0)], [GaussianKernel(sigma=0.92, track_running_stats=False)]))
        >>> f, p = torch.randn(8, 4), torch.randn(8, 3).softmax(1)
        >>> jmmd((f[:4], p[:4]), (f[4:], p[4:])).shape
        torch.Size([])
    """

    def __init__(self, kernels: Sequence[Sequence[nn.Module]], linear: bool = False,
                 thetas: Sequence[nn.Module] | None = None) -> None:
        super().__init__()
        self.kernels = nn.ModuleList(nn.ModuleList(layer) for layer in kernels)
        self.thetas = nn.ModuleList(thetas if thetas is not None else (nn.Identity() for _ in kernels))
        if len(self.thetas) != len(self.kernels):
            raise ValueError(f"{len(self.thetas)} thetas for {len(self.kernels)} layers")
        self.linear = linear

    def forward(self, z_s: Sequence[Tensor], z_t: Sequence[Tensor]) -> Tensor:
        k = math.prod(multi_kernel(kernels, theta(torch.cat([layer_s, layer_t])))
                      for layer_s, layer_t, kernels, theta in zip(z_s, z_t, self.kernels, self.thetas, strict=True))
        return mmd(k, len(z_s[0]), self.linear)

    def extra_repr(self) -> str:
        return f"linear={self.linear}"


class JAN(Plugin):
    r"""Adds :math:`\mathrm{trade\_off} \cdot \mathrm{JMMD}\big((f^s, g^s), (f^t, g^t)\big)`
    (:class:`JointMultipleKernelMaximumMeanDiscrepancy`) of the features :math:`f` and the
    predictions :math:`g = \mathrm{softmax}(\text{logits})` (not detached, as tllib): on :math:`f` the
    sum of Gaussian kernels with batch bandwidths :math:`\alpha_u \cdot \mathrm{mean}\,D`, on
    :math:`g` one Gaussian kernel of fixed :math:`\sigma`. Logged as ``train/align.jan/transfer``.

    With ``adversarial``, a :class:`Theta` per layer (built from the model's widths in
    ``transform_model``) maximises the JMMD (JAN-A); they join the optimizer at
    ``theta_lr_mult`` × the base lr (tllib: 0.1) with the optimizer's weight decay, and are saved in
    checkpoints with the plug-in, not with the model.

    Args:
        trade_off: its weight. Default: 1.0 (tllib ``--trade-off``).
        linear: the linear estimator. Default: false (tllib ``--linear``).
        alphas: the feature kernels' :math:`\alpha_u`. Default: :math:`2^{-3}, \dots, 2^1` (tllib).
        sigma: the prediction kernel's :math:`\sigma`. Default: 0.92 (tllib).
        adversarial: JAN-A's adversarial :math:`\theta`. Default: false (tllib ``--adversarial``).
        theta_lr_mult: the :math:`\theta`'s lr multiplier. Default: 0.1 (tllib).

    Example:
        ``tllab-train align=jan`` (``dataset.setting=da``); ``align.jan.adversarial=true`` (JAN-A).
    """

    uses_target = True

    def __init__(self, trade_off: float = 1.0, linear: bool = False, alphas: list[float] | None = None,
                 sigma: float = 0.92, adversarial: bool = False, theta_lr_mult: float = 0.1) -> None:
        super().__init__()
        self.trade_off, self.adversarial, self.theta_lr_mult = trade_off, adversarial, theta_lr_mult
        self.kernels = ([GaussianKernel(alpha=a) for a in (default_alphas() if alphas is None else alphas)],
                        [GaussianKernel(sigma=sigma, track_running_stats=False)])
        self.jmmd = JointMultipleKernelMaximumMeanDiscrepancy(self.kernels, linear)

    def transform_model(self, model: Classifier) -> Classifier:
        if self.adversarial:
            model = as_classifier(model, "align.jan (adversarial)")
            thetas = [Theta(model.features_dim), Theta(model.num_classes)]
            self.jmmd = JointMultipleKernelMaximumMeanDiscrepancy(self.kernels, self.jmmd.linear, thetas)
        return model

    def param_groups(self, model: nn.Module, base_lr: float) -> list[dict[str, Any]]:
        params = list(self.parameters())
        return [{"params": params, "lr": self.theta_lr_mult * base_lr, "name": "thetas"}] if params else []

    def loss(self, out: StepOutput) -> dict[str, Tensor]:
        g_s, g_t = out.logits_s.softmax(1), out.logits_t.softmax(1)
        return {"transfer": self.trade_off * self.jmmd((out.f_s, g_s), (out.f_t, g_t))}
