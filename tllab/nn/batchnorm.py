"""Helpers for BatchNorm-derived layers (StochNorm, BIN): batch statistics over all ranks,
BatchNorm's running-statistics step, and copying a BatchNorm into a new layer."""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor
from torch.nn.modules.batchnorm import _BatchNorm

from tllab.distributed import all_gather_stack, world_size


def batch_stats(x: Tensor, process_group: dist.ProcessGroup | None = None) -> tuple[Tensor, Tensor, int]:
    r"""Per-channel mean and biased variance of ``x`` over the batch and spatial dimensions of all
    ranks in ``process_group`` (one process: of ``x``), differentiable.

    Each rank's count :math:`n_i`, mean :math:`\mu_i` and :math:`M2_i = n_i \sigma_i^2` are
    gathered (with autograd, so gradients flow to every rank's input) and merged:

    .. math:: \mu = \frac{\sum_i n_i \mu_i}{N},\quad
              \sigma^2 = \frac{\sum_i M2_i + n_i (\mu_i - \mu)^2}{N}

    For layers that use batch statistics in their own way (StochNorm, BIN) under
    ``trainer.sync_bn``; a rank may hold no samples.

    Args:
        x: :math:`(N, C, *)`.
        process_group: the ranks to merge over (default: all, when a process group exists).

    Returns:
        ``(mean, var, count)``: mean and variance of shape :math:`(C,)` and the number of values
        per channel they were taken over (all ranks).

    Example:
        >>> mean, var, count = batch_stats(torch.randn(8, 3, 4, 4))
        >>> mean.shape, count
        (torch.Size([3]), 128)
    """
    dims = [0, *range(2, x.dim())]
    n = x.numel() // x.shape[1]
    if n:
        var, mean = torch.var_mean(x, dim=dims, unbiased=False)
    else:
        mean = var = x.sum(dims)  # zeros that keep the graph
    if world_size(process_group) == 1:
        return mean, var, n
    local = torch.cat([x.new_full((1,), float(n)), mean, var * n])
    c = x.shape[1]
    parts = all_gather_stack(local, process_group)
    counts, means, m2 = parts[:, :1], parts[:, 1:1 + c], parts[:, 1 + c:]
    total = counts.sum()
    mean = (counts * means).sum(0) / total
    var = (m2 + counts * (means - mean) ** 2).sum(0) / total
    return mean, var, int(total.item())


def synced(layer: _BatchNorm) -> bool:
    """Whether ``layer`` (flagged by ``tllab.nn.convert_sync_batchnorm``) takes its batch statistics
    over several ranks in this forward."""
    return getattr(layer, "sync", False) and layer.training and world_size(layer.process_group) > 1


def check_count(count: int) -> None:
    """BatchNorm's training error for fewer than 2 values per channel (e.g. one 1x1 image)."""
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got {count}")


def update_running_stats(layer: _BatchNorm, mean: Tensor, var: Tensor, count: int) -> None:
    """BatchNorm's running-statistics step from batch ``mean`` and biased ``var`` over ``count`` values:
    the unbiased variance, ``momentum`` (``None``: cumulative average), ``num_batches_tracked``."""
    check_count(count)
    with torch.no_grad():
        layer.num_batches_tracked.add_(1)
        factor = 1.0 / layer.num_batches_tracked.item() if layer.momentum is None else layer.momentum
        layer.running_mean.mul_(1 - factor).add_(mean.to(layer.running_mean.dtype), alpha=factor)
        layer.running_var.mul_(1 - factor).add_(var.to(layer.running_var.dtype), alpha=factor * count / (count - 1))


def copy_batchnorm(bn: _BatchNorm, layer: _BatchNorm) -> _BatchNorm:
    """``layer`` with a copy of ``bn``'s parameters (and their ``requires_grad``), running statistics
    and train/eval mode; returns ``layer``."""
    with torch.no_grad():
        for name, value in bn.state_dict().items():
            getattr(layer, name).copy_(value)
    for name, param in bn.named_parameters(recurse=False):
        getattr(layer, name).requires_grad_(param.requires_grad)
    return layer.train(bn.training)
