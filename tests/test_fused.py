"""Fused CPU kernels: same numbers as their PyTorch expressions, on every layout they accept."""

from __future__ import annotations

import pytest
import torch

from tllab.nn.fused import channel_affine2, fusable


def coefficients(c: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(1)
    return tuple(torch.randn(c, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))


@pytest.mark.parametrize("shape", [(4, 3, 5, 6), (4, 3), (2, 3, 4), (2, 3, 2, 2, 2)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_channel_affine2_matches_the_formula(shape, dtype):
    g = torch.Generator().manual_seed(0)
    a, b = (torch.randn(shape, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    s, t, u = coefficients(shape[1], dtype)
    view = (1, -1) + (1,) * (len(shape) - 2)
    expected = s.view(view) * a + t.view(view) * b + u.view(view)
    out = channel_affine2(a, b, s, t, u)
    assert out.shape == a.shape and out.dtype == dtype and out.is_contiguous()
    torch.testing.assert_close(out, expected, atol=1e-12 if dtype == torch.float64 else 1e-5, rtol=0)


def test_channel_affine2_on_channels_last_and_bfloat16_inputs():
    a = torch.randn(2, 3, 4, 5, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    b = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    s, t, u = coefficients(3, torch.float64)
    expected = s.view(1, -1, 1, 1) * a + t.view(1, -1, 1, 1) * b + u.view(1, -1, 1, 1)
    torch.testing.assert_close(channel_affine2(a, b, s, t, u), expected, atol=1e-12, rtol=0)
    # Other dtypes take the PyTorch expression (type promotion as in PyTorch).
    half = channel_affine2(a.bfloat16(), b.bfloat16(), *coefficients(3, torch.float32))
    torch.testing.assert_close(half, expected.float(), atol=0.1, rtol=0.05)


def test_fusable_needs_one_float_dtype_on_the_cpu():
    x = torch.zeros(2)
    assert fusable(x, x.double()) is False and fusable(x.bfloat16()) is False
    assert fusable(x, torch.ones(3)) and fusable(x.double())


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_channel_affine2_with_per_instance_coefficients(dtype):
    g = torch.Generator().manual_seed(2)
    a, b = (torch.randn(3, 4, 5, 5, generator=g, dtype=torch.float64).to(dtype) for _ in range(2))
    s, t, u = (torch.randn(3, 4, 1, 1, generator=g, dtype=torch.float64).to(dtype) for _ in range(3))
    torch.testing.assert_close(channel_affine2(a, b, s, t, u), s * a + t * b + u,
                               atol=1e-12 if dtype == torch.float64 else 1e-5, rtol=0)
