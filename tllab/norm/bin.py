"""Batch-Instance Normalization (Nam & Kim, "Batch-Instance Normalization for Adaptively
Style-Invariant Neural Networks", NeurIPS 2018; ``hyeonseobnam/Batch-Instance-Normalization``).

Every BatchNorm2d of the backbone becomes a learned per-channel blend of BatchNorm and
InstanceNorm. As in the official ``main.py``, the gates train with their own learning rate
(10x) and no weight decay and are clamped to [0, 1] after every optimizer step.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from tllab.errors import ConfigError
from tllab.nn.batchnorm import batch_stats, copy_batchnorm, synced, update_running_stats
from tllab.norm.placement import replace_batchnorm
from tllab.plugin import Plugin

__all__ = ["BINStrategy", "BatchInstanceNorm2d"]


class _BatchInstanceNormFunction(torch.autograd.Function):
    r""":math:`y = \gamma\,(\rho\,(x - \mu_c)\,\hat\sigma_c + (1 - \rho)\,(x - m_{nc})\,s_{nc}) + \beta` from
    precomputed statistics: instance :math:`(m, v)` per sample and channel (:math:`s = 1/\sqrt{v + \epsilon}`)
    and BatchNorm :math:`(\mu, \sigma^2)` per channel (:math:`\hat\sigma = 1/\sqrt{\sigma^2 + \epsilon}`), the
    batch's when ``batch_stats`` (gradients flow through them) or the running ones.

    ``x`` comes as :math:`(1, N C, H W)` (and ``y`` goes back so). The output is a per-(sample,
    channel) affine map of ``x``: one fused evaluation-mode BatchNorm pass. Backward: the same
    fused kernel's backward gives :math:`dx = \gamma(\rho\hat\sigma + (1 - \rho) s)\,dy` and the
    per-(sample, channel) sums :math:`\sum dy` and :math:`\sum dy\,\hat x^{IN}`, from which both
    normalizations' statistics terms (:math:`P x + Q` per sample and channel: two passes) and the
    parameter gradients follow.
    With ``sync`` the BatchNorm sums and count span all ranks of ``group``.
    """

    @staticmethod
    def forward(ctx, xv: Tensor, weight: Tensor | None, bias: Tensor | None, gate: Tensor, in_mean: Tensor,
                in_var: Tensor, bn_mean: Tensor, bn_var: Tensor, eps: float, batch_stats: bool, count: int,
                sync: bool, group: dist.ProcessGroup | None) -> Tensor:
        c = gate.numel()
        n = xv.shape[1] // c
        gamma = weight if weight is not None else torch.ones_like(gate)
        s = torch.rsqrt(in_var + eps).view(n, c)
        bn_invstd = torch.rsqrt(bn_var + eps)
        # (x - m) s w' + b' with w' = gamma (rho bn_invstd / s + 1 - rho), b' = beta + gamma rho bn_invstd (m - mu)
        w_in = gamma * gate * bn_invstd / s + gamma * (1 - gate)
        b_in = gamma * gate * bn_invstd * (in_mean.view(n, c) - bn_mean)
        if bias is not None:
            b_in = b_in + bias
        ctx.save_for_backward(xv, gamma, gate, s, w_in, in_mean, in_var, bn_mean, bn_invstd)
        ctx.affine, ctx.eps = weight is not None, eps
        ctx.batch_stats, ctx.count, ctx.sync, ctx.group = batch_stats, count, sync, group
        return torch.batch_norm(xv, w_in.flatten(), b_in.flatten(), in_mean, in_var, False, 0.0, eps,
                                torch.backends.cudnn.enabled)

    @staticmethod
    @once_differentiable
    def backward(ctx, dy: Tensor):
        xv, gamma, gate, s, w_in, in_mean, in_var, bn_mean, bn_invstd = ctx.saved_tensors
        c = gate.numel()
        n, size = xv.shape[1] // c, xv.shape[2]
        m = in_mean.view(n, c)
        # dx = gamma (rho bn_invstd + (1 - rho) s) dy; sum_in = sum(dy * xhat_in), sum_dy = sum(dy) per (n, c)
        dx, sum_in, sum_dy = torch.ops.aten.native_batch_norm_backward(
            dy.contiguous(), xv, w_in.flatten(), in_mean, in_var, None, None, False, ctx.eps, [True, True, True])
        sum_in, sum_dy = sum_in.view(n, c), sum_dy.view(n, c)
        # Per channel: sum(dy) and sum(dy * (x - mu)) over this rank's samples.
        dbeta = sum_dy.sum(0)
        dy_xmu = (sum_in / s + (m - bn_mean) * sum_dy).sum(0)
        # Instance statistics' terms: -gamma (1 - rho) s (sum_dy + xhat_in sum_in) / size.
        g_in = gamma * (1 - gate) * s / size
        p = -g_in * s * sum_in
        q = -g_in * sum_dy - p * m
        if ctx.batch_stats:  # BatchNorm statistics' terms over all values (of every rank with sync)
            sums = torch.stack([dbeta, dy_xmu])
            if ctx.sync:
                sums = sums.double()
                dist.all_reduce(sums, group=ctx.group)
                sums = sums.to(dbeta.dtype)
            g_bn = gamma * gate * bn_invstd / ctx.count
            p_bn = -g_bn * bn_invstd * bn_invstd * sums[1]
            p = p + p_bn
            q = q - g_bn * sums[0] - p_bn * bn_mean
        dx.view(n, c, size).addcmul_(xv.view(n, c, size), p.unsqueeze(-1)).add_(q.unsqueeze(-1))
        sum_bn, sum_in = bn_invstd * dy_xmu, sum_in.sum(0)  # sum(dy * xhat) per channel
        dgamma = gate * sum_bn + (1 - gate) * sum_in if ctx.affine else None
        dgate = gamma * (sum_bn - sum_in)
        return (dx, dgamma, dbeta if ctx.affine else None, dgate,
                None, None, None, None, None, None, None, None, None)


class BatchInstanceNorm2d(_BatchNorm):
    r"""Batch-Instance Normalization over 4D inputs (Nam & Kim, NeurIPS 2018).

    .. math::
        y = \bigl(\rho_c\,\hat x^{BN} + (1 - \rho_c)\,\hat x^{IN}\bigr)\,\gamma_c + \beta_c

    :math:`\hat x^{BN}` is BatchNorm without affine (batch statistics in training, updating the
    running statistics as BatchNorm does; running statistics in evaluation), :math:`\hat x^{IN}`
    InstanceNorm without affine (each sample's own spatial statistics, in training *and*
    evaluation), both with the biased variance and :math:`\epsilon` inside the square root. The
    gate :math:`\rho \in [0, 1]^C` starts at 1 (pure BatchNorm); keeping it in [0, 1] is the
    optimizer's job (:class:`BINStrategy` clamps it after every step). Under ``trainer.sync_bn``
    the BatchNorm half takes its statistics over all ranks (:func:`tllab.nn.batch_stats`).

    The InstanceNorm half needs more than one spatial position: a 1x1 input raises
    ``ValueError`` (in evaluation too), e.g. in a ResNet's last stage on 32x32 images; use larger
    images (``dataset.image_size=64``).

    Args:
        num_features: :math:`C`.
        eps: added to both variances inside the square root. Default: 1e-5.
        momentum: running-statistics factor; ``None`` for a cumulative average. Default: 0.1.
        affine: learnable :math:`\gamma, \beta` (initialized to 1, 0); without them
            :math:`\gamma = 1, \beta = 0`. Default: True.

    Shape:
        - Input: :math:`(N, C, H, W)` with :math:`H W > 1`; Output: same shape.

    Example:
        >>> layer = BatchInstanceNorm2d(16)
        >>> layer(torch.randn(8, 16, 5, 5)).shape
        torch.Size([8, 16, 5, 5])
    """

    # tllab.nn.convert_sync_batchnorm keeps this class and sets ``sync`` / ``process_group``.
    supports_sync = True

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, affine: bool = True,
                 device=None, dtype=None) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats=True, device=device, dtype=dtype)
        self.gate = nn.Parameter(torch.ones(num_features, device=device, dtype=dtype))
        self.sync, self.process_group = False, None

    @classmethod
    def from_batchnorm(cls, bn: _BatchNorm) -> BatchInstanceNorm2d:
        """A BIN layer (gate 1) with a copy of ``bn``'s affine parameters, running statistics and mode."""
        if not bn.track_running_stats:
            raise ValueError(f"BatchInstanceNorm2d needs running statistics; {bn} has track_running_stats=False")
        return copy_batchnorm(bn, cls(bn.num_features, bn.eps, bn.momentum, bn.affine,
                                      device=bn.running_mean.device, dtype=bn.running_mean.dtype))

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() != 4:
            raise ValueError(f"expected 4D input (got {x.dim()}D input)")
        if x.shape[2] * x.shape[3] == 1:
            raise ValueError("BatchInstanceNorm2d needs more than one spatial position for its instance-norm half, "
                             f"got input of shape {tuple(x.shape)}; use larger images (e.g. dataset.image_size=64)")

    def _statistics(self, x: Tensor, xv: Tensor, sync: bool) -> tuple[Tensor, Tensor, Tensor, Tensor, int]:
        """Instance mean and biased variance per (sample, channel) (from ``xv``, ``x`` seen as
        :math:`(1, N C, H W)`), BatchNorm mean and biased variance per channel (the batch's in training:
        merged from the instance ones, or over all ranks with ``sync``; else the running ones) and the
        count behind the latter."""
        n, c = x.shape[:2]
        with torch.no_grad():
            in_mean, in_var = (t.to(self.gate.dtype) for t in torch.batch_norm_update_stats(xv, None, None, 0.0))
            if not self.training:
                return in_mean, in_var, self.running_mean, self.running_var, 0
            if sync:
                return in_mean, in_var, *batch_stats(x, self.process_group)
            m, v = in_mean.view(n, c), in_var.view(n, c)
            mean = m.mean(0)
            return in_mean, in_var, mean, (v + (m - mean) ** 2).mean(0), x.numel() // c

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        sync, xv = synced(self), x.reshape(1, x.shape[0] * x.shape[1], -1)  # one "channel" per sample and channel
        in_mean, in_var, bn_mean, bn_var, count = self._statistics(x, xv, sync)
        if self.training:
            update_running_stats(self, bn_mean, bn_var, count)
        y = _BatchInstanceNormFunction.apply(xv, self.weight, self.bias, self.gate, in_mean, in_var, bn_mean, bn_var,
                                             self.eps, self.training, count, sync, self.process_group)
        return y.view(x.shape)


class BINStrategy(Plugin):
    """Batch-Instance Normalization: every BatchNorm2d of the backbone becomes a
    :class:`BatchInstanceNorm2d` (gate 1, BatchNorm's parameters and statistics copied).

    The gates form their own optimizer group (``"bin_gates"``) with ``gate_lr_mult`` times the
    base learning rate and ``gate_weight_decay``, and are clamped to [0, 1] after every step.

    Args:
        gate_lr_mult: learning-rate multiplier of the gates. Default: 10 (official ``main.py``
            ``--bin-lr 10``).
        gate_weight_decay: weight decay of the gates. Default: 0 (official ``main.py``).

    Example:
        >>> from tllab.models import Classifier, create_backbone
        >>> model = BINStrategy().transform_model(Classifier(create_backbone("tllab", "digits_cnn"), 10))
        >>> sum(isinstance(m, BatchInstanceNorm2d) for m in model.modules())
        3
    """

    exclusive = "batchnorm"

    def __init__(self, gate_lr_mult: float = 10.0, gate_weight_decay: float = 0.0) -> None:
        super().__init__()
        self.gate_lr_mult, self.gate_weight_decay = gate_lr_mult, gate_weight_decay

    def transform_model(self, model: nn.Module) -> nn.Module:
        if not replace_batchnorm(model.backbone, BatchInstanceNorm2d.from_batchnorm, (nn.BatchNorm2d,)):
            raise ConfigError(f"norm.bin: the backbone {type(model.backbone).__name__} has no BatchNorm2d to "
                              "replace; use a backbone with BatchNorm (digits_cnn, ResNets).")
        return model

    @staticmethod
    def gates(model: nn.Module) -> list[nn.Parameter]:
        """The gates of every :class:`BatchInstanceNorm2d` in ``model``."""
        return [m.gate for m in model.modules() if isinstance(m, BatchInstanceNorm2d)]

    def param_groups(self, model: nn.Module, base_lr: float) -> list[dict[str, Any]]:
        return [{"params": self.gates(model), "lr": self.gate_lr_mult * base_lr,
                 "weight_decay": self.gate_weight_decay, "name": "bin_gates"}]

    def after_step(self, model: nn.Module) -> None:
        with torch.no_grad():
            for gate in self.gates(model):
                gate.clamp_(0, 1)
