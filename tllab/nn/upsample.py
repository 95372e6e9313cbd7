r"""Sub-pixel up-sampling convolution, PyTorch-Encoding's ``encoding.nn.UpsampleConv2d``.

Same parameters, initialisation and forward as the reference (``encoding/nn/encoding.py``), which
cannot be constructed at its last commit (``math`` is used but never imported) and whose
docstring describes a transposed convolution instead of what the code computes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.utils import _pair

__all__ = ["UpsampleConv2d"]


class UpsampleConv2d(nn.Module):
    r"""A convolution to :math:`s^2 \cdot` ``out_channels`` channels followed by a pixel shuffle by
    :math:`s` = ``scale_factor`` (sub-pixel convolution, Shi et al., CVPR 2016): a learned
    up-sampling without the checkerboard overlaps of a transposed convolution.

    .. math::
        \text{out} = \text{PixelShuffle}_s\big(\text{conv2d}(\text{input}, W, b,
        \text{stride}, \text{padding}, \text{dilation}, \text{groups})\big),\quad
        W \in \mathbb{R}^{s^2 C_{out} \times C_{in}/\text{groups} \times k_H \times k_W}

    Output channel :math:`c` at sub-pixel :math:`(i, j)` is convolution channel
    :math:`c s^2 + i s + j` (``F.pixel_shuffle``). With ``scale_factor=1`` this is ``nn.Conv2d``.

    The reference documentation gives ``ConvTranspose2d``'s output-size formula and an
    ``output_size=`` argument; neither matches its code, which this layer follows. There is no
    ``output_size``: crop the output (``y[..., :h, :w]``) when a smaller size is wanted.

    Args:
        in_channels: input channels.
        out_channels: output channels (after the shuffle).
        kernel_size: convolution kernel size.
        stride: convolution stride (before up-sampling).
        padding: zero padding on both sides of the input.
        dilation: spacing between kernel elements.
        groups: blocked connections from input to convolution channels; must divide
            ``in_channels`` and :math:`s^2 \cdot` ``out_channels``.
        scale_factor: up-sampling factor :math:`s` (integer).
        bias: add a learnable bias to the :math:`s^2 \cdot` ``out_channels`` convolution channels.

    Shape:
        - Input: :math:`(N, C_{in}, H_{in}, W_{in})`.
        - Output: :math:`(N, C_{out}, s H', s W')` with
          :math:`H' = \lfloor (H_{in} + 2p_H - d_H (k_H - 1) - 1) / \text{stride}_H \rfloor + 1`, and
          :math:`W'` likewise.

    Attributes:
        weight: :math:`(s^2 C_{out}, C_{in}/\text{groups}, k_H, k_W)`.
        bias: :math:`(s^2 C_{out})` or ``None``. Both initialised from :math:`\mathcal{U}(-u, u)`,
            :math:`u = 1/\sqrt{C_{in} k_H k_W}` as in the reference (``nn.Conv2d`` divides
            :math:`C_{in}` by ``groups``).

    Example:
        >>> layer = UpsampleConv2d(16, 8, kernel_size=3, padding=1, scale_factor=2)
        >>> layer(torch.randn(1, 16, 10, 12)).shape
        torch.Size([1, 8, 20, 24])
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int],
                 stride: int | tuple[int, int] = 1, padding: int | tuple[int, int] = 0,
                 dilation: int | tuple[int, int] = 1, groups: int = 1, scale_factor: int = 1, bias: bool = True,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        conv_channels = out_channels * scale_factor ** 2
        if scale_factor < 1 or in_channels % groups or conv_channels % groups:
            raise ValueError(f"UpsampleConv2d needs scale_factor >= 1 and groups={groups} dividing in_channels="
                             f"{in_channels} and out_channels * scale_factor**2 = {conv_channels}")
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride = _pair(kernel_size), _pair(stride)
        self.padding, self.dilation = _pair(padding), _pair(dilation)
        self.groups, self.scale_factor = groups, scale_factor
        factory = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(conv_channels, in_channels // groups, *self.kernel_size, **factory))
        if bias:
            self.bias = nn.Parameter(torch.empty(conv_channels, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1 / math.sqrt(self.in_channels * math.prod(self.kernel_size))
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: Tensor) -> Tensor:
        out = F.conv2d(x, self.weight, self.bias, self.stride, self.padding, self.dilation, self.groups)
        return F.pixel_shuffle(out, self.scale_factor)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"scale_factor={self.scale_factor}, bias={self.bias is not None}")
