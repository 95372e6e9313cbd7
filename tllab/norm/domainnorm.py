"""DomainNorm (Zhang et al., "Domain-invariant Stereo Matching Networks", ECCV 2020;
``feihuzhang/DSMNet`` ``models/DSMNet.py``): instance normalization, then L2 normalization of
each pixel's channel vector, then a learnable per-channel affine, in place of every BatchNorm2d
of the backbone. It keeps no running statistics and behaves the same in training and evaluation.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from tllab.errors import ConfigError
from tllab.norm.placement import replace_batchnorm
from tllab.plugin import Plugin

__all__ = ["DomainNorm", "DomainNormStrategy"]

_L2_EPS = 1e-12  # F.normalize's clamp of the norm


class _DomainNormFunction(torch.autograd.Function):
    r"""DomainNorm with L2 on ``x`` seen as :math:`(N, C, H W)`: :math:`y = w\,\hat x / r + b`, with
    :math:`\hat x` the instance-normalized input and :math:`r = \max(\lVert \hat x \rVert_C, 10^{-12})` per pixel.

    Forward: instance statistics and :math:`\hat x` with PyTorch's fused BatchNorm kernels on
    :math:`(1, N C, H W)`, :math:`r^2` as a dot product over channels, then two elementwise passes.
    Backward, with :math:`u = \hat x / r`: the fused evaluation-mode BatchNorm backward gives
    :math:`w\,dy`, :math:`\sum dy\,u` and :math:`\sum dy` per channel;
    :math:`d\hat x = (w\,dy - u \sum_C w\,dy\,u) / r` (no projection where the norm was clamped),
    and the fused training-mode backward takes it through the instance normalization.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Tensor, eps: float) -> Tensor:
        xv = x.reshape(1, -1, x.shape[2])  # one "channel" per sample and channel
        mean, var = torch.batch_norm_update_stats(xv, None, None, 0.0)
        u = torch.batch_norm(xv, None, None, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled).view(x.shape)
        norm = torch.linalg.vecdot(u, u, dim=1).sqrt_().unsqueeze(1)
        clamped = norm < _L2_EPS
        inv_norm = norm.clamp_min_(_L2_EPS).reciprocal_()
        u.mul_(inv_norm)
        ctx.save_for_backward(xv, mean, var, u, inv_norm, clamped, weight)
        ctx.eps = eps
        return torch.addcmul(bias.view(1, -1, 1), u, weight.view(1, -1, 1)).to(u.dtype)  # x's dtype, as BatchNorm

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        xv, mean, var, u, inv_norm, clamped, weight = ctx.saved_tensors
        # w dy, sum(dy * u) and sum(dy) per channel (BatchNorm backward with mean 0, variance 1, eps 0)
        w_dy, dweight, dbias = torch.ops.aten.native_batch_norm_backward(
            dy.contiguous(), u, weight, torch.zeros_like(weight), torch.ones_like(weight), None, None, False, 0.0,
            [True, True, True])
        along_u = torch.linalg.vecdot(w_dy, u, dim=1).unsqueeze(1).masked_fill_(clamped, 0.0)
        d_xhat = w_dy.addcmul_(u, along_u, value=-1.0).mul_(inv_norm)
        dx = torch.ops.aten.native_batch_norm_backward(
            d_xhat.view(xv.shape), xv, None, None, None, mean, torch.rsqrt(var + ctx.eps), True, ctx.eps,
            [True, False, False])[0]
        return dx.view(u.shape), dweight, dbias, None


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
        y = _DomainNormFunction.apply(x.reshape(x.shape[0], x.shape[1], -1), self.weight, self.bias, self.eps)
        return y.view(x.shape)


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
