"""StochNorm (Kou et al., "Stochastic Normalization", NeurIPS 2020): BatchNorm that, per channel
and training step, normalizes with the batch statistics with probability ``p`` and with the
running statistics otherwise, a regularizer for fine-tuning from pretrained statistics.

Faithful to ``thuml/StochNorm`` and TLlib ``tllib/normalization/stochnorm.py`` except for their
bugs: the mask is drawn on any device (no ``.cuda()``) from a ``torch.Generator`` shared by all
layers of a model (identical on every data-parallel rank, saved with checkpoints);
:func:`convert_model` really gives every layer its ``p`` (TLlib passes it as
``track_running_stats`` and every layer keeps 0.5); and the running-statistics branch's gradient
uses the statistics its output used (TLlib's backward sees them after the step's in-place update).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from tllab.errors import ConfigError
from tllab.nn.batchnorm import batch_stats, check_count, copy_batchnorm, synced, update_running_stats
from tllab.nn.fused import channel_affine2
from tllab.norm.placement import replace_batchnorm
from tllab.plugin import Plugin, SetupContext

__all__ = ["StochNorm1d", "StochNorm2d", "StochNorm3d", "StochNormStrategy", "convert_model"]


def _channels_last(x: Tensor) -> torch.memory_format:
    """``x``'s memory format (the fused BatchNorm backward wants ``dy`` laid out like ``x``)."""
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


class _MixedStatsNorm(torch.autograd.Function):
    r""":math:`y = (x - \mu_c) / \sqrt{\sigma^2_c + \epsilon}\,\gamma_c + \beta_c` where channels with
    ``use_batch`` take the batch's :math:`(\mu, \sigma^2)` (gradients flow through them, as in
    BatchNorm training) and the others fixed running statistics (an affine map of ``x``).

    Both branches are per-channel affine maps of ``x``, so the forward is one fused
    evaluation-mode BatchNorm pass with the selected statistics (never two full branches mixed).
    So is the backward given two per-channel sums (:math:`\sum dy`, :math:`\sum dy\,\hat x`):
    PyTorch's fused BatchNorm backward reduces them, then :func:`tllab.nn.fused.channel_affine2`
    writes :math:`dx` in one pass, as many passes as BatchNorm's backward. With ``sync`` the batch
    statistics span all ranks of ``group`` (``count`` values) and the sums are all-reduced first.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, var: Tensor,
                use_batch: Tensor, eps: float, count: int, sync: bool, group: dist.ProcessGroup | None) -> Tensor:
        invstd = torch.rsqrt(var + eps)
        ctx.save_for_backward(x, weight, mean, invstd, use_batch)
        ctx.eps, ctx.count, ctx.sync, ctx.group = eps, count, sync, group
        return torch.batch_norm(x, weight, bias, mean, var, False, 0.0, eps, torch.backends.cudnn.enabled)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        x, weight, mean, invstd, use_batch = ctx.saved_tensors
        c = x.shape[1]
        if x.numel():  # sum(dy) and sum(dy * xhat) per channel: the fused BatchNorm backward's reductions only
            _, dw, db = torch.ops.aten.native_batch_norm_backward(
                dy.contiguous(memory_format=_channels_last(x)), x, None, None, None, mean, invstd, True, ctx.eps,
                [False, True, True])
        else:  # a rank without samples under sync
            dw = db = invstd.new_zeros(c)
        sums = torch.cat([db, dw])
        if ctx.sync:
            sums = sums.double()
            dist.all_reduce(sums, group=ctx.group)
        u, v = sums[:c] / ctx.count, sums[c:] / ctx.count
        # dx = w invstd (dy - g u - g xhat v), g = 1 on batch-statistics channels: one pass over (dy, x).
        scale = (weight if weight is not None else 1.0) * invstd
        gated = use_batch.to(invstd.dtype) * scale
        slope = (-gated * invstd * v).to(invstd.dtype)
        shift = (-gated * (u - mean * invstd * v)).to(invstd.dtype)
        dx = channel_affine2(dy, x, scale, slope, shift).to(x.dtype) if x.numel() else torch.zeros_like(x)
        if weight is None:
            dw = db = None
        return dx, dw, db, None, None, None, None, None, None, None


class _StochNorm(_BatchNorm):
    r"""Shared implementation of :class:`StochNorm1d`, :class:`StochNorm2d`, :class:`StochNorm3d`."""

    # tllab.nn.convert_sync_batchnorm keeps this class and sets ``sync`` / ``process_group``.
    supports_sync = True

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 p: float = 0.5, generator: torch.Generator | None = None, device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats=True, device=device, dtype=dtype)
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be a probability in [0, 1], got {p}")
        self.p = p
        self.generator = generator
        self.sync, self.process_group = False, None

    @classmethod
    def from_batchnorm(cls, bn: _BatchNorm, p: float = 0.5, generator: torch.Generator | None = None) -> _StochNorm:
        """A StochNorm layer with a copy of ``bn``'s affine parameters, running statistics and mode."""
        if not bn.track_running_stats:
            raise ValueError(f"StochNorm needs running statistics; {bn} has track_running_stats=False")
        return copy_batchnorm(bn, cls(bn.num_features, bn.eps, bn.momentum, bn.affine, p, generator,
                                      device=bn.running_mean.device, dtype=bn.running_mean.dtype))

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, p={self.p}"

    def _sample_mask(self, device: torch.device) -> Tensor:
        """Which channels use the batch statistics this step: Bernoulli(p) per channel, drawn on the
        CPU from the layer's generator so that every device and rank draws the same mask."""
        return (torch.rand(self.num_features, generator=self.generator) < self.p).to(device, non_blocking=True)

    def _batch_moments(self, x: Tensor, sync: bool) -> tuple[Tensor, Tensor, int]:
        """Per-channel batch mean, biased variance and value count (of all ranks with ``sync``)."""
        with torch.no_grad():
            if sync:
                return batch_stats(x, self.process_group)
            count = x.numel() // x.shape[1]
            check_count(count)
            mean, var = torch.batch_norm_update_stats(x, None, None, 0.0)
            return mean, var, count

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        if not self.training:
            return super().forward(x)
        use_batch, sync = self._sample_mask(x.device), synced(self)
        batch_mean, batch_var, count = self._batch_moments(x, sync)
        mean = torch.where(use_batch, batch_mean, self.running_mean)  # running stats from before this step
        var = torch.where(use_batch, batch_var, self.running_var)
        update_running_stats(self, batch_mean, batch_var, count)
        return _MixedStatsNorm.apply(x, self.weight, self.bias, mean, var, use_batch, self.eps, count, sync,
                                     self.process_group)


_DOC = r"""StochNorm over {input} (Kou et al., "Stochastic Normalization", NeurIPS 2020).

    In training, each channel :math:`c` draws :math:`s_c \sim \mathrm{{Bernoulli}}(p)` (shared over
    the batch and positions) and

    .. math::
        y = \frac{{x - \mu_c}}{{\sqrt{{\sigma_c^2 + \epsilon}}}}\,\gamma_c + \beta_c,\qquad
        (\mu_c, \sigma_c^2) = \begin{{cases}} \text{{batch mean, biased variance}} & s_c = 1 \\
        \text{{running mean, variance (before this step's update)}} & s_c = 0 \end{{cases}}

    i.e. BatchNorm's training output on the channels with :math:`s_c = 1` (gradients through the
    batch statistics) and its evaluation output on the others. The running statistics are updated
    from the batch every step, whatever :math:`s`, exactly as BatchNorm does (unbiased variance,
    ``momentum``). Evaluation is BatchNorm's. Like BatchNorm, training raises ``ValueError`` when a
    channel has a single value (batch 1 is fine with more than one position).

    The masks come from ``generator`` (a CPU ``torch.Generator``; ``None``: torch's global one).
    :class:`StochNormStrategy` gives all layers of a model one seeded generator, so every
    data-parallel rank draws the same masks without communication. Under ``trainer.sync_bn`` the
    batch statistics span all ranks (:func:`tllab.nn.batch_stats`).

    Args:
        num_features: :math:`C`.
        eps: added to the variance inside the square root. Default: 1e-5.
        momentum: running-statistics factor; ``None`` for a cumulative average. Default: 0.1.
        affine: learnable :math:`\gamma, \beta` (initialized to 1, 0). Default: True.
        p: probability that a channel uses the batch statistics. Default: 0.5 (paper, thuml/StochNorm
            ``train.py``, TLlib).
        generator: source of the masks. Default: None.

    Shape:
        - Input: {shape}; Output: same shape.

    Example:
        >>> layer = {name}(16, p=0.5, generator=torch.Generator().manual_seed(0))
        >>> layer(torch.randn({example})).shape
        torch.Size([{size}])
    """


class StochNorm1d(_StochNorm):
    __doc__ = _DOC.format(input="2D or 3D inputs", shape=r":math:`(N, C)` or :math:`(N, C, L)`",
                          name="StochNorm1d", example="8, 16, 10", size="8, 16, 10")

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in (2, 3):
            raise ValueError(f"expected 2D or 3D input (got {x.dim()}D input)")


class StochNorm2d(_StochNorm):
    __doc__ = _DOC.format(input="4D inputs", shape=r":math:`(N, C, H, W)`",
                          name="StochNorm2d", example="8, 16, 5, 5", size="8, 16, 5, 5")

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")


class StochNorm3d(_StochNorm):
    __doc__ = _DOC.format(input="5D inputs", shape=r":math:`(N, C, D, H, W)`",
                          name="StochNorm3d", example="8, 16, 3, 5, 5", size="8, 16, 3, 5, 5")

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() != 5:
            raise ValueError(f"expected 5D input (got {x.dim()}D input)")


_STOCH = {nn.BatchNorm1d: StochNorm1d, nn.BatchNorm2d: StochNorm2d, nn.BatchNorm3d: StochNorm3d}


def convert_model(module: nn.Module, p: float = 0.5, generator: torch.Generator | None = None) -> nn.Module:
    """Replace every ``nn.BatchNorm1d/2d/3d`` of ``module`` by the StochNorm layer of the same
    dimension with a copy of its parameters, running statistics and mode.

    Every converted layer gets this ``p`` and shares ``generator`` (unlike TLlib's
    ``convert_model``, which leaves ``p`` at 0.5 and aliases the running statistics).

    Args:
        module: a model, or a single BatchNorm (then a new layer is returned).
        p: probability that a channel uses the batch statistics. Default: 0.5.
        generator: mask generator shared by the converted layers. Default: None (global RNG).

    Returns:
        ``module`` with its BatchNorm layers replaced in place, or the new layer.

    Example:
        >>> net = convert_model(nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8)), p=0.3)
        >>> type(net[1]).__name__, net[1].p
        ('StochNorm2d', 0.3)
    """
    def build(bn: _BatchNorm) -> _StochNorm:
        return _STOCH[type(bn)].from_batchnorm(bn, p, generator)

    if type(module) in _STOCH:
        return build(module)
    replace_batchnorm(module, build, tuple(_STOCH))
    return module


class StochNormStrategy(Plugin):
    """StochNorm for the whole model: every BatchNorm1d/2d/3d (backbone and bottleneck) becomes a
    StochNorm layer with probability ``p``; all layers draw their masks from the strategy's
    generator, seeded from the run's ``seed`` in ``setup`` and saved in checkpoints.

    Args:
        p: probability that a channel uses the batch statistics. Default: 0.5 (paper, thuml/StochNorm
            ``train.py --p 0.5``, TLlib ``--prob 0.5``).

    Example:
        >>> from tllab.models import Classifier, create_backbone
        >>> model = StochNormStrategy(p=0.5).transform_model(Classifier(create_backbone("tllab", "digits_cnn"), 10))
        >>> sum(isinstance(m, StochNorm2d) for m in model.modules())
        3
    """

    exclusive = "batchnorm"

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"p must be a probability in [0, 1], got {p}")
        self.p = p
        self.generator = torch.Generator().manual_seed(0)

    def transform_model(self, model: nn.Module) -> nn.Module:
        if not any(type(m) in _STOCH for m in model.modules()):
            raise ConfigError("norm.stochnorm: the model has no BatchNorm1d/2d/3d layer to replace; "
                              "use a backbone with BatchNorm (digits_cnn, ResNets).")
        return convert_model(model, self.p, self.generator)

    def setup(self, ctx: SetupContext) -> None:
        # Same seed on every rank: same masks everywhere; a resumed run restores the state below.
        self.generator.manual_seed(int(ctx.config["seed"]))

    def get_extra_state(self) -> Any:
        return self.generator.get_state()

    def set_extra_state(self, state: Any) -> None:
        self.generator.set_state(state)
