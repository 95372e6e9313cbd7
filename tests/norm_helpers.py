"""Shared pieces of the normalization-layer tests."""

from __future__ import annotations

import torch
from torch import nn

# The backbones every strategy claims: the digits CNN, a torchvision and a timm ResNet.
BACKBONES = [["backbone=digits_cnn"], ["backbone=resnet18"], ["backbone=timm", "backbone.name=resnet18"]]


def random_batchnorm(channels: int, dim: int = 2, dtype: torch.dtype = torch.float64,
                     seed: int = 0) -> nn.modules.batchnorm._BatchNorm:
    """A BatchNorm with non-trivial affine parameters and running statistics."""
    bn = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}[dim](channels).to(dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(channels, generator=g) + 0.5)
        bn.bias.copy_(torch.randn(channels, generator=g))
        bn.running_mean.copy_(torch.randn(channels, generator=g))
        bn.running_var.copy_(torch.rand(channels, generator=g) + 0.5)
    return bn


def make_data(seed: int, channels: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` float64 images whose halves differ in distribution, and an upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, channels, 4, 5, generator=g, dtype=torch.float64)
    x[n // 2:] = 3 * x[n // 2:] + 2
    return x, torch.randn(n, channels, 4, 5, generator=g, dtype=torch.float64)


def step(layer: nn.Module, x: torch.Tensor, grad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Forward and backward; returns the output and the input's gradient."""
    x = x.clone().requires_grad_()
    y = layer(x)
    (y * grad).sum().backward()
    return y.detach(), x.grad


def check_bfloat16_under_float32_parameters(layer: nn.Module) -> None:
    """As under AMP: bfloat16 in, bfloat16 out and input gradient, float32 parameter gradients."""
    x = torch.randn(8, layer.num_features, 3, 3).bfloat16().requires_grad_()
    y = layer(x)
    assert y.dtype == torch.bfloat16
    y.float().square().sum().backward()
    assert x.grad.dtype == torch.bfloat16 and torch.isfinite(x.grad.float()).all()
    assert layer.weight.grad.dtype == torch.float32


def assert_shards_match(ranks: list[dict], split: tuple[int, ...], outs: list, ref: nn.Module) -> None:
    """Each rank's outputs and input gradients equal its slice of one process's on the whole batch,
    and its running statistics equal that process's (within 1e-10)."""
    lo = 0
    for r, n in enumerate(split):
        got = ranks[r][split]
        for (y, dx), (y_ref, dx_ref) in zip(got["outs"], outs):
            torch.testing.assert_close(y, y_ref[lo:lo + n], atol=1e-10, rtol=0)
            torch.testing.assert_close(dx, dx_ref[lo:lo + n], atol=1e-10, rtol=0)
        torch.testing.assert_close(got["mean"], ref.running_mean, atol=1e-10, rtol=0)
        torch.testing.assert_close(got["var"], ref.running_var, atol=1e-10, rtol=0)
        lo += n


def styled_features(shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """float64 feature maps whose instances and channels each have their own scale and shift."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.rand(shape[0], shape[1], 1, 1, generator=g, dtype=torch.float64) * 3 + 0.5
    shift = torch.randn(shape[0], shape[1], 1, 1, generator=g, dtype=torch.float64) * 2
    return torch.randn(shape, generator=g, dtype=torch.float64) * scale + shift
