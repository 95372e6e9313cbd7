r"""Encoding layer: a learnable residual encoder (Zhang et al., "Deep TEN: Texture Encoding Network",
CVPR 2017; the context-encoding module of EncNet, CVPR 2018).

Same semantics and initialisation as PyTorch-Encoding's ``encoding.nn.Encoding``, in pure PyTorch:
its ``scaled_l2``/``aggregate`` kernels are replaced by batched matrix products, so no
:math:`B \times N \times K \times D` residual tensor is ever built and any device works; the scale
gradient is :math:`\sum_{b,i} \partial L/\partial z_{bik} \cdot \|x_{bi} - d_k\|^2` (the reference computes it
by dividing by the scale: NaN or inf where a scale is 0).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.function import once_differentiable

from tllab.nn.functional import upcast_half

__all__ = ["Encoding", "encoding"]


class _EncodingFunction(torch.autograd.Function):
    r"""Residual encoding of ``f`` :math:`(B, D, N)` with a hand-written backward.

    Every large step is a batched matrix product: forward :math:`C X` and :math:`A X^\top`,
    backward :math:`G X`, :math:`[G; C]^\top [A; -2T]` (``dx``, one product for both terms) and
    :math:`T X^\top` (``dcodewords``), with :math:`T = \partial L / \partial \mathrm{dist}`.
    Autograd on the same expressions gives the same values but makes more passes over the
    :math:`(B, D, N)` input (1.6x the time on CPU, ``benchmarks/encoding.md``). Not twice differentiable.
    """

    @staticmethod
    def forward(ctx: Any, f: Tensor, codewords: Tensor, scale: Tensor) -> Tensor:
        words = codewords.expand(f.shape[0], -1, -1)  # (B, K, D) view for bmm
        dist = torch.bmm(words, f).mul_(-2).add_(f.square().sum(1, keepdim=True))
        dist.add_(codewords.square().sum(1)[:, None])  # (B, K, N): |x_i|^2 - 2 x_i.d_k + |d_k|^2
        assign = torch.softmax(dist * scale[:, None], dim=1)  # sums to 1 over K
        mass = assign.sum(2, keepdim=True)  # (B, K, 1)
        ctx.save_for_backward(f, codewords, scale, dist, assign, mass)
        return torch.bmm(assign, f.transpose(1, 2)).sub_(mass * codewords)

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        f, codewords, scale, dist, assign, mass = ctx.saved_tensors
        grad_assign = torch.bmm(grad, f).sub_((grad * codewords).sum(2, keepdim=True))
        grad_logits = assign * (grad_assign - (assign * grad_assign).sum(1, keepdim=True))  # softmax backward
        grad_dist = grad_logits * scale[:, None]
        grad_f = grad_words = grad_scale = None
        if ctx.needs_input_grad[0]:
            lhs = torch.cat([grad, codewords.expand(f.shape[0], -1, -1)], 1).transpose(1, 2)
            grad_f = torch.bmm(lhs, torch.cat([assign, -2 * grad_dist], 1))
            grad_f.addcmul_(f, grad_dist.sum(1, keepdim=True), value=2)
        if ctx.needs_input_grad[1]:
            grad_words = torch.bmm(grad_dist, f.transpose(1, 2)).sum(0).mul_(-2)
            grad_words += 2 * grad_dist.sum((0, 2))[:, None] * codewords - (mass * grad).sum(0)
        if ctx.needs_input_grad[2]:
            grad_scale = (grad_logits * dist).sum((0, 2))
        return grad_f, grad_words, grad_scale


def encoding(x: Tensor, codewords: Tensor, scale: Tensor) -> Tensor:
    r"""Aggregated residuals of ``x`` to ``codewords``; see :class:`Encoding`.

    Memory is :math:`O(BNK + BKD)`: the squared distances come from
    :math:`\|x_i\|^2 - 2 x_i^\top d_k + \|d_k\|^2` and the residual sums from
    :math:`E = A^\top X - (\sum_i a_{ik}) d_k`, batched matrix products. Half-precision inputs
    are computed in float32 with autocast off (squared norms overflow float16, and the softmax
    over them needs more than bfloat16's 8-bit mantissa); the result is cast back to ``x.dtype``.

    Args:
        x: :math:`(B, D, N)` or :math:`(B, D, H, W)`.
        codewords: :math:`(K, D)`.
        scale: :math:`(K,)`.

    Returns:
        :math:`(B, K, D)` in ``x.dtype``.
    """
    d = codewords.shape[1]
    if x.dim() not in (3, 4) or x.shape[1] != d:
        raise ValueError(f"Encoding expects a (B, {d}, N) or (B, {d}, H, W) input, got {tuple(x.shape)}")
    with torch.autocast(x.device.type, enabled=False):
        feats = upcast_half(x.flatten(2))
        out = _EncodingFunction.apply(feats, codewords.to(feats.dtype), scale.to(feats.dtype))
    return out.to(x.dtype)


class Encoding(nn.Module):
    r"""Encodes a set of :math:`N` features of dimension :math:`D` as the soft-assignment-weighted
    residuals to :math:`K` learned codewords (Deep TEN). The output size does not depend on
    :math:`N`, so images of any size give a fixed-length, orderless descriptor.

    .. math::
        e_k = \sum_{i=1}^{N} a_{ik} (x_i - d_k),\qquad
        a_{ik} = \frac{\exp(s_k \|x_i - d_k\|^2)}{\sum_{j=1}^{K} \exp(s_j \|x_i - d_j\|^2)}

    The smoothing factors :math:`s_k` start negative, so nearer codewords get larger weights; as in
    the reference, nothing keeps them negative during training. There is no normalisation inside:
    Deep TEN follows the layer with an L2 normalisation, EncNet with ``BatchNorm1d(K)``.

    Computed without the :math:`(B, N, K, D)` residual tensor (see :func:`encoding`): memory
    :math:`O(BNK + BKD)`, with a hand-written backward (no double backward). Float16/bfloat16
    inputs (autocast) are computed in float32 and the result returned in the input dtype;
    :math:`e_k` sums :math:`N` residuals, so a float16 result overflows only if
    :math:`N \max_i \|x_i - d_k\|_\infty` exceeds 65504.

    Args:
        D: feature dimension (input channels).
        K: number of codewords.

    Shape:
        - Input: :math:`(B, D, N)` or :math:`(B, D, H, W)` with :math:`N = HW` (PyTorch-Encoding's
          channels-first layout for both).
        - Output: :math:`(B, K, D)`.

    Attributes:
        codewords: :math:`(K, D)`, initialised from :math:`\mathcal{U}(-1/\sqrt{KD}, 1/\sqrt{KD})`.
        scale: :math:`(K,)` smoothing factors :math:`s_k`, initialised from :math:`\mathcal{U}(-1, 0)`.

    Example:
        >>> layer = Encoding(D=128, K=32)
        >>> layer(torch.randn(2, 128, 7, 7)).shape
        torch.Size([2, 32, 128])
    """

    def __init__(self, D: int, K: int, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.D, self.K = D, K
        self.codewords = nn.Parameter(torch.empty(K, D, device=device, dtype=dtype))
        self.scale = nn.Parameter(torch.empty(K, device=device, dtype=dtype))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.K * self.D)
        nn.init.uniform_(self.codewords, -bound, bound)
        nn.init.uniform_(self.scale, -1.0, 0.0)

    def forward(self, x: Tensor) -> Tensor:
        return encoding(x, self.codewords, self.scale)

    def extra_repr(self) -> str:
        return f"D={self.D}, K={self.K}"
