r"""Style statistics layers of MSG-Net (Zhang and Dana, "Multi-style Generative Network for Real-time
Transfer", arXiv 1703.06953): the Gram matrix of a feature map and the Inspiration (CoMatch) layer
that matches a feature map's second-order statistics to a target Gram matrix.

Semantics follow PyTorch-Encoding (``encoding/nn/customize.py``, ``encoding/nn/encoding.py``) and
``PyTorch-Style-Transfer`` ``experiments/net.py``, except that Inspiration's target is a registered
buffer (saved, loaded and moved with the module; the reference keeps it in a plain attribute) and
using the layer before a target is set raises instead of reading uninitialised memory.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from tllab.nn.functional import upcast_half

__all__ = ["GramMatrix", "Inspiration"]


class GramMatrix(nn.Module):
    r"""Per-sample Gram matrix of a feature map, the style representation of neural style transfer.

    .. math::
        G = \frac{1}{CHW} \sum_{h=1}^{H} \sum_{w=1}^{W} F_{h,w} F_{h,w}^\top

    The :math:`1/(CHW)` normalisation is the default because the reference code applies it (its
    docstring formula omits it) and MSG-Net's style-loss weights and Inspiration targets assume
    it; it also keeps :math:`G` independent of the map size. Float16/bfloat16 inputs are computed
    in float32 with autocast off and returned in the input dtype (unnormalised float16 sums over
    large maps can exceed 65504; normalised ones do not for features of moderate size).

    Args:
        normalize: divide by :math:`C \cdot H \cdot W` (by :math:`C \cdot N` for :math:`(B, C, N)` input).

    Shape:
        - Input: :math:`(B, C, *)`, e.g. :math:`(B, C, H, W)`.
        - Output: :math:`(B, C, C)`.

    Example:
        >>> GramMatrix()(torch.randn(2, 64, 16, 16)).shape
        torch.Size([2, 64, 64])
    """

    def __init__(self, normalize: bool = True) -> None:
        super().__init__()
        self.normalize = normalize

    def forward(self, y: Tensor) -> Tensor:
        with torch.autocast(y.device.type, enabled=False):
            feats = upcast_half(y.flatten(2))  # (B, C, N)
            gram = feats @ feats.transpose(1, 2)
            if self.normalize:
                gram = gram / (feats.shape[1] * feats.shape[2])
        return gram.to(y.dtype)

    def extra_repr(self) -> str:
        return f"normalize={self.normalize}"


class Inspiration(nn.Module):
    r"""Inspiration (CoMatch) layer of MSG-Net: a learned linear map of a feature map's channels,
    driven by a target Gram matrix :math:`G` (typically ``GramMatrix()`` of the style image's
    features), so that the output tends to the target's second-order statistics.

    With :math:`\phi` reshaping :math:`(C, H, W)` to :math:`(HW, C)`:

    .. math::
        Y = \phi^{-1}\left[\phi(F)\, W G\right], \qquad\text{i.e.}\quad
        Y_b = (W G_b)^\top F_b \text{ on the } (C, HW) \text{ view}

    which is the reference's product order, ``bmm((W G)ᵀ, F)``; :math:`G_b` is :math:`G`'s only matrix
    when ``B == 1``, else the :math:`b`-th.

    The target is set with :meth:`set_target` and not detached: as in MSG-Net training, where
    :math:`G` is recomputed from the style image every batch, gradients reach the network that
    computed it (pass ``G.detach()`` for a fixed style). It is a buffer, so ``state_dict()``
    (detached), ``load_state_dict`` (also into a fresh module) and ``.to()`` carry it.

    Args:
        C: number of channels.
        B: number of target matrices: 1 (one style for the whole batch) or the input batch size
            (one style per sample).

    Shape:
        - Input: :math:`(N, C, *)`, e.g. :math:`(N, C, H, W)`; :math:`N = B` unless :math:`B = 1`.
        - Output: same shape as the input.

    Attributes:
        weight: :math:`(1, C, C)`, initialised from :math:`\mathcal{U}(0, 0.02)` as in the reference.
        target: :math:`(B, C, C)` buffer, ``None`` until :meth:`set_target` (or loading) sets it.

    Example:
        >>> layer = Inspiration(64)
        >>> layer.set_target(GramMatrix()(torch.randn(1, 64, 32, 32)))
        >>> layer(torch.randn(4, 64, 16, 16)).shape
        torch.Size([4, 64, 16, 16])
    """

    target: Tensor | None

    def __init__(self, C: int, B: int = 1, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.C, self.B = C, B
        self.weight = nn.Parameter(torch.empty(1, C, C, device=device, dtype=dtype))
        self.register_buffer("target", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.weight, 0.0, 0.02)

    def set_target(self, G: Tensor) -> None:
        """Use the Gram matrix ``G`` of shape :math:`(B, C, C)` as the target from now on."""
        if tuple(G.shape) != (self.B, self.C, self.C):
            raise ValueError(f"Inspiration target must have shape {(self.B, self.C, self.C)}, got {tuple(G.shape)}")
        self.target = G

    def forward(self, x: Tensor) -> Tensor:
        if self.target is None:
            raise RuntimeError("Inspiration has no target: call set_target(G) first")
        if x.dim() < 3 or x.shape[1] != self.C or self.B not in (1, x.shape[0]):
            batch = "N" if self.B == 1 else self.B
            raise ValueError(f"Inspiration(C={self.C}, B={self.B}) expects a ({batch}, {self.C}, ...) input, "
                             f"got {tuple(x.shape)}")
        mix = (self.weight @ self.target).transpose(1, 2)  # (WG)^T, (B, C, C)
        return (mix @ x.flatten(2)).view_as(x)

    def _load_from_state_dict(self, state_dict: dict[str, Any], prefix: str, *args: Any) -> None:
        saved = state_dict.get(prefix + "target")
        if saved is not None:  # a module without a target (fresh) needs one to load into
            self.set_target(torch.empty_like(saved, device=self.weight.device, dtype=self.weight.dtype))
        super()._load_from_state_dict(state_dict, prefix, *args)

    def extra_repr(self) -> str:
        return f"C={self.C}, B={self.B}"
