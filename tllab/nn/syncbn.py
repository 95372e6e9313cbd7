"""Synchronized BatchNorm for any backend (gloo on CPU, NCCL on GPU), exact for uneven batches.

``torch.nn.SyncBatchNorm`` refuses CPU tensors, and PyTorch-Encoding's ``DistSyncBatchNorm``
averages per-rank means without weighting them by the per-rank counts and uses a one-pass
biased variance for the running statistics. This version combines per-rank ``(count, mean, M2)``
with Chan's parallel formula in float64, so the batch statistics, the running statistics and
every gradient equal those of ``BatchNorm`` on the concatenation of all ranks' batches.

:class:`SyncBatchNorm` takes PyTorch-Encoding's ``sync``, ``activation`` (a leaky ReLU after the
affine transform, in place where that is safe) and ``slope`` arguments; ``BatchNorm1d/2d/3d``
here are that library's deprecated aliases of it.
"""

from __future__ import annotations

import warnings

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from tllab.distributed import world_size
from tllab.nn.functional import upcast_half
from tllab.nn.host_exchange import host_exchange


def _all_gather(vec: Tensor, group: dist.ProcessGroup | None) -> Tensor:
    """Every rank's float64 ``vec`` stacked in rank order: through shared memory between CPU
    processes of one machine, else through the process group."""
    exchange = host_exchange(group) if vec.device.type == "cpu" else None
    if exchange is not None:
        return exchange.all_gather(vec)
    parts = [torch.empty_like(vec) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, vec, group=group)
    return torch.stack(parts)


def _memory_format(x: Tensor) -> torch.memory_format:
    """Channels-last when ``x`` is laid out so (images from HWC arrays often are)."""
    channels_last = x.dim() == 4 and not x.is_contiguous() and x.is_contiguous(memory_format=torch.channels_last)
    return torch.channels_last if channels_last else torch.contiguous_format


class _SyncBatchNormFunction(torch.autograd.Function):
    """Normalize with global batch statistics; returns ``(y, mean, unbiased var)``.

    The per-element work runs in PyTorch's fused BatchNorm kernels (evaluation-mode forward and
    training-mode backward with the global statistics, plus a per-channel correction); only
    per-channel vectors are exchanged between ranks (:func:`_all_gather`): ``(count, mean, M2)``
    forward, ``(sum dy, sum dy * xhat)`` backward.
    """

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor | None, bias: Tensor | None, eps: float, group):
        c = x.shape[1]
        local = torch.zeros(2 * c + 1, dtype=torch.float64, device=x.device)
        n = x.numel() // c if c else 0
        local[0] = n
        if n > 0:  # two-pass local statistics: no cancellation, and faster than Welford here
            xf = upcast_half(x)
            dims = [0, *range(2, x.dim())]
            mean = xf.mean(dims)
            local[1:c + 1] = mean.double()
            local[c + 1:] = (xf - mean.view((1, c) + (1,) * (x.dim() - 2))).square_().sum(dims).double()
        stats = _all_gather(local, group)
        counts, means, m2s = stats[:, :1], stats[:, 1:c + 1], stats[:, c + 1:]
        total = counts.sum()
        if total <= 1:
            raise ValueError(f"Expected more than 1 value per channel when training, got {int(total)} over all ranks")
        mean = (counts * means).sum(0) / total
        m2 = (m2s + counts * (means - mean) ** 2).sum(0)  # Chan et al.: exact, no cancellation
        g_mean, g_var = mean.to(x.dtype), (m2 / total).to(x.dtype)
        # (the fused CPU kernels divide by the batch size: a rank without samples skips them)
        y = x.clone() if n == 0 else torch.batch_norm(x, weight, bias, g_mean, g_var, False, 0.0, eps,
                                                      torch.backends.cudnn.enabled)
        ctx.save_for_backward(x, weight, g_mean, g_var)
        ctx.total, ctx.eps, ctx.group = total.item(), eps, group
        unbiased = m2 / (total - 1)
        ctx.mark_non_differentiable(mean, unbiased)
        return y, mean, unbiased

    @staticmethod
    def backward(ctx, dy: Tensor, _dmean, _dvar):
        x, weight, mean, var = ctx.saved_tensors
        c = x.shape[1]
        w = weight if weight is not None else torch.ones(c, dtype=x.dtype, device=x.device)
        invstd = torch.rsqrt(var + ctx.eps)
        n = x.numel() // c if c else 0
        # PyTorch's fused training-mode backward with the global mean/invstd: it returns
        # sum(dy * xhat), sum(dy) and dx for the *local* batch,
        # dx_l = w * invstd * (dy - sum_l(dy) / n - xhat * sum_l(dy * xhat) / n).
        if n:
            dx, sum_dy_xhat, sum_dy = torch.ops.aten.native_batch_norm_backward(
                dy.contiguous(memory_format=_memory_format(x)), x, w, None, None, mean, invstd, True, ctx.eps,
                [True, True, True])
        else:
            dx, sum_dy_xhat, sum_dy = torch.zeros_like(x), x.new_zeros(c), x.new_zeros(c)
        both = _all_gather(torch.cat([sum_dy, sum_dy_xhat]).double(), ctx.group).sum(0).to(x.dtype)
        g_dy, g_dy_xhat = both[:c], both[c:]
        # The global dx uses the global sums and count N instead: add the per-channel difference
        # w * invstd * (u + xhat * v) = a + b * x, u = sum_l(dy)/n - G(dy)/N, v likewise for dy * xhat.
        u = (sum_dy / n if n else 0) - g_dy / ctx.total
        v = (sum_dy_xhat / n if n else 0) - g_dy_xhat / ctx.total
        b = w * invstd * invstd * v
        a = w * invstd * u - b * mean
        shape = (1, c) + (1,) * (x.dim() - 2)
        dx.add_(a.view(shape)).addcmul_(x, b.view(shape))
        if weight is None:
            return dx, None, None, None, None
        # Parameter gradients stay local: data-parallel gradient averaging sums them over ranks.
        return dx, sum_dy_xhat, sum_dy, None, None


def batch_norm(x: Tensor, bn: _BatchNorm, process_group: dist.ProcessGroup | None = None) -> Tensor:
    r"""BatchNorm of ``x`` with ``bn``'s affine parameters and running buffers, its batch
    statistics synchronized over ``process_group`` (default: all ranks) in training mode.

    .. math:: y = \frac{x - \mu}{\sqrt{\sigma^2 + \epsilon}}\,\gamma + \beta

    with :math:`\mu, \sigma^2` the mean and biased variance over the batch and spatial dimensions
    of *all* ranks' inputs. Running statistics are updated with the unbiased variance over the
    global count, with ``bn.momentum`` (``None``: cumulative average), exactly as ``bn`` would on
    the concatenated batch. In eval mode, outside a process group or with one rank it is
    ``nn.BatchNorm``'s own forward (no communication). BatchNorm-derived layers that set
    ``supports_sync = True`` call this when their ``sync`` flag is set (see
    :func:`convert_sync_batchnorm`).

    Args:
        x: input :math:`(N, C, *)`; a rank may have :math:`N = 0`.
        bn: the module whose parameters, buffers, ``eps`` and ``momentum`` are used.
        process_group: the ranks to synchronize over.

    Example:
        >>> batch_norm(torch.randn(4, 3, 5, 5), nn.BatchNorm2d(3)).shape
        torch.Size([4, 3, 5, 5])
    """
    if not (bn.training and world_size(process_group) > 1):
        return _BatchNorm.forward(bn, x)
    y, mean, var = _SyncBatchNormFunction.apply(x, bn.weight, bn.bias, bn.eps, process_group)
    if bn.track_running_stats:
        with torch.no_grad():
            bn.num_batches_tracked.add_(1)
            factor = 1.0 / bn.num_batches_tracked.item() if bn.momentum is None else bn.momentum
            bn.running_mean.mul_(1 - factor).add_(mean.to(bn.running_mean.dtype), alpha=factor)
            bn.running_var.mul_(1 - factor).add_(var.to(bn.running_var.dtype), alpha=factor)
    return y


class SyncBatchNorm(_BatchNorm):
    r"""BatchNorm whose batch statistics are computed over all ranks, on any backend, optionally
    followed by a leaky ReLU (PyTorch-Encoding's activated SyncBN).

    .. math:: y = f\left(\frac{x - \mathrm{E}[x]}{\sqrt{\mathrm{Var}[x] + \epsilon}}\,\gamma + \beta\right),
              \quad f(z) = z \text{ or } \max(z, 0) + \text{slope} \cdot \min(z, 0)

    with :math:`\mathrm{E}[x], \mathrm{Var}[x]` (biased) taken per channel over the batch and
    spatial dimensions of all ranks' inputs (``sync=True``) or of this process's input only
    (``sync=False``: plain BatchNorm even under DDP, no communication). Running statistics,
    eval mode and the behaviour outside a process group are those of :func:`batch_norm`.

    With ``inplace`` and ``slope >= 0`` the leaky ReLU overwrites the normalized output, which
    saves one activation-sized tensor per layer over ``F.leaky_relu`` (that keeps its input for
    the backward). This is safe: no BatchNorm backward (PyTorch's kernels, or the synchronized
    one here) reads the normalized output, only :math:`x` and the statistics, and the in-place
    leaky ReLU's backward finds the positive inputs from its output, positive exactly there when
    ``slope >= 0`` (autograd refuses a negative slope in place, so that runs out of place). Unlike
    PyTorch-Encoding's in-place ABN, :math:`x` is kept rather than recomputed from :math:`y` in
    the backward: recomputing needs :math:`\gamma \neq 0` and would cost the gradients' exactness.

    Args:
        num_features: :math:`C`.
        eps: added to the variance. Default: 1e-5.
        momentum: running-statistics factor; ``None`` for a cumulative average. Default: 0.1.
        sync: synchronize the batch statistics over ``process_group``. Default: True.
        activation: ``'none'`` or ``'leaky_relu'``. Default: ``'none'``.
        slope: negative slope of the leaky ReLU. Default: 0.01.
        inplace: apply the leaky ReLU in place (for ``slope >= 0``). Default: True.
        affine: learnable :math:`\gamma, \beta` (keyword only). Default: True.
        track_running_stats: keep running mean/var (keyword only). Default: True.
        process_group: ranks to synchronize over (keyword only). Default: all.

    All arguments after ``momentum`` are keyword-only: PyTorch-Encoding's fourth positional
    argument is ``sync`` and ``nn.BatchNorm2d``'s is ``affine``, so a positional boolean would be
    ambiguous.

    Shape:
        - Input: :math:`(N, C, *)`; Output: same shape.

    Example:
        >>> layer = SyncBatchNorm(16, activation="leaky_relu", slope=0.1)
        >>> layer(torch.randn(8, 16, 4, 4)).shape
        torch.Size([8, 16, 4, 4])
    """

    reverts_to: type[_BatchNorm] = nn.BatchNorm2d  # the class revert_sync_batchnorm builds

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float | None = 0.1, *, sync: bool = True,
                 activation: str = "none", slope: float = 0.01, inplace: bool = True, affine: bool = True,
                 track_running_stats: bool = True, process_group: dist.ProcessGroup | None = None,
                 device=None, dtype=None) -> None:
        if activation not in ("none", "leaky_relu"):
            raise ValueError(f"activation must be 'none' or 'leaky_relu', got {activation!r}")
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        self.process_group = process_group
        self.sync, self.activation, self.slope, self.inplace = sync, activation, slope, inplace

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {x.dim()}D input)")

    def forward(self, x: Tensor) -> Tensor:
        self._check_input_dim(x)
        y = batch_norm(x, self, self.process_group) if self.sync else _BatchNorm.forward(self, x)
        if self.activation == "none":
            return y
        return F.leaky_relu(y, self.slope, inplace=self.inplace and self.slope >= 0)

    def extra_repr(self) -> str:
        extra = "" if self.sync else ", sync=False"
        if self.activation != "none":
            extra += f", activation={self.activation!r}, slope={self.slope}, inplace={self.inplace}"
        return super().extra_repr() + extra


class _DeprecatedAlias(SyncBatchNorm):
    """PyTorch-Encoding's ``BatchNorm{1,2,3}d``: a :class:`SyncBatchNorm` for inputs of
    ``dims`` dimensions, whose construction warns."""

    dims: tuple[int, ...]

    def __init__(self, *args, **kwargs) -> None:
        # DeprecationWarning, as PyTorch-Encoding: it addresses whoever writes the model code
        # (shown in __main__ and under pytest), not the user of a finished application.
        warnings.warn(f"tllab.nn.{type(self).__name__} is deprecated; use tllab.nn.SyncBatchNorm",
                      DeprecationWarning, stacklevel=2)
        super().__init__(*args, **kwargs)

    def _check_input_dim(self, x: Tensor) -> None:
        if x.dim() not in self.dims:
            raise ValueError(f"expected {' or '.join(f'{d}D' for d in self.dims)} input (got {x.dim()}D input)")


class BatchNorm1d(_DeprecatedAlias):
    """Deprecated: :class:`SyncBatchNorm` for :math:`(N, C)` or :math:`(N, C, L)` input."""

    dims, reverts_to = (2, 3), nn.BatchNorm1d


class BatchNorm2d(_DeprecatedAlias):
    """Deprecated: :class:`SyncBatchNorm` for :math:`(N, C, H, W)` input."""

    dims, reverts_to = (4,), nn.BatchNorm2d


class BatchNorm3d(_DeprecatedAlias):
    """Deprecated: :class:`SyncBatchNorm` for :math:`(N, C, D, H, W)` input."""

    dims, reverts_to = (5,), nn.BatchNorm3d


# PyTorch-Encoding's name for the same layer.
DistSyncBatchNorm = SyncBatchNorm

_PLAIN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_OURS = (SyncBatchNorm, BatchNorm1d, BatchNorm2d, BatchNorm3d)


def _moved(src: _BatchNorm, dst: _BatchNorm) -> _BatchNorm:
    """``dst`` holding ``src``'s very parameter and buffer objects and training flag."""
    for name in ("weight", "bias"):
        setattr(dst, name, getattr(src, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        dst.register_buffer(name, getattr(src, name))
    return dst.train(src.training)


def convert_sync_batchnorm(module: nn.Module, process_group: dist.ProcessGroup | None = None) -> nn.Module:
    """Make every BatchNorm in ``module`` synchronize its batch statistics.

    Plain ``BatchNorm{1,2,3}d`` (and ``torch.nn.SyncBatchNorm``) become :class:`SyncBatchNorm`
    sharing the same parameter and buffer objects, with no activation; existing
    :class:`SyncBatchNorm` layers keep their settings, ``sync`` included. BatchNorm subclasses
    that set ``supports_sync = True`` (and normalize through :func:`batch_norm` with their
    ``process_group`` attribute) keep their class and every extra parameter; the converter sets
    ``sync = True`` and ``process_group`` on them. Other subclasses are left as they are, with a
    warning. Returns the converted module (a new object only when ``module`` itself is a BN).
    """
    if type(module) in _PLAIN:
        new = _moved(module, SyncBatchNorm(module.num_features, module.eps, module.momentum, affine=module.affine,
                                           track_running_stats=module.track_running_stats,
                                           process_group=process_group))
        new.reverts_to = type(module) if type(module) is not nn.SyncBatchNorm else nn.BatchNorm2d
        return new
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        if getattr(module, "supports_sync", False):
            module.sync, module.process_group = True, process_group
        else:
            warnings.warn(f"{type(module).__name__} is a BatchNorm subclass without supports_sync; it is not "
                          "synchronized", stacklevel=2)
    for name, child in module.named_children():
        setattr(module, name, convert_sync_batchnorm(child, process_group))
    return module


def revert_sync_batchnorm(module: nn.Module) -> nn.Module:
    """Inverse of :func:`convert_sync_batchnorm`: each :class:`SyncBatchNorm` back to the class it
    was converted from (``BatchNorm2d`` if it was built directly, ``BatchNorm{1,2,3}d`` for the
    deprecated aliases), flagged subclasses back to ``sync = False``; parameters and buffers are
    shared, so ``state_dict`` values are unchanged. A :class:`SyncBatchNorm` with an activation
    has no plain BatchNorm equivalent: it stays, with ``sync = False``."""
    if type(module) in _OURS and module.activation == "none":
        return _moved(module, module.reverts_to(module.num_features, module.eps, module.momentum, module.affine,
                                                module.track_running_stats))
    if type(module) in _OURS or getattr(module, "supports_sync", False):
        module.sync, module.process_group = False, None
    for name, child in module.named_children():
        setattr(module, name, revert_sync_batchnorm(child))
    return module
