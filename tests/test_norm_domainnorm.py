"""DomainNorm: instance norm, per-pixel unit L2 norm across channels, affine; plug-in and config."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from tests.conftest import compose_config
from tests.norm_helpers import BACKBONES, check_bfloat16_under_float32_parameters
from tllab.norm.domainnorm import DomainNorm
from tllab.plugin import build_plugins
from tllab.train import resolve_config
from tllab.trainer import build_model

C = 6


def data(seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, C, 5, 7, generator=g, dtype=torch.float64) * 3 + 1


def test_channel_vector_of_every_pixel_has_unit_norm_before_the_affine():
    layer = DomainNorm(C).double()
    y = layer(data())
    torch.testing.assert_close(y.norm(dim=1), torch.ones(4, 5, 7, dtype=torch.float64), atol=1e-12, rtol=0)
    # A pixel whose instance-normalized vector is zero stays zero (no division by zero).
    assert torch.equal(layer(zero_pixel_data())[:, :, 2, 2], torch.zeros(2, C, dtype=torch.float64))


def test_affine_scales_and_shifts_the_unit_vectors():
    layer = DomainNorm(C).double()
    x = data()
    unit = layer(x)
    with torch.no_grad():
        layer.weight.copy_(torch.linspace(-2, 3, C))
        layer.bias.copy_(torch.linspace(1, -1, C))
    expected = layer.weight.view(1, -1, 1, 1) * unit + layer.bias.view(1, -1, 1, 1)
    torch.testing.assert_close(layer(x), expected, atol=1e-12, rtol=0)
    layer.l2 = False  # then it is an affine InstanceNorm
    torch.testing.assert_close(layer(x), F.instance_norm(x, weight=layer.weight, bias=layer.bias), atol=1e-12, rtol=0)


def test_invariant_to_per_instance_per_channel_affine_changes_of_the_input():
    layer = DomainNorm(C).double()
    x = data()
    g = torch.Generator().manual_seed(1)
    scale = torch.rand(4, C, 1, 1, generator=g, dtype=torch.float64) * 10 + 0.1
    shift = torch.randn(4, C, 1, 1, generator=g, dtype=torch.float64) * 5
    # eps (1e-5) inside the square root makes the invariance approximate for small scales.
    torch.testing.assert_close(layer(scale * x + shift), layer(x), atol=1e-4, rtol=0)


def test_same_in_training_and_eval_and_per_sample():
    layer = DomainNorm(C).double()
    x = data()
    assert torch.equal(layer.train()(x), layer.eval()(x))
    perm = torch.tensor([2, 0, 3, 1])
    torch.testing.assert_close(layer(x[perm]), layer(x)[perm], atol=1e-12, rtol=0)


def reference(x: torch.Tensor, layer: DomainNorm) -> torch.Tensor:
    """DSMNet's DomainNorm: InstanceNorm2d(affine=False), F.normalize over channels, affine."""
    u = F.normalize(F.instance_norm(x, eps=layer.eps), p=2, dim=1)
    return u * layer.weight.view(1, -1, 1, 1) + layer.bias.view(1, -1, 1, 1)


def zero_pixel_data() -> torch.Tensor:
    """Channel maps with mean exactly 0: the pixels holding 0 normalize to the zero vector."""
    x = torch.zeros(2, C, 3, 3, dtype=torch.float64)
    x[:, :, 0, 0], x[:, :, 1, 1] = 1.0, -1.0
    return x + torch.linspace(0, 1, C, dtype=torch.float64).view(1, -1, 1, 1) * x


@pytest.mark.parametrize("make", [data, zero_pixel_data])
def test_gradients_match_the_reference_formula(make):
    x = make()
    grad = torch.randn(x.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    results = []
    for fn in (lambda layer, t: layer(t), lambda layer, t: reference(t, layer)):
        layer = DomainNorm(C).double()
        with torch.no_grad():
            layer.weight.copy_(torch.linspace(-2, 3, C))
            layer.bias.copy_(torch.linspace(1, -1, C))
        t = x.clone().requires_grad_()
        y = fn(layer, t)
        (y * grad).sum().backward()
        results.append((y, t.grad, layer.weight.grad, layer.bias.grad))
    for got, expected in zip(*results):
        torch.testing.assert_close(got, expected, atol=1e-10, rtol=1e-10)


def test_gradcheck_and_one_by_one_inputs():
    layer = DomainNorm(3).double()
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([0.5, 2.0, -1.0]))
    x = torch.randn(2, 3, 3, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,), fast_mode=True)
    with pytest.raises(ValueError, match="more than one position.*dataset.image_size=64"):
        layer(torch.randn(2, 3, 1, 1, dtype=torch.float64))


def test_replaces_batchnorm_with_fresh_affine_on_the_same_device_and_mode():
    bn = nn.BatchNorm2d(C).double().eval()
    layer = DomainNorm.from_batchnorm(bn, l2=False)
    assert (layer.num_features, layer.l2, layer.eps, layer.training) == (C, False, bn.eps, False)
    assert layer.weight.dtype == torch.float64 and layer.weight.tolist() == [1.0] * C
    assert "l2=False" in repr(layer)


def test_bfloat16_inputs_with_float32_parameters_as_under_amp():
    check_bfloat16_under_float32_parameters(DomainNorm(4))


@pytest.mark.parametrize("backbone", BACKBONES)
def test_config_builds_on_every_backbone(backbone):
    cfg, _ = resolve_config(compose_config(["norm=domainnorm", *backbone]))
    assert cfg.norm["domainnorm"] == {"_target_": "tllab.norm.domainnorm.DomainNormStrategy", "l2": True}
    model = build_model(cfg, build_plugins("norm", cfg.norm).values())
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.backbone.modules())
    layers = [m for m in model.backbone.modules() if isinstance(m, DomainNorm)]
    assert len(layers) == (3 if "digits" in backbone[0] else 20) and all(m.l2 for m in layers)
    logits, _ = model(torch.randn(2, 3, 64, 64))  # 64x64: the last ResNet stage is 2x2
    logits.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_float32_fused_kernel_matches_the_float64_reference():
    """float32 CPU inputs take the fused kernels; they agree with the float64 PyTorch expression."""
    x64 = torch.randn(3, C, 6, 5, generator=torch.Generator().manual_seed(4), dtype=torch.float64) * 4 - 2
    grad = torch.randn(x64.shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    results = []
    for dtype in (torch.float32, torch.float64):
        layer = DomainNorm(C).to(dtype)
        with torch.no_grad():
            layer.weight.copy_(torch.linspace(-2, 3, C))
        t = x64.to(dtype).requires_grad_()
        y = layer(t) if dtype == torch.float32 else reference(t, layer)
        (y * grad.to(dtype)).sum().backward()
        results.append((y.detach(), t.grad, layer.weight.grad))
    for got, expected in zip(*results):
        torch.testing.assert_close(got.double(), expected, atol=2e-5, rtol=1e-4)
