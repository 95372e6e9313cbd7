r"""DAN: Deep Adaptation Networks (Long et al., ICML 2015, arXiv 1502.02791), as tllib's
``MultipleKernelMaximumMeanDiscrepancy`` (``tllib/alignment/dan.py``, example ``dan.py``)."""

from __future__ import annotations

from torch import Tensor

from tllab.align.mmd import GaussianKernel, MultipleKernelMaximumMeanDiscrepancy, default_alphas
from tllab.plugin import Plugin, StepOutput


class DAN(Plugin):
    r"""Adds :math:`\mathrm{trade\_off} \cdot \text{MK-MMD}(f^s, f^t)`
    (:class:`tllab.align.mmd.MultipleKernelMaximumMeanDiscrepancy`) of the features :math:`f` (the
    bottleneck's output, or the pooled backbone features without a bottleneck), the kernel the sum
    of Gaussian kernels with batch bandwidths :math:`\sigma_u^2 = \alpha_u \cdot \mathrm{mean}\,D`.
    Logged as ``train/align.dan/transfer``.

    Args:
        trade_off: its weight. Default: 1.0 (tllib ``--trade-off``).
        linear: the linear estimator. Default: true (tllib's example: ``--non-linear`` off).
        alphas: the kernels' :math:`\alpha_u`. Default: :math:`2^{-3}, \dots, 2^1` (tllib).

    Example:
        ``tllab-train align=dan`` (``dataset.setting=da``); ``align.dan.linear=false`` for the
        quadratic estimator; ``norm=adabn align=dan`` stacks.
    """

    uses_target = True

    def __init__(self, trade_off: float = 1.0, linear: bool = True, alphas: list[float] | None = None) -> None:
        super().__init__()
        self.trade_off = trade_off
        kernels = [GaussianKernel(alpha=a) for a in (default_alphas() if alphas is None else alphas)]
        self.mkmmd = MultipleKernelMaximumMeanDiscrepancy(kernels, linear)

    def loss(self, out: StepOutput) -> dict[str, Tensor]:
        return {"transfer": self.trade_off * self.mkmmd(out.f_s, out.f_t)}
