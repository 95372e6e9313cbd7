"""DomainNorm (Zhang et al., "Domain-invariant Stereo Matching Networks", ECCV 2020;
``feihuzhang/DSMNet`` ``models/DSMNet.py``): instance normalization, then L2 normalization of
each pixel's channel vector, then a learnable per-channel affine, in place of every BatchNorm2d
of the backbone. It keeps no running statistics and behaves the same in training and evaluation.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from numba import prange
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from tllab.errors import ConfigError
from tllab.nn.fused import cpu_kernel, fusable
from tllab.norm.placement import replace_batchnorm
from tllab.plugin import Plugin

__all__ = ["DomainNorm", "DomainNormStrategy"]

_L2_EPS = 1e-12  # F.normalize's clamp of the norm


def _forward_loop(x, weight, bias, eps, y, mean, invstd, norm):
    """Per sample n (its maps stay in cache): instance statistics, the per-pixel L2 norm of the
    normalized channel vector, then y. x, y: (N, C, P); mean, invstd: (N, C); norm: (N, P)."""
    n_batch, channels, positions = x.shape
    for n in prange(n_batch):
        r2 = np.zeros(positions, dtype=x.dtype)
        for c in range(channels):
            xr = x[n, c]
            total = 0.0
            for p in range(positions):
                total += xr[p]
            m = total / positions
            sq = 0.0
            for p in range(positions):
                sq += (xr[p] - m) * (xr[p] - m)
            inv = 1.0 / np.sqrt(sq / positions + eps)
            mean[n, c], invstd[n, c] = m, inv
            for p in range(positions):
                h = (xr[p] - m) * inv
                r2[p] += h * h
        rinv = np.empty(positions, dtype=x.dtype)
        for p in range(positions):
            norm[n, p] = np.sqrt(r2[p])
            rinv[p] = 1.0 / max(norm[n, p], _L2_EPS)
        for c in range(channels):
            xr, yr = x[n, c], y[n, c]
            m, k, b = mean[n, c], invstd[n, c] * weight[c], bias[c]
            for p in range(positions):
                yr[p] = (xr[p] - m) * k * rinv[p] + b


def _backward_loop(dy, x, weight, mean, invstd, norm, dx, dweight, dbias):
    """Per sample n: dweight, dbias (per sample, (N, C)), the per-pixel projection
    sum_c w dy u, d xhat = (w dy - u sum_c w dy u) / r, then back through the instance normalization."""
    n_batch, channels, positions = x.shape
    for n in prange(n_batch):
        rinv = np.empty(positions, dtype=x.dtype)
        along = np.zeros(positions, dtype=x.dtype)
        for p in range(positions):
            rinv[p] = 1.0 / max(norm[n, p], _L2_EPS)
        for c in range(channels):
            xr, gr = x[n, c], dy[n, c]
            m, inv, w = mean[n, c], invstd[n, c], weight[c]
            sw, sb = 0.0, 0.0
            for p in range(positions):
                u = (xr[p] - m) * inv * rinv[p]
                sw += gr[p] * u
                sb += gr[p]
                along[p] += w * gr[p] * u
            dweight[n, c], dbias[n, c] = sw, sb
        for p in range(positions):
            if norm[n, p] < _L2_EPS:  # clamped norm: a constant divisor, no projection
                along[p] = 0.0
        for c in range(channels):
            xr, gr, dr = x[n, c], dy[n, c], dx[n, c]
            m, inv, w = mean[n, c], invstd[n, c], weight[c]
            s1, s2 = 0.0, 0.0
            for p in range(positions):
                xh = (xr[p] - m) * inv
                g = rinv[p] * (w * gr[p] - xh * rinv[p] * along[p])
                dr[p] = g
                s1 += g
                s2 += g * xh
            s1, s2 = s1 / positions, s2 / positions
            for p in range(positions):
                dr[p] = inv * (dr[p] - s1 - (xr[p] - m) * inv * s2)


_forward_kernel, _backward_kernel = cpu_kernel(_forward_loop), cpu_kernel(_backward_loop)


class _FusedDomainNorm(torch.autograd.Function):
    """DomainNorm on contiguous float CPU tensors :math:`(N, C, P)` with the fused kernels above:
    one read of the input per sample in the forward and two in the backward (the input is saved, the
    intermediate maps are recomputed), against about ten passes for the PyTorch composition."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        n, c, positions = x.shape
        y, norm = torch.empty_like(x), x.new_empty(n, positions)
        mean, invstd = x.new_empty(n, c), x.new_empty(n, c)
        _forward_kernel(x, weight, bias, eps, y, mean, invstd, norm)
        ctx.save_for_backward(x, weight, mean, invstd, norm)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, weight, mean, invstd, norm = ctx.saved_tensors
        dx, dweight, dbias = torch.empty_like(x), torch.empty_like(mean), torch.empty_like(mean)
        _backward_kernel(dy.contiguous(), x, weight, mean, invstd, norm, dx, dweight, dbias)
        return dx, dweight.sum(0), dbias.sum(0), None


class DomainNorm(nn.Module):
    r"""Domain normalization over 4D inputs (Zhang et al., ECCV 2020, DSMNet).

    .. math::
        \hat x_{nc\cdot} = \frac{x_{nc\cdot} - \mu_{nc}}{\sqrt{\sigma^2_{nc} + \epsilon}},\qquad
        u_{n\cdot hw} = \frac{\hat x_{n\cdot hw}}{\max(\lVert \hat x_{n\cdot hw} \rVert_2, 10^{-12})},\qquad
        y_{nchw} = w_c\, u_{nchw} + b_c

    :math:`\mu_{nc}, \sigma^2_{nc}`: mean and biased variance of sample :math:`n`, channel
    :math:`c` over the positions (InstanceNorm); the L2 norm runs over the channels at each pixel
    (a pixel whose normalized vector is zero stays zero). Without ``l2`` it is an affine
    InstanceNorm. No running statistics: training and evaluation are identical, each sample is
    normalized on its own. Since the L2 step divides by about :math:`\sqrt{C}`, the affine
    starts at :math:`w = 1, b = 0` (as in DSMNet) rather than at a replaced BatchNorm's values.

    On float32/float64 CPU tensors forward and backward are fused kernels (one pass per sample,
    :mod:`tllab.nn.fused`); elsewhere (CUDA, bfloat16 under autocast) it is the PyTorch
    expression ``F.normalize(F.instance_norm(x), dim=1) * w + b``, with the same numbers.

    Needs more than one spatial position (InstanceNorm raises ``ValueError`` on 1x1 inputs, in
    evaluation too); use larger images (``dataset.image_size=64``) for a ResNet's last stage.

    Args:
        num_features: :math:`C`.
        l2: apply the per-pixel L2 normalization across channels. Default: True (DSMNet).
        eps: added to the instance variance inside the square root. Default: 1e-5.

    Shape:
        - Input: :math:`(N, C, H, W)` with :math:`H W > 1`; Output: same shape.

    Example:
        >>> layer = DomainNorm(16)
        >>> layer(torch.randn(2, 16, 5, 5)).shape
        torch.Size([2, 16, 5, 5])
    """

    def __init__(self, num_features: int, l2: bool = True, eps: float = 1e-5, device=None, dtype=None) -> None:
        super().__init__()
        self.num_features, self.l2, self.eps = num_features, l2, eps
        self.weight = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
        self.bias = nn.Parameter(torch.zeros(num_features, device=device, dtype=dtype))

    @classmethod
    def from_batchnorm(cls, bn: _BatchNorm, l2: bool = True) -> DomainNorm:
        """A DomainNorm layer in place of ``bn``: same width, ``eps``, device, dtype and mode."""
        ref = bn.weight if bn.weight is not None else bn.running_mean
        factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
        return cls(bn.num_features, l2, bn.eps, **factory).train(bn.training)

    def extra_repr(self) -> str:
        return f"{self.num_features}, l2={self.l2}, eps={self.eps}"

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() != 4 or x.shape[2] * x.shape[3] == 1:
            raise ValueError(f"DomainNorm expects (N, C, H, W) inputs with more than one position, got shape "
                             f"{tuple(x.shape)}; use larger images (e.g. dataset.image_size=64)")
        if not self.l2:
            return F.instance_norm(x, weight=self.weight, bias=self.bias, eps=self.eps)
        if fusable(x, self.weight, self.bias):
            flat = x.contiguous().view(x.shape[0], x.shape[1], -1)
            return _FusedDomainNorm.apply(flat, self.weight, self.bias, self.eps).view(x.shape)
        u = F.normalize(F.instance_norm(x, eps=self.eps), p=2, dim=1, eps=_L2_EPS)
        return torch.addcmul(self.bias.view(1, -1, 1, 1), u, self.weight.view(1, -1, 1, 1)).to(x.dtype)


class DomainNormStrategy(Plugin):
    """DomainNorm for the backbone: every BatchNorm2d becomes a :class:`DomainNorm`.

    Args:
        l2: per-pixel L2 normalization across channels. Default: True (DSMNet's ``DomainNorm``;
            ``False`` gives an affine InstanceNorm, as DSMNet's ``getweights`` block uses).

    Example:
        >>> from tllab.models import Classifier, create_backbone
        >>> model = DomainNormStrategy().transform_model(Classifier(create_backbone("tllab", "digits_cnn"), 10))
        >>> sum(isinstance(m, DomainNorm) for m in model.modules())
        3
    """

    exclusive = "batchnorm"

    def __init__(self, l2: bool = True) -> None:
        super().__init__()
        self.l2 = l2

    def transform_model(self, model: nn.Module) -> nn.Module:
        def build(bn: _BatchNorm) -> DomainNorm:
            return DomainNorm.from_batchnorm(bn, self.l2)

        if not replace_batchnorm(model.backbone, build, (nn.BatchNorm2d,)):
            raise ConfigError(f"norm.domainnorm: the backbone {type(model.backbone).__name__} has no BatchNorm2d "
                              "to replace; use a backbone with BatchNorm (digits_cnn, ResNets).")
        return model
